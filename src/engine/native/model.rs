//! The transformer forward pass over a ragged batch.
//!
//! Every scheduled sequence contributes a run of tokens (a prefill chunk, or a decode token plus
//! any grammar-forced ones). All runs are flattened into one `[T, hidden]` activation matrix, so
//! each linear layer is one matmul for the whole step whatever the sequences' lengths. Attention
//! is the only per-sequence part: `attention` reads each run's keys and values straight out of
//! the block pool, every (token, head) in parallel, with no per-sequence tensor ops (on CPU the
//! fixed cost of a few small tensor ops per sequence and layer would dominate a decode step).

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use rayon::prelude::*;

use super::kv_cache::{slot, KvPool};
use super::weights::{Config, Weights};

pub struct Model {
    pub weights: Weights,
    /// `[position][head_dim / 2]` rotary tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

/// One sequence's part of a step.
pub struct Run<'a> {
    /// The tokens to run now.
    pub tokens: &'a [u32],
    /// Positions already in the cache (the first token of the run sits at this position).
    pub start: usize,
    /// The sequence's block table; it covers `start + tokens.len()` positions.
    pub table: &'a [u32],
    /// Whether the logits after the run's last token are needed (false mid-prefill).
    pub wants_logits: bool,
}

/// How many positions the RoPE tables cover at most; longer contexts are refused at admission.
const MAX_ROPE_POSITIONS: usize = 65_536;

impl Model {
    pub fn new(weights: Weights) -> Self {
        let c = &weights.config;
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
        Self {
            cos,
            sin,
            positions,
            weights,
        }
    }

    pub fn config(&self) -> &Config {
        &self.weights.config
    }

    pub fn max_positions(&self) -> usize {
        self.positions
    }

    /// Run one step, writing the runs' keys and values into `pool`. Returns, for each run that
    /// wants them, the logits after its last token.
    pub fn forward(&self, runs: &[Run], pool: &mut KvPool) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.weights.config;
        let dev = Device::Cpu;
        let mut ids = Vec::new();
        // Per flattened row: its run and its position in that run's sequence.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (ri, r) in runs.iter().enumerate() {
            ids.extend_from_slice(r.tokens);
            rows.extend((0..r.tokens.len()).map(|j| (ri, r.start + j)));
        }
        let t = ids.len();
        let ids = Tensor::from_vec(ids, t, &dev)?;
        let mut x = self.weights.embed.index_select(&ids, 0)?;
        let slots: Vec<usize> = rows
            .iter()
            .map(|&(ri, pos)| slot(runs[ri].table, pos))
            .collect();

        for (li, layer) in self.weights.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = layer.q.forward(&h)?.reshape((t, c.heads, c.head_dim))?;
            let mut k = layer.k.forward(&h)?.reshape((t, c.kv_heads, c.head_dim))?;
            let v = layer.v.forward(&h)?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, c.rms_eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, c.rms_eps)?;
            }
            let mut q = q.flatten_all()?.to_vec1::<f32>()?;
            let mut k = k.flatten_all()?.to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            self.rope(&mut q, c.heads, &rows);
            self.rope(&mut k, c.kv_heads, &rows);
            let w = pool.slot_width;
            for (row, &s) in slots.iter().enumerate() {
                pool.k[li][s * w..(s + 1) * w].copy_from_slice(&k[row * w..(row + 1) * w]);
                pool.v[li][s * w..(s + 1) * w].copy_from_slice(&v[row * w..(row + 1) * w]);
            }
            let out = attention(c, &q, &rows, runs, &pool.k[li], &pool.v[li], w);
            let attn = Tensor::from_vec(out, (t, c.heads * c.head_dim), &dev)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }

        let mut last_rows = Vec::new();
        let mut row = 0;
        for r in runs {
            row += r.tokens.len();
            if r.wants_logits {
                last_rows.push((row - 1) as u32);
            }
        }
        if last_rows.is_empty() {
            return Ok(runs.iter().map(|_| None).collect());
        }
        let n_rows = last_rows.len();
        let rows = Tensor::from_vec(last_rows, n_rows, &dev)?;
        let h = x.index_select(&rows, 0)?;
        let h = candle_nn::ops::rms_norm(&h, &self.weights.norm, c.rms_eps)?;
        let logits = self.weights.lm_head.forward(&h)?.to_dtype(DType::F32)?;
        let mut next = 0;
        let mut result = Vec::with_capacity(runs.len());
        for r in runs {
            if r.wants_logits {
                result.push(Some(logits.i(next)?.to_vec1::<f32>()?));
                next += 1;
            } else {
                result.push(None);
            }
        }
        Ok(result)
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

