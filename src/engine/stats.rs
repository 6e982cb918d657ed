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
    pub fn step_seconds(&self) -> f64 {
        self.step_micros as f64 / 1e6
    }
}
