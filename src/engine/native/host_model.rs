//! The transformer forward pass over a ragged batch, on our CPU kernels (`--native-device cpu`).
//!
//! Every scheduled sequence contributes a run of tokens (a prefill chunk, or a decode token plus
//! any grammar-forced ones). All runs are flattened into one `[T, hidden]` activation matrix
//! (`step`), so each linear layer is one matmul for the whole step whatever the sequences'
//! lengths. Attention is the only per-sequence part: `attention` reads each run's keys and
//! values straight out of the block pool, every (token, head) in parallel, with no per-sequence
//! tensor ops (on CPU the fixed cost of a few small tensor ops per sequence and layer would
//! dominate a decode step).

use candle_core::Result;
use rayon::prelude::*;

use super::attention::attention;
use super::kv_cache::KvPool;
use super::math::silu_mul;
use super::step::{ForwardPass, Step, StepLogits};
use super::weights::{Config, Weights};

pub(crate) struct HostModel {
    pub(crate) weights: Weights,
    /// `[position][head_dim / 2]` rotary tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

/// The host model with its KV pool: what the engine runs on `--native-device cpu`.
pub(crate) struct HostPass {
    pub(crate) model: HostModel,
    pub(crate) pool: KvPool,
}

impl ForwardPass for HostPass {
    fn config(&self) -> &Config {
        self.model.config()
    }

    fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    fn forward(&mut self, step: &Step) -> Result<StepLogits> {
        self.model.forward(step, &mut self.pool)
    }
}

/// How many positions the RoPE tables cover at most; longer contexts are refused at admission.
const MAX_ROPE_POSITIONS: usize = 65_536;

impl HostModel {
    pub(crate) fn new(weights: Weights) -> Self {
        let (cos, sin, positions) = rope_tables(&weights.config);
        Self {
            cos,
            sin,
            positions,
            weights,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.weights.config
    }

    pub(crate) fn max_positions(&self) -> usize {
        self.positions
    }

    /// Run one step, writing the runs' keys and values into `pool`.
    pub(crate) fn forward(&self, step: &Step, pool: &mut KvPool) -> Result<StepLogits> {
        let w = &self.weights;
        let c = &w.config;
        let hidden = c.hidden;
        let (rows, slots, runs) = (&step.rows, &step.slots, step.runs);
        let t = step.ids.len();
        let mut x = vec![0f32; t * hidden];
        for (row, &id) in x.chunks_exact_mut(hidden).zip(&step.ids) {
            let id = id as usize;
            for (x, e) in row.iter_mut().zip(&w.embed[id * hidden..(id + 1) * hidden]) {
                *x = e.to_f32();
            }
        }
        let mut h = vec![0f32; t * hidden];

        for (li, layer) in w.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
            let mut qkv = layer.qkv.forward(&h)?.into_iter();
            let (Some(mut q), Some(mut k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                candle_core::bail!("the q/k/v group has three outputs");
            };
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                rms_norm_in_place(&mut q, qn, c.rms_eps);
                rms_norm_in_place(&mut k, kn, c.rms_eps);
            }
            self.rope(&mut q, c.heads, rows);
            self.rope(&mut k, c.kv_heads, rows);
            let sw = pool.slot_width;
            for (row, &s) in slots.iter().enumerate() {
                pool.write(
                    li,
                    s,
                    &k[row * sw..(row + 1) * sw],
                    &v[row * sw..(row + 1) * sw],
                );
            }
            let (kp, vp) = pool.layer(li);
            let attn = attention(c, &q, rows, runs, kp, vp, sw);
            add_in_place(&mut x, &layer.o.forward(&attn)?);
            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut h);
            let mut gate_up = layer.gate_up.forward(&h)?.into_iter();
            let (Some(mut gate), Some(up)) = (gate_up.next(), gate_up.next()) else {
                candle_core::bail!("the gate/up group has two outputs");
            };
            silu_mul(&mut gate, &up);
            add_in_place(&mut x, &layer.down.forward(&gate)?);
        }

        if step.logit_rows.is_empty() {
            return Ok(step.per_run(std::iter::empty()));
        }
        let mut last = Vec::with_capacity(step.logit_rows.len() * hidden);
        for &row in &step.logit_rows {
            last.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &w.norm, c.rms_eps, &mut normed);
        let logits = w.lm_head.forward(&normed)?;
        Ok(step.per_run(logits.chunks_exact(w.lm_head.n).map(<[f32]>::to_vec)))
    }

