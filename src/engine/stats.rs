//! The engine's step counters, declared once. From the one list below come the snapshot an
//! engine reports ([`EngineStats`]), the relaxed atomics the native engine thread writes
//! ([`EngineCounters`]) and the `/metrics` families (`EngineStats::metrics`), so a counter is
//! added in one place. Every value is a `u64`; step time is kept in microseconds and exported
//! in seconds.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How a value is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows.
    Counter,
    /// A current value.
    Gauge,
    /// A counter kept in microseconds, exported in seconds.
    MicrosCounter,
    /// A current value kept in nanoseconds, exported in seconds.
    NanosGauge,
}

/// One value as `/metrics` exports it.
pub struct EngineMetric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub value: f64,
}

macro_rules! engine_stats {
    ($($field:ident: $kind:ident $name:literal $help:literal;)*) => {
        /// A snapshot of an engine's step counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct EngineStats {
            $(#[doc = $help] pub $field: u64,)*
        }

        /// The counters as relaxed atomics: written by the engine thread only, read by anyone
        /// at any time.
        #[derive(Debug, Default)]
        pub struct EngineCounters {
            $(#[doc = $help] pub $field: AtomicU64,)*
        }

        impl EngineCounters {
            pub fn snapshot(&self) -> EngineStats {
                EngineStats { $($field: self.$field.load(Relaxed),)* }
            }
        }

        impl EngineStats {
            pub fn metrics(&self) -> Vec<EngineMetric> {
                vec![$(EngineMetric {
                    name: $name,
                    help: $help,
                    kind: Kind::$kind,
                    value: match Kind::$kind {
                        Kind::MicrosCounter => self.$field as f64 / 1e6,
                        Kind::NanosGauge => self.$field as f64 / 1e9,
                        Kind::Counter | Kind::Gauge => self.$field as f64,
                    },
                },)*]
            }
        }
    };
}

engine_stats! {
    steps: Counter "memex_engine_steps_total" "Engine steps (forward passes) run";
    step_sequences: Counter "memex_engine_step_sequences_total"
        "Sequences summed over steps; divided by steps, the mean batch size";
    step_tokens: Counter "memex_engine_step_tokens_total"
        "Tokens (prefill chunks and decode tokens) summed over steps";
    step_micros: MicrosCounter "memex_engine_step_seconds_total"
        "Time spent in steps; divided by steps, the mean step time";
    prefill_tokens: Counter "memex_engine_step_prefill_tokens_total"
        "Prompt tokens computed in steps (the rest of the step tokens are decode tokens)";
    step_budget: Gauge "memex_engine_step_token_budget"
        "Most tokens one step runs (decode tokens first, prefill chunks in what is left)";
    step_fixed_nanos: NanosGauge "memex_engine_step_fixed_seconds"
        "Fitted time of a step whatever its size (reading the weights, per-step work)";
    step_token_nanos: NanosGauge "memex_engine_step_token_seconds"
        "Fitted time each token adds to a step";
    running: Gauge "memex_engine_running_sequences" "Sequences admitted and running";
    waiting: Gauge "memex_engine_waiting_sequences"
        "Sequences waiting for KV blocks or a running slot";
    kv_blocks_used: Gauge "memex_engine_kv_blocks_used" "KV cache blocks in use";
    kv_blocks_total: Gauge "memex_engine_kv_blocks_total" "KV cache blocks in the pool";
    prefix_hits: Counter "memex_engine_prefix_cache_hits_total"
        "Admissions that reused cached prompt-prefix blocks";
    prefix_hit_tokens: Counter "memex_engine_prefix_cache_hit_tokens_total"
        "Prompt tokens whose computation the prefix cache skipped";
    preemptions: Counter "memex_engine_preemptions_total"
        "Sequences preempted (recomputed later) because the KV pool ran dry";
}

impl EngineStats {
    /// What a step costs, as last fitted; `None` before the first steps.
    pub fn step_cost(&self) -> Option<StepCost> {
        (self.step_token_nanos > 0).then(|| StepCost {
            fixed: self.step_fixed_nanos as f64 / 1e9,
            per_token: self.step_token_nanos as f64 / 1e9,
        })
    }
}

/// A step's time as `fixed + per_token × tokens`, seconds. On two cores with SmolLM2 a decode
/// step of a few sequences is mostly the fixed part (every weight is read once per step), a
/// 512-token prefill chunk mostly the per-token part: one tokens-per-second figure for both is
/// off by several times whenever the mix changes (admission predicted from one, and requests
/// admitted while the engine was prefilling were cancelled at their deadline while decoding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub fixed: f64,
    pub per_token: f64,
}

