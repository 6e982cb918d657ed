//! Which sequences run in the next step, and how many tokens each.
//!
//! Requests join and leave between any two steps. Each step has a token budget: every running
//! sequence past its prompt gets its pending tokens first (one sampled token plus any
//! grammar-forced ones), so decoding never waits behind someone's long prompt; what is left of
//! the budget goes to prompts in arrival order, in chunks (chunked prefill).
//!
//! Admission is first-come, first-served and only when the KV blocks for the whole prompt are
//! available (after reusing any cached prefix), so a prefill never stalls half-way for memory.
//! One exception: a prompt whose first blocks a running prompt is still computing (the other
//! branches of the same request, once the dialogue comes first in every branch's prompt) steps
//! aside until they are registered, then reuses them instead of computing them again.
//! When a decoding sequence needs a block and none is left, the most recently admitted sequence
//! is preempted: its blocks go back and it waits at the head of the queue to be recomputed (its
//! full blocks usually are still cached, so recomputing is cheap). Preempting the newest, never
//! the oldest, means the oldest always progress: no thrashing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rayon::prelude::*;

use super::kv_cache::{BlockManager, BLOCK_SIZE};
use super::sequence::Sequence;
use super::step::{Run, StepLogits};
use crate::engine::{EngineCounters, EngineError};

/// Blocks kept free at admission so running sequences can grow for a while without preemption.
const WATERMARK_FRACTION: f64 = 0.01;

pub(crate) struct Scheduler {
    waiting: VecDeque<Sequence>,
    /// In admission order.
    running: Vec<Sequence>,
    pub(crate) blocks: BlockManager,
    max_running: usize,
    step_tokens: usize,
    counters: Arc<EngineCounters>,
}