    /// Rotary embedding in place on `[rows, heads, head_dim]`, each row at its own position.
    fn rope(&self, x: &mut [f32], heads: usize, rows: &[(usize, usize)]) {
        let d = self.weights.config.head_dim;
        let half = d / 2;
        let interleaved = self.weights.config.rope_interleaved;
        x.par_chunks_mut(heads * d)
            .zip(rows.par_iter())
            .for_each(|(row, &(_, pos))| {
                let cos = &self.cos[pos * half..(pos + 1) * half];
                let sin = &self.sin[pos * half..(pos + 1) * half];
                for head in row.chunks_exact_mut(d) {
                    for i in 0..half {
                        // GGUF Llama rotates adjacent pairs; HF layouts rotate the two halves.
                        let (a, b) = if interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * cos[i] - x1 * sin[i];
                        head[b] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            });
    }
}

/// The rotary tables, `[position][head_dim / 2]` cos and sin, and how many positions they cover
/// (computed in f64, so both forward paths rotate by exactly the same values).
pub(crate) fn rope_tables(c: &Config) -> (Vec<f32>, Vec<f32>, usize) {
    let positions = c.max_positions.min(MAX_ROPE_POSITIONS);
    let half = c.head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (c.rope_theta as f64).powf(2.0 * i as f64 / c.head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin, positions)
}

/// `out = x / rms(x) * weight`, row by row (rows are `weight.len()` wide). The same arithmetic,
/// in the same order, as candle's `rms_norm`, which the reference backend runs.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    let one = |(x, o): (&[f32], &mut [f32])| {
        let m = (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(x).zip(weight) {
            *o = v / m * w;
        }
    };
    if x.len() / d >= 32 {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(one);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(one);
    }
}

/// RMS norm of every `weight.len()`-wide chunk (the q/k norms, per head).
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for chunk in x.chunks_exact_mut(d) {
        let m = (chunk.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
        for (v, w) in chunk.iter_mut().zip(weight) {
            *v = *v / m * w;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The ragged-batch tests, and the helpers `tensor_model`'s tests share.
#[cfg(test)]
pub(crate) mod batch_tests {
    use super::*;
    use crate::engine::native::kv_cache::BLOCK_SIZE;
    use crate::engine::native::step::Run;

    /// The tiny generated Qwen3's weights.
    pub(crate) fn tiny_weights() -> Weights {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny_model::write(dir.path(), 7).unwrap();
        Weights::from_safetensors_dir(dir.path(), None).unwrap()
    }

    fn model() -> HostModel {
        HostModel::new(tiny_weights())
    }

    fn pool(m: &HostModel) -> KvPool {
        let c = m.config();
        KvPool::new(c.layers, c.kv_heads, c.head_dim, 64)
    }

    pub(crate) fn tokens(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 31 + seed * 17) % 250).collect()
    }

    /// Consecutive blocks from `first`, enough for `positions`.
    pub(crate) fn table(first: u32, positions: usize) -> Vec<u32> {
        (first..first + positions.div_ceil(BLOCK_SIZE) as u32).collect()
    }

    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn alone(m: &HostModel, toks: &[u32]) -> Vec<f32> {
        let mut p = pool(m);
        let t = table(0, toks.len());
        let run = Run {
            tokens: toks,
            start: 0,
            table: &t,
            wants_logits: true,
        };
        m.forward(&Step::new(&[run]), &mut p)
            .unwrap()
            .remove(0)
            .unwrap()
    }

    #[test]
    fn a_ragged_batch_gives_each_sequence_its_own_logits() {
        // Dense weights go through candle's gemm, whose blocking depends on the batch: equal
        // within float tolerance.
        ragged_batch(&model(), |g, e| assert!(max_diff(g, e) < 1e-4));
        // Quantized weights (what GGUF serving runs) use our kernels, and a sequence's arithmetic
        // must not depend on who shares its step at all, or greedy outputs would change with
        // the load: bit-identical.
        let dir = tempfile::tempdir().unwrap();
        crate::tiny_model::write(dir.path(), 7).unwrap();
        let w = Weights::from_safetensors_dir(dir.path(), None).unwrap();
        let q = HostModel::new(
            w.quantized(candle_core::quantized::GgmlDType::Q4_1)
                .unwrap(),
        );
        ragged_batch(&q, |g, e| assert_eq!(g, e));
    }

    /// `--quantize q8_0` on a safetensors checkpoint: every linear layer (the tied LM head too)
    /// is quantized at load, the logits stay within the tolerance the tensor path's Q8_0 tests
    /// use, and the weights take less than half the memory.
    #[test]
    fn quantizing_at_load_keeps_the_logits_and_halves_the_memory() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny_model::write(dir.path(), 7).unwrap();
        let dense = Weights::from_safetensors_dir(dir.path(), None).unwrap();
        let q8 = Weights::from_safetensors_dir(
            dir.path(),
            Some(candle_core::quantized::GgmlDType::Q8_0),
        )
        .unwrap();
        let (dense_bytes, q8_bytes) = (dense.resident_bytes(), q8.resident_bytes());
        let toks = tokens(6, 29);
        let (want, got) = (
            alone(&HostModel::new(dense), &toks),
            alone(&HostModel::new(q8), &toks),
        );
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_diff(&got, &want) <= 1e-2 * scale,
            "{} vs {scale}",
            max_diff(&got, &want)
        );
        assert_ne!(got, want, "the Q8_0 model ran quantized kernels");
        // The tiny model's embedding table (f32 either way) is a large share of it; linear
        // layers shrink about 3.8x.
        assert!(
            q8_bytes * 2 < dense_bytes,
            "{q8_bytes} vs {dense_bytes} bytes"
        );
    }