/// Causal attention of every row's query heads over its own sequence's cached keys and values.
/// `q` is `[rows, heads, head_dim]`; the result is `[rows, heads * head_dim]`.
fn attention(
    c: &Config,
    q: &[f32],
    rows: &[(usize, usize)],
    runs: &[Run],
    k_pool: &[f32],
    v_pool: &[f32],
    slot_width: usize,
) -> Vec<f32> {
    let d = c.head_dim;
    let group = c.heads / c.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; rows.len() * c.heads * d];
    out.par_chunks_mut(c.heads * d)
        .zip(q.par_chunks(c.heads * d))
        .zip(rows.par_iter())
        .for_each(|((out_row, q_row), &(ri, pos))| {
            let table = runs[ri].table;
            let len = pos + 1;
            let mut scores = vec![0f32; group * len];
            for kv in 0..c.kv_heads {
                let qs = &q_row[kv * group * d..(kv + 1) * group * d];
                // Each key is read once for all the query heads that share it.
                for p in 0..len {
                    let s = slot(table, p) * slot_width + kv * d;
                    let key = &k_pool[s..s + d];
                    for g in 0..group {
                        scores[g * len + p] = dot(&qs[g * d..(g + 1) * d], key) * scale;
                    }
                }
                for g in 0..group {
                    softmax_in_place(&mut scores[g * len..(g + 1) * len]);
                }
                let o = &mut out_row[kv * group * d..(kv + 1) * group * d];
                for p in 0..len {
                    let s = slot(table, p) * slot_width + kv * d;
                    let value = &v_pool[s..s + d];
                    for g in 0..group {
                        axpy(scores[g * len + p], value, &mut o[g * d..(g + 1) * d]);
                    }
                }
            }
        });
    out
}

/// Eight independent accumulators so the compiler can keep them in one SIMD register.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += w * xi;
    }
}

fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_odd_lengths() {
        let a: Vec<f32> = (0..13).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..13).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 3.0, 2.0, -50.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[2] && x[2] > x[0] && x[0] > x[3]);
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::engine::native::kv_cache::BLOCK_SIZE;

    fn model() -> Model {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny_model::write(dir.path(), 7).unwrap();
        Model::new(Weights::from_safetensors_dir(dir.path()).unwrap())
    }

    fn pool(m: &Model) -> KvPool {
        let c = m.config();
        KvPool::new(c.layers, c.kv_heads, c.head_dim, 64)
    }

    fn tokens(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 31 + seed * 17) % 250).collect()
    }

    fn table(first: u32, positions: usize) -> Vec<u32> {
        (first..first + positions.div_ceil(BLOCK_SIZE) as u32).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn alone(m: &Model, toks: &[u32]) -> Vec<f32> {
        let mut p = pool(m);
        let t = table(0, toks.len());
        let run = Run {
            tokens: toks,
            start: 0,
            table: &t,
            wants_logits: true,
        };
        m.forward(&[run], &mut p).unwrap().remove(0).unwrap()
    }

    #[test]
    fn a_ragged_batch_gives_each_sequence_its_own_logits() {
        let m = model();
        let seqs = [tokens(1, 20), tokens(2, 7), tokens(3, 33)];
        let expected: Vec<Vec<f32>> = seqs.iter().map(|s| alone(&m, s)).collect();
        let mut p = pool(&m);
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
        let got = m.forward(&runs, &mut p).unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!(max_diff(g.as_ref().unwrap(), e) < 1e-4);
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
                &[Run {
                    tokens: &a[..17],
                    start: 0,
                    table: &ta,
                    wants_logits: false,
                }],
                &mut p,
            )
            .unwrap();
        assert!(r[0].is_none());
        // Step 2: the rest of a beside the first 11 tokens of b.
        m.forward(
            &[
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
            ],
            &mut p,
        )
        .unwrap();
        // Step 3: the last token of each, as a decode step.
        let got = m
            .forward(
                &[
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
                ],
                &mut p,
            )
            .unwrap();
        assert!(max_diff(got[0].as_ref().unwrap(), &expected_a) < 1e-4);
        assert!(max_diff(got[1].as_ref().unwrap(), &expected_b) < 1e-4);
    }
}