impl Scheduler {
    /// Admissions, prefix-cache hits and preemptions are counted into `counters`.
    pub(crate) fn new(
        max_running: usize,
        step_tokens: usize,
        blocks: BlockManager,
        counters: Arc<EngineCounters>,
    ) -> Self {
        counters
            .kv_blocks_total
            .store(blocks.total() as u64, Relaxed);
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            max_running: max_running.max(1),
            step_tokens: step_tokens.max(1),
            counters,
        }
    }

    /// Publish the queue and pool gauges.
    pub(crate) fn publish(&self) {
        let c = &self.counters;
        c.running.store(self.running.len() as u64, Relaxed);
        c.waiting.store(self.waiting.len() as u64, Relaxed);
        c.kv_blocks_used.store(self.blocks.used() as u64, Relaxed);
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub(crate) fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// Of the planned step's tokens, those of prompts (the rest are decode tokens).
    pub(crate) fn prefill_scheduled(&self) -> usize {
        (self.running.iter())
            .filter(|s| s.is_prefilling())
            .map(|s| s.scheduled)
            .sum()
    }

    /// The planned step: one run per scheduled sequence, in admission order.
    pub(crate) fn runs(&self) -> Vec<Run<'_>> {
        self.scheduled()
            .map(|s| Run {
                tokens: &s.tokens[s.computed..s.computed + s.scheduled],
                start: s.computed,
                table: &s.table,
                wants_logits: s.computed + s.scheduled == s.tokens.len(),
            })
            .collect()
    }

    fn scheduled(&self) -> impl Iterator<Item = &Sequence> {
        self.running.iter().filter(|s| s.scheduled > 0)
    }

    fn scheduled_mut(&mut self) -> impl Iterator<Item = &mut Sequence> {
        self.running.iter_mut().filter(|s| s.scheduled > 0)
    }

    /// The step's forward pass failed: so do the sequences in it, never silently.
    pub(crate) fn fail_step(&mut self, error: &str) {
        for s in self.scheduled_mut() {
            s.fail(EngineError::Generation(format!(
                "forward pass failed: {error}"
            )));
        }
    }

    /// After a forward pass: record the computed positions (registering full blocks in the
    /// prefix cache), pick each sampled sequence's next tokens with `sample` (masks and grammar
    /// bookkeeping, in parallel; `logits` are in `runs` order), then answer the sequences that
    /// finished and fail those whose sampling failed.
    pub(crate) fn postprocess<F>(&mut self, logits: StepLogits, sample: F)
    where
        F: Fn(&mut Sequence, &mut [f32]) -> Result<(), EngineError> + Sync,
    {
        let blocks = &mut self.blocks;
        for s in self.running.iter_mut().filter(|s| s.scheduled > 0) {
            let n = s.scheduled;
            s.commit(n, blocks);
        }
        let mut work: Vec<(&mut Sequence, Vec<f32>)> = self
            .running
            .iter_mut()
            .filter(|s| s.scheduled > 0)
            .zip(logits)
            .filter_map(|(s, l)| Some((s, l?)))
            .collect();
        work.par_iter_mut().for_each(|(s, l)| {
            if let Err(e) = sample(s, l) {
                s.fail(e);
            }
        });
        for s in self.running.iter_mut().filter(|s| s.finish.is_some()) {
            s.answer();
        }
    }

    /// Drop sequences whose caller went away (or that were answered); their blocks go back.
    pub(crate) fn drop_finished(&mut self) -> usize {
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
    pub(crate) fn plan(&mut self) -> usize {
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

    /// Whether full blocks at the start of `s`'s prompt are still being computed by a running
    /// prompt: the branches of one request (and concurrent requests on one template) share their
    /// first blocks, and a sequence admitted now would compute them a second time in the same
    /// steps. Waiting until they are registered costs it nothing: the one computing them gets
    /// the step budget to itself meanwhile.
    fn in_flight_prefix(&self, s: &Sequence, limit: usize) -> bool {
        if !self.blocks.prefix_cache() {
            return false;
        }
        let prompt = &s.tokens[..s.prompt_len.saturating_sub(1)];
        let in_flight = self
            .running
            .iter()
            .filter_map(|r| {
                let common = prompt
                    .iter()
                    .zip(&r.tokens[..r.prompt_len])
                    .take_while(|(a, b)| a == b)
                    .count();
                let shared_blocks = common / BLOCK_SIZE;
                (r.hashes.len() < shared_blocks).then_some(shared_blocks)
            })
            .max();
        // Hash the prompt against the cache only when someone is computing a part of it: the
        // blocks may already be cached from an earlier prompt, and then there is nothing to wait for.
        in_flight.is_some_and(|shared| shared > self.blocks.peek_prefix(&s.tokens, limit))
    }

    fn admit(&mut self) {
        let watermark = (self.blocks.total() as f64 * WATERMARK_FRACTION).ceil() as usize;
        let mut i = 0;
        while self.running.len() < self.max_running && i < self.waiting.len() {
            let s = &self.waiting[i];
            // Reuse the cached prefix; at least one token is left to compute for the logits.
            let limit = s.tokens.len() - 1;
            if self.in_flight_prefix(s, limit) {
                // Steps aside for this step only; whoever is behind it keeps FCFS order.
                i += 1;
                continue;
            }
            let len = s.tokens.len();
            let (shared, hashes) = self.blocks.match_prefix(&self.waiting[i].tokens, limit);
            let needed = BlockManager::blocks_for(len) - shared.len();
            // FCFS: when the head does not fit, nobody behind it jumps the queue.
            if self.blocks.available() < needed + watermark && !self.running.is_empty() {
                self.blocks.release(&shared);
                break;
            }
            let mut table = shared;
            while table.len() < BlockManager::blocks_for(len) {
                match self.blocks.allocate() {
                    Some(b) => table.push(b),
                    None => break,
                }
            }
            if table.len() < BlockManager::blocks_for(len) {
                // Only reachable with nothing running: the prompt is larger than the pool.
                self.blocks.release(&table);
                let mut s = self.waiting.remove(i).expect("index is in range");
                s.fail(EngineError::Rejected(format!(
                    "the prompt needs {} KV blocks of {BLOCK_SIZE} positions and the pool has {}",
                    BlockManager::blocks_for(s.tokens.len()),
                    self.blocks.total()
                )));
                continue;
            }
            let mut s = self.waiting.remove(i).expect("index is in range");
            // Counted at admission only, so a prompt that waits several steps counts once.
            if !hashes.is_empty() {
                self.counters.prefix_hits.fetch_add(1, Relaxed);
                let tokens = hashes.len() * BLOCK_SIZE;
                self.counters
                    .prefix_hit_tokens
                    .fetch_add(tokens as u64, Relaxed);
            }
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
                let total = self.blocks.total();
                let s = &mut self.running[i];
                s.fail(EngineError::Generation(format!(
                    "KV cache exhausted at {} positions ({total} blocks of {BLOCK_SIZE})",
                    s.computed + n,
                )));
                return Growth::Failed;
            }
            let newest = self.running.len() - 1;
            let mut victim = self.running.pop().expect("running is not empty");
            victim.free_blocks(&mut self.blocks);
            victim.scheduled = 0;
            self.waiting.push_front(victim);
            self.counters.preemptions.fetch_add(1, Relaxed);
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use llguidance::Matcher;

    use super::*;

    fn seq(tokens: Vec<u32>) -> Sequence {
        let matcher = Matcher::new(Err(anyhow::anyhow!("no grammar in scheduler tests")));
        Sequence::new(tokens, 4, matcher, None, Instant::now())
    }

    /// What the engine loop does after a forward pass: every scheduled token is computed.
    fn run_step(s: &mut Scheduler) {
        for r in s.running.iter_mut() {
            let n = r.scheduled;
            r.commit(n, &mut s.blocks);
        }
    }

    fn prompts() -> [Vec<u32>; 3] {
        let shared: Vec<u32> = (0..4 * BLOCK_SIZE as u32).collect();
        let with = |tail: std::ops::Range<u32>| shared.iter().copied().chain(tail).collect();
        [with(1000..1010), with(2000..2020), (3000..3040).collect()]
    }

    /// The three prompts queued, and the first step planned.
    fn planned(prefix_cache: bool) -> Scheduler {
        let blocks = BlockManager::new(64, prefix_cache);
        let mut s = Scheduler::new(8, 512, blocks, Arc::default());
        for p in prompts() {
            s.add(seq(p));
        }
        s.plan();
        s
    }

    #[test]
    fn a_prompt_waits_for_the_shared_blocks_a_running_prompt_is_computing() {
        let mut s = planned(true);
        // The second shares four blocks with the first, which has not computed them yet: it
        // steps aside; the third shares nothing and is admitted behind it.
        assert_eq!(s.running.len(), 2);
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].tokens[4 * BLOCK_SIZE], 2000);
        run_step(&mut s);
        s.plan();
        assert!(s.waiting.is_empty());
        let second = s.running.last().unwrap();
        assert_eq!(second.tokens[4 * BLOCK_SIZE], 2000);
        assert_eq!(second.cached_prompt_tokens, 4 * BLOCK_SIZE);
        assert_eq!(second.scheduled, 20, "only its own tail is computed");
        assert_eq!(s.counters.prefix_hits.load(Relaxed), 1);
    }

    #[test]
    fn without_the_prefix_cache_nobody_waits() {
        let s = planned(false);
        assert_eq!(s.running.len(), 3);
        assert!(s.running.iter().all(|r| r.cached_prompt_tokens == 0));
    }
}