impl StepCost {
    pub fn step(&self, tokens: f64) -> f64 {
        self.fixed + self.per_token * tokens
    }
}

/// Least-squares fit of [`StepCost`] over recent steps, each weighted by how recent it is: a
/// step's weight halves every ~140 steps (tens of seconds of decoding), so the fit follows the
/// batch and the context lengths the engine runs now, while the few large prefill steps among
/// many small decode steps keep the slope determined.
#[derive(Debug, Default, Clone)]
pub struct StepCostFit {
    w: f64,
    x: f64,
    xx: f64,
    y: f64,
    xy: f64,
}

impl StepCostFit {
    const DECAY: f64 = 0.995;

    pub fn add(&mut self, tokens: usize, seconds: f64) {
        let (x, y) = (tokens as f64, seconds);
        let d = Self::DECAY;
        self.w = self.w * d + 1.0;
        self.x = self.x * d + x;
        self.xx = self.xx * d + x * x;
        self.y = self.y * d + y;
        self.xy = self.xy * d + x * y;
    }

    /// `None` before any step. Until steps of different sizes were seen (or if the fit says a
    /// negative part), the cost is all per token, or all fixed, whichever the data allow.
    pub fn cost(&self) -> Option<StepCost> {
        if self.w == 0.0 || self.x <= 0.0 {
            return None;
        }
        let var = self.w * self.xx - self.x * self.x;
        let through_origin = || StepCost {
            fixed: 0.0,
            per_token: self.xy / self.xx,
        };
        // Steps all of one size (relative spread under 1%) cannot separate the two parts.
        if var <= 1e-4 * self.w * self.xx {
            return Some(through_origin());
        }
        let per_token = (self.w * self.xy - self.x * self.y) / var;
        let fixed = (self.y - per_token * self.x) / self.w;
        Some(if per_token <= 0.0 {
            // Larger steps not slower: pretend each token costs the mean step's share.
            StepCost {
                fixed: 0.0,
                per_token: self.y / self.x,
            }
        } else if fixed < 0.0 {
            through_origin()
        } else {
            StepCost { fixed, per_token }
        })
    }

    /// Into the counters the engine publishes (nanoseconds).
    pub fn publish(&self, counters: &EngineCounters) {
        if let Some(c) = self.cost() {
            counters
                .step_fixed_nanos
                .store((c.fixed * 1e9) as u64, Relaxed);
            counters
                .step_token_nanos
                .store(((c.per_token * 1e9) as u64).max(1), Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_separates_the_fixed_and_per_token_parts() {
        let mut f = StepCostFit::default();
        assert!(f.cost().is_none());
        // 50 ms a step plus 2 ms a token: one prefill chunk among decode steps of 1 to 8.
        let truth = StepCost {
            fixed: 0.05,
            per_token: 0.002,
        };
        f.add(512, truth.step(512.0));
        for i in 0..300 {
            let n = 1 + i % 8;
            f.add(n, truth.step(n as f64));
        }
        let c = f.cost().unwrap();
        assert!((c.fixed - 0.05).abs() < 1e-6, "{c:?}");
        assert!((c.per_token - 0.002).abs() < 1e-8, "{c:?}");
        // Published in nanoseconds, read back in seconds.
        let counters = EngineCounters::default();
        f.publish(&counters);
        let back = counters.snapshot().step_cost().unwrap();
        assert!((back.fixed - 0.05).abs() < 1e-8 && (back.per_token - 0.002).abs() < 1e-8);
    }

    #[test]
    fn steps_of_one_size_give_a_cost_per_token() {
        let mut f = StepCostFit::default();
        for _ in 0..10 {
            f.add(4, 0.2);
        }
        let c = f.cost().unwrap();
        assert_eq!(c.fixed, 0.0);
        assert!((c.step(4.0) - 0.2).abs() < 1e-9, "{c:?}");
        // Bigger steps that were faster (noise) do not give a negative slope.
        f.add(64, 0.1);
        let c = f.cost().unwrap();
        assert!(c.per_token > 0.0 && c.fixed >= 0.0, "{c:?}");
    }
}