    fn ragged_batch(m: &HostModel, check: impl Fn(&[f32], &[f32])) {
        let seqs = [tokens(1, 20), tokens(2, 7), tokens(3, 33)];
        let expected: Vec<Vec<f32>> = seqs.iter().map(|s| alone(m, s)).collect();
        let mut p = pool(m);
        let tables = [table(0, 20), table(10, 7), table(20, 33)];
        let runs: Vec<Run> = seqs
            .iter()
            .zip(&tables)
            .map(|(s, t)| Run {
                tokens: s,
                start: 0,
                table: t,
                wants_logits: true,
            })
            .collect();
        let got = m.forward(&Step::new(&runs), &mut p).unwrap();
        for (g, e) in got.iter().zip(&expected) {
            check(g.as_ref().unwrap(), e);
        }
        // Different sequences do differ (the comparison above is not vacuous).
        assert!(max_diff(&expected[0], &expected[1]) > 1e-3);
    }

    #[test]
    fn chunked_prefill_and_mixed_steps_match_one_shot() {
        let m = model();
        let a = tokens(4, 40);
        let b = tokens(5, 12);
        let expected_a = alone(&m, &a);
        let expected_b = alone(&m, &b);
        let mut p = pool(&m);
        let ta = table(0, 40);
        let tb = table(8, 12);
        // Step 1: first 17 tokens of a (no logits needed mid-prefill).
        let r = m
            .forward(
                &Step::new(&[Run {
                    tokens: &a[..17],
                    start: 0,
                    table: &ta,
                    wants_logits: false,
                }]),
                &mut p,
            )
            .unwrap();
        assert!(r[0].is_none());
        // Step 2: the rest of a beside the first 11 tokens of b.
        m.forward(
            &Step::new(&[
                Run {
                    tokens: &a[17..39],
                    start: 17,
                    table: &ta,
                    wants_logits: false,
                },
                Run {
                    tokens: &b[..11],
                    start: 0,
                    table: &tb,
                    wants_logits: false,
                },
            ]),
            &mut p,
        )
        .unwrap();
        // Step 3: the last token of each, as a decode step.
        let got = m
            .forward(
                &Step::new(&[
                    Run {
                        tokens: &a[39..],
                        start: 39,
                        table: &ta,
                        wants_logits: true,
                    },
                    Run {
                        tokens: &b[11..],
                        start: 11,
                        table: &tb,
                        wants_logits: true,
                    },
                ]),
                &mut p,
            )
            .unwrap();
        assert!(max_diff(got[0].as_ref().unwrap(), &expected_a) < 1e-4);
        assert!(max_diff(got[1].as_ref().unwrap(), &expected_b) < 1e-4);
    }
}
