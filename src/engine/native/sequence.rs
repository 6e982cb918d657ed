//! One generation in flight: its tokens, KV cache, grammar state and the channel its answer goes
//! back on. A closed channel means the caller went away: the scheduler drops the sequence.

use std::time::{Duration, Instant};

use llguidance::Matcher;
use tokio::sync::oneshot;

use super::kv_cache::{block_hash, BlockHash, BlockManager, BLOCK_SIZE};
use crate::engine::{EngineError, FinishReason};

pub type Reply = oneshot::Sender<Result<Finished, EngineError>>;

/// What the engine thread hands back; text is decoded by the caller, off the engine thread.
pub struct Finished {
    pub generated: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
    /// Prompt positions whose KV came from the prefix cache instead of a forward pass.
    pub cached_prompt_tokens: usize,
}

pub struct Sequence {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    /// Pool blocks holding this sequence's positions, in order.
    pub table: Vec<u32>,
    /// Positions whose keys and values are in the cache.
    pub computed: usize,
    /// Hashes of the full blocks registered so far (a prefix of `table`).
    pub hashes: Vec<BlockHash>,
    pub matcher: Matcher,
    pub reply: Option<Reply>,
    pub submitted: Instant,
    pub first_token: Option<Duration>,
    /// Tokens to run in the current step (set by the scheduler).
    pub scheduled: usize,
    pub finish: Option<FinishReason>,
    pub cached_prompt_tokens: usize,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens not yet run through the model.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn is_prefilling(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// Record `n` newly computed positions and register the blocks they completed, so that later
    /// prompts with the same start can reuse them.
    pub fn commit(&mut self, n: usize, blocks: &mut BlockManager) {
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
    pub fn free_blocks(&mut self, blocks: &mut BlockManager) {
        blocks.release(&self.table);
        self.table.clear();
        self.hashes.clear();
        self.computed = 0;
    }

    pub fn is_cancelled(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// Send the result (or an error) back; the sequence is finished either way.
    pub fn respond(&mut self, result: Result<(), EngineError>) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        let total_time = self.submitted.elapsed();
        let _ = reply.send(result.map(|()| Finished {
            generated: self.tokens[self.prompt_len..].to_vec(),
            finish: self.finish.clone().unwrap_or(FinishReason::Stop),
            prompt_tokens: self.prompt_len,
            time_to_first_token: self.first_token.unwrap_or(total_time),
            total_time,
            cached_prompt_tokens: self.cached_prompt_tokens,
        }));
    }
}
