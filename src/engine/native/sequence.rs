//! One generation in flight: its tokens, KV cache, grammar state and the channel its answer goes
//! back on. A closed channel means the caller went away: the scheduler drops the sequence.

use std::time::{Duration, Instant};

use llguidance::Matcher;
use tokio::sync::oneshot;

use super::kv_cache::{block_hash, BlockHash, BlockManager, BLOCK_SIZE};
use crate::engine::{EngineError, FinishReason};

pub(crate) type Reply = oneshot::Sender<Result<Finished, EngineError>>;

/// What the engine thread hands back; text is decoded by the caller, off the engine thread.
pub(crate) struct Finished {
    pub(crate) generated: Vec<u32>,
    pub(crate) finish: FinishReason,
    pub(crate) prompt_tokens: usize,
    pub(crate) time_to_first_token: Duration,
    pub(crate) total_time: Duration,
    /// Prompt positions whose KV came from the prefix cache instead of a forward pass.
    pub(crate) cached_prompt_tokens: usize,
}

pub(crate) struct Sequence {
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    pub(crate) max_tokens: usize,
    /// Pool blocks holding this sequence's positions, in order.
    pub(crate) table: Vec<u32>,
    /// Positions whose keys and values are in the cache.
    pub(crate) computed: usize,
    /// Hashes of the full blocks registered so far (a prefix of `table`).
    pub(crate) hashes: Vec<BlockHash>,
    pub(crate) matcher: Matcher,
    pub(crate) reply: Option<Reply>,
    pub(crate) submitted: Instant,
    pub(crate) first_token: Option<Duration>,
    /// Tokens to run in the current step (set by the scheduler).
    pub(crate) scheduled: usize,
    pub(crate) finish: Option<FinishReason>,
    pub(crate) cached_prompt_tokens: usize,
}

impl Sequence {
    /// A prompt waiting for admission. `reply` is `None` only in tests that plan steps without
    /// a caller.
    pub(crate) fn new(
        prompt: Vec<u32>,
        max_tokens: usize,
        matcher: Matcher,
        reply: Option<Reply>,
        submitted: Instant,
    ) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens,
            table: Vec::new(),
            computed: 0,
            hashes: Vec::new(),
            matcher,
            reply,
            submitted,
            first_token: None,
            scheduled: 0,
            finish: None,
            cached_prompt_tokens: 0,
        }
    }

    pub(crate) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens not yet run through the model.
    pub(crate) fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub(crate) fn is_prefilling(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// Record `n` newly computed positions and register the blocks they completed, so that later
    /// prompts with the same start can reuse them.
    pub(crate) fn commit(&mut self, n: usize, blocks: &mut BlockManager) {
        self.computed += n;
        while (self.hashes.len() + 1) * BLOCK_SIZE <= self.computed {
            let i = self.hashes.len();
            let h = block_hash(
                self.hashes.last().copied(),
                &self.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
            );
            blocks.register(self.table[i], h);
            self.hashes.push(h);
        }
    }

    /// Give the blocks back and forget the cache (after a preemption the sequence recomputes,
    /// reusing whatever of its blocks is still cached).
    pub(crate) fn free_blocks(&mut self, blocks: &mut BlockManager) {
        blocks.release(&self.table);
        self.table.clear();
        self.hashes.clear();
        self.computed = 0;
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// Answer with an error. The reply is spent, so the sequence now counts as cancelled and
    /// the scheduler drops it (and frees its blocks) before the next step.
    pub(crate) fn fail(&mut self, error: EngineError) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(error));
        }
    }

    /// Send the generation back once `finish` is set.
    pub(crate) fn answer(&mut self) {
        let (Some(finish), Some(reply)) = (self.finish, self.reply.take()) else {
            return;
        };
        let total_time = self.submitted.elapsed();
        let _ = reply.send(Ok(Finished {
            generated: self.tokens[self.prompt_len..].to_vec(),
            finish,
            prompt_tokens: self.prompt_len,
            time_to_first_token: self.first_token.unwrap_or(total_time),
            total_time,
            cached_prompt_tokens: self.cached_prompt_tokens,
        }));
    }
}
