//! Counters the engine thread keeps about its steps, for `/metrics` and benchmarks. Written
//! only by the engine thread (relaxed atomics), read by anyone at any time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::scheduler::Scheduler;

#[derive(Debug, Default)]
pub struct NativeStats {
    pub steps: AtomicU64,
    /// Sum over steps of the sequences in the step (divide by `steps` for the mean batch).
    pub step_sequences: AtomicU64,
    pub step_tokens: AtomicU64,
    pub step_micros: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Admissions that reused at least one cached block, and the prompt tokens so skipped.
    pub prefix_hits: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub preemptions: AtomicU64,
}

impl NativeStats {
    pub fn snapshot(&self) -> crate::engine::EngineStats {
        crate::engine::EngineStats {
            steps: self.steps.load(Relaxed),
            step_sequences: self.step_sequences.load(Relaxed),
            step_tokens: self.step_tokens.load(Relaxed),
            step_seconds: self.step_micros.load(Relaxed) as f64 / 1e6,
            running: self.running.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            kv_blocks_used: self.kv_blocks_used.load(Relaxed),
            kv_blocks_total: self.kv_blocks_total.load(Relaxed),
            prefix_hits: self.prefix_hits.load(Relaxed),
            prefix_hit_tokens: self.prefix_hit_tokens.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
        }
    }

    pub(super) fn record_queue(&self, s: &Scheduler) {
        self.running.store(s.running() as u64, Relaxed);
        self.waiting.store(s.waiting() as u64, Relaxed);
        self.kv_blocks_used.store(s.blocks.used() as u64, Relaxed);
        self.prefix_hits.store(s.blocks.prefix_hits, Relaxed);
        self.prefix_hit_tokens
            .store(s.blocks.prefix_hit_tokens, Relaxed);
        self.preemptions.store(s.preemptions, Relaxed);
    }

    pub(super) fn record_step(
        &self,
        sequences: usize,
        tokens: usize,
        took: Duration,
        s: &Scheduler,
    ) {
        self.steps.fetch_add(1, Relaxed);
        self.step_sequences.fetch_add(sequences as u64, Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Relaxed);
        self.step_micros.fetch_add(took.as_micros() as u64, Relaxed);
        self.record_queue(s);
    }
}
