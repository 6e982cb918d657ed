//! Which sequences run in the next step, and how many tokens each.
//!
//! Requests join and leave between any two steps. Each step has a token budget: every running
//! sequence past its prompt gets its pending tokens first (one sampled token plus any
//! grammar-forced ones), so decoding never waits behind someone's long prompt; what is left of
//! the budget goes to prompts in arrival order, in chunks (chunked prefill).
//!
//! Admission is first-come, first-served and only when the KV blocks for the whole prompt are
//! available (after reusing any cached prefix), so a prefill never stalls half-way for memory.
//! When a decoding sequence needs a block and none is left, the most recently admitted sequence
//! is preempted: its blocks go back and it waits at the head of the queue to be recomputed (its
//! full blocks usually are still cached, so recomputing is cheap). Preempting the newest, never
//! the oldest, means the oldest always progress: no thrashing.

use std::collections::VecDeque;

use super::kv_cache::{BlockManager, BLOCK_SIZE};
use super::sequence::Sequence;

/// Blocks kept free at admission so running sequences can grow for a while without preemption.
const WATERMARK_FRACTION: f64 = 0.01;

pub struct Scheduler {
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    pub blocks: BlockManager,
    max_running: usize,
    step_tokens: usize,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(max_running: usize, step_tokens: usize, blocks: BlockManager) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            max_running: max_running.max(1),
            step_tokens: step_tokens.max(1),
            preemptions: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// Drop sequences whose caller went away (or that were answered); their blocks go back.
    pub fn drop_finished(&mut self) -> usize {
        let mut dropped = 0;
        let blocks = &mut self.blocks;
        self.running.retain_mut(|s| {
            let keep = !s.is_cancelled() && s.finish.is_none();
            if !keep {
                s.free_blocks(blocks);
                dropped += 1;
            }
            keep
        });
        self.waiting.retain_mut(|s| {
            let keep = !s.is_cancelled();
            if !keep {
                s.free_blocks(blocks);
                dropped += 1;
            }
            keep
        });
        dropped
    }

    /// Admit waiting sequences and set `scheduled` on every running one. Returns the step's
    /// token count (0 when there is nothing to run).
    pub fn plan(&mut self) -> usize {
        self.admit();
        let mut budget = self.step_tokens;
        let mut total = 0;
        // Decoding sequences first, oldest first; each needs room for its pending tokens.
        let mut i = 0;
        while i < self.running.len() {
            self.running[i].scheduled = 0;
            if self.running[i].is_prefilling() {
                i += 1;
                continue;
            }
            let n = self.running[i].pending();
            match self.grow(i, n) {
                Growth::Grown => {}
                // `i` itself was the newest and went back to the queue.
                Growth::Preempted => continue,
                Growth::Failed => {
                    i += 1;
                    continue;
                }
            }
            self.running[i].scheduled = n;
            total += n;
            budget = budget.saturating_sub(n);
            i += 1;
        }
        // Prompts in arrival order (running is kept in admission order); their blocks were
        // reserved at admission.
        for s in self.running.iter_mut().filter(|s| s.is_prefilling()) {
            if budget == 0 {
                break;
            }
            let n = s.pending().min(budget);
            s.scheduled = n;
            budget -= n;
            total += n;
        }
        total
    }

    fn admit(&mut self) {
        let watermark = (self.blocks.total() as f64 * WATERMARK_FRACTION).ceil() as usize;
        while self.running.len() < self.max_running {
            let Some(s) = self.waiting.front_mut() else {
                break;
            };
            // Reuse the cached prefix; at least one token is left to compute for the logits.
            let limit = s.tokens.len() - 1;
            let (shared, hashes) = self.blocks.match_prefix(&s.tokens, limit);
            let needed = BlockManager::blocks_for(s.tokens.len()) - shared.len();
            // FCFS: when the head does not fit, nobody behind it jumps the queue.
            if self.blocks.available() < needed + watermark && !self.running.is_empty() {
                self.blocks.release(&shared);
                break;
            }
            let mut table = shared;
            while table.len() < BlockManager::blocks_for(s.tokens.len()) {
                match self.blocks.allocate() {
                    Some(b) => table.push(b),
                    None => break,
                }
            }
            if table.len() < BlockManager::blocks_for(s.tokens.len()) {
                // Only reachable with nothing running: the prompt is larger than the pool.
                self.blocks.release(&table);
                let mut s = self.waiting.pop_front().expect("front exists");
                s.respond(Err(crate::engine::EngineError::Rejected(format!(
                    "the prompt needs {} KV blocks of {BLOCK_SIZE} positions and the pool has {}",
                    BlockManager::blocks_for(s.tokens.len()),
                    self.blocks.total()
                ))));
                continue;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            s.computed = hashes.len() * BLOCK_SIZE;
            if s.cached_prompt_tokens == 0 {
                s.cached_prompt_tokens = s.computed.min(s.prompt_len);
            }
            s.hashes = hashes;
            s.table = table;
            self.running.push(s);
        }
    }

    /// Make sure running sequence `i` has blocks for `n` more positions, preempting the newest
    /// sequences if the pool is dry.
    fn grow(&mut self, i: usize, n: usize) -> Growth {
        let need = BlockManager::blocks_for(self.running[i].computed + n);
        while self.running[i].table.len() < need {
            if let Some(b) = self.blocks.allocate() {
                self.running[i].table.push(b);
                continue;
            }
            if self.running.len() == 1 {
                // Alone and still out of room: the pool is smaller than this one generation.
                // Requeueing it would loop forever; fail it with the reason instead.
                let s = &mut self.running[i];
                s.respond(Err(crate::engine::EngineError::Generation(format!(
                    "KV cache exhausted at {} positions ({} blocks of {BLOCK_SIZE})",
                    s.computed + n,
                    self.blocks.total()
                ))));
                s.finish = Some(crate::engine::FinishReason::Other("kv_exhausted".into()));
                return Growth::Failed;
            }
            let newest = self.running.len() - 1;
            let mut victim = self.running.pop().expect("running is not empty");
            victim.free_blocks(&mut self.blocks);
            victim.scheduled = 0;
            self.waiting.push_front(victim);
            self.preemptions += 1;
            if newest == i {
                return Growth::Preempted;
            }
        }
        Growth::Grown
    }
}

enum Growth {
    Grown,
    Preempted,
    Failed,
}
