//! The forward pass as candle tensor ops on any device: the native engine's GPU path.
//!
//! `host_model` runs a step with our own CPU kernels over host slices. A GPU needs the same step as
//! device kernels, and this file is that step in candle's ops (cuBLAS matmuls, candle's quantized
//! matmul, its rms-norm, rope and softmax kernels) over a KV pool of device tensors with the same
//! slots and block tables as `kv_cache::KvPool` (each slot's keys stored as a row, where the host
//! pool transposes them within a block). The scheduler, block manager and prefix
//! cache are therefore shared unchanged. It runs on the CPU device too, which is how it is checked
//! on machines without a GPU: the tests compare its logits with `host_model`'s.
//!
//! As in `host_model`, the linear layers run once for the whole flattened step, whatever the mix of
//! prefill chunks and decode tokens. All decode rows of a step are attended by one op per layer
//! that reads the KV pool in place through their block tables (`paged_attention`: our kernel on
//! CUDA, its CPU twin here), so a decode step costs the same few ops per layer at any batch size
//! and copies no keys. The reference it is tested against, `DecodeAttention::Gather`, copies the
//! rows' slots out of the pool (`index_select`) into a padded, masked batch first. Each prefill
//! chunk is attended alone, gathered, under a causal mask.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};

use super::host_model::rope_tables;
use super::kv_cache::{slot, BLOCK_SIZE};
use super::linear::{CandleWeight, Group, Linear};
use super::paged_attention;
use super::step::{ForwardPass, Run, Step, StepLogits};
use super::weights::{Config, Weights};

pub(crate) struct TensorModel {
    config: Config,
    dev: Device,
    dtype: DType,
    /// `[vocab, hidden]`.
    embed: Tensor,
    layers: Vec<TensorLayer>,
    norm: Tensor,
    lm_head: TensorLinear,
    /// `[position, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    positions: usize,
    /// Per layer, `[slot, kv_heads * head_dim]` with `slot = block * BLOCK_SIZE + offset`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    decode_attention: DecodeAttention,
}

/// How a step's decode rows read the KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeAttention {
    /// In place, through the block tables (`paged_attention`): the default wherever the head
    /// layout fits the kernel.
    Paged,
    /// Copied out of the pool into a padded batch first: the reference.
    Gather,
}

struct TensorLayer {
    attn_norm: Tensor,
    qkv: TensorGroup,
    o: TensorLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate_up: TensorGroup,
    down: TensorLinear,
}

struct TensorLinear {
    weight: TensorWeight,
    bias: Option<Tensor>,
}

enum TensorWeight {
    /// GGUF blocks, run by candle's quantized matmul (which takes f32 activations).
    Quantized(QMatMul),
    /// `[n, k]` in the model's dtype.
    Dense(Tensor),
}

impl TensorLinear {
    fn new(l: &Linear, dev: &Device, dtype: DType) -> anyhow::Result<Self> {
        let (weight, bias) = l.to_candle(dev)?;
        let weight = match weight {
            CandleWeight::Quantized(q) => TensorWeight::Quantized(QMatMul::from_qtensor(q)?),
            CandleWeight::Dense(w) => TensorWeight::Dense(w.to_dtype(dtype)?),
        };
        let bias = bias.map(|b| vector(b, dev, dtype)).transpose()?;
        Ok(Self { weight, bias })
    }

    /// `x` is `[rows, k]`; the result is `[rows, n]` in `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            TensorWeight::Quantized(q) => {
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
            }
            TensorWeight::Dense(w) => x.matmul(&w.t()?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The layers that read one input (q/k/v; gate/up): fused into one when `linear` fused them.
struct TensorGroup {
    widths: Vec<usize>,
    layers: Vec<TensorLinear>,
}

impl TensorGroup {
    fn new(g: &Group, dev: &Device, dtype: DType) -> anyhow::Result<Self> {
        let (widths, layers) = g.layers();
        Ok(Self {
            widths: widths.to_vec(),
            layers: layers
                .iter()
                .map(|l| TensorLinear::new(l, dev, dtype))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// One `[rows, width]` output per part.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if self.layers.len() == self.widths.len() {
            return self.layers.iter().map(|l| l.forward(x)).collect();
        }
        let y = self.layers[0].forward(x)?;
        let mut at = 0;
        self.widths
            .iter()
            .map(|&w| {
                let part = y.narrow(1, at, w);
                at += w;
                part
            })
            .collect()
    }
}

fn vector(v: &[f32], dev: &Device, dtype: DType) -> Result<Tensor> {
    Tensor::from_slice(v, v.len(), dev)?.to_dtype(dtype)
}

/// A step's attention layout (see `TensorModel::plan_attention`).
struct AttentionPlan {
    chunks: Vec<Chunk>,
    decode: Option<Decode>,
    /// For each flattened row, where its output is in `[decode rows, chunk rows]`; `None` when
    /// that is already the rows' order.
    order: Option<Tensor>,
}

/// A run of several rows, attended alone.
struct Chunk {
    /// The slots of all its positions, cached and new.
    gather: Tensor,
    /// `[len, keys]` f32, added to the scores: 0, or -inf where row j (at position start + j)
    /// would see a later key. Built once per step, not once per layer.
    causal: Tensor,
    /// Its first row in the step and its rows.
    row: usize,
    len: usize,
}

/// All single-row runs of a step, attended as one batch.
struct Decode {
    /// Their rows in the step.
    rows: Tensor,
    batch: usize,
    reads: DecodeReads,
}

enum DecodeReads {
    /// `paged_attention::meta`: context lengths and block tables.
    Paged { meta: Tensor },
    Gather {
        /// `[batch * keys]`: each run's slots for positions `0..keys`, padded past its own end.
        gather: Tensor,
        /// `[batch, 1, keys]` f32, added to the scores: 0, or -inf where a position is padding.
        pad: Tensor,
        keys: usize,
    },
}

impl ForwardPass for TensorModel {
    fn config(&self) -> &Config {
        &self.config
    }

    fn max_positions(&self) -> usize {
        self.positions
    }

    fn forward(&mut self, step: &Step) -> Result<StepLogits> {
        self.forward_step(step)
    }
}

impl TensorModel {
    /// The model's weights on `dev` in `dtype` (quantized layers keep their blocks), with a KV
    /// pool of `blocks` blocks.
    pub(crate) fn new(
        w: &Weights,
        dev: &Device,
        dtype: DType,
        blocks: usize,
    ) -> anyhow::Result<Self> {
        let c = w.config.clone();
        let layers = w
            .layers
            .iter()
            .map(|l| {
                let norm = |n: &Option<Vec<f32>>| n.as_deref().map(|n| vector(n, dev, dtype));
                Ok(TensorLayer {
                    attn_norm: vector(&l.attn_norm, dev, dtype)?,
                    qkv: TensorGroup::new(&l.qkv, dev, dtype)?,
                    o: TensorLinear::new(&l.o, dev, dtype)?,
                    q_norm: norm(&l.q_norm).transpose()?,
                    k_norm: norm(&l.k_norm).transpose()?,
                    ffn_norm: vector(&l.ffn_norm, dev, dtype)?,
                    gate_up: TensorGroup::new(&l.gate_up, dev, dtype)?,
                    down: TensorLinear::new(&l.down, dev, dtype)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let (cos, sin, positions) = rope_tables(&c);
        let half = c.head_dim / 2;
        let slots = blocks * BLOCK_SIZE;
        let width = c.kv_heads * c.head_dim;
        let pool = || Tensor::zeros((slots, width), dtype, dev);
        Ok(Self {
            embed: Tensor::from_slice(&w.embed, (c.vocab, c.hidden), dev)?.to_dtype(dtype)?,
            layers,
            norm: vector(&w.norm, dev, dtype)?,
            lm_head: TensorLinear::new(&w.lm_head, dev, dtype)?,
            cos: Tensor::from_vec(cos, (positions, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (positions, half), dev)?.to_dtype(dtype)?,
            positions,
            k: (0..c.layers).map(|_| pool()).collect::<Result<_>>()?,
            v: (0..c.layers).map(|_| pool()).collect::<Result<_>>()?,
            decode_attention: if paged_attention::supports(c.heads, c.kv_heads, c.head_dim) {
                DecodeAttention::Paged
            } else {
                DecodeAttention::Gather
            },
            config: c,
            dev: dev.clone(),
            dtype,
        })
    }

    /// Selects how decode rows read the pool (the tests and the engine bench compare the two).
    pub(crate) fn with_decode_attention(mut self, how: DecodeAttention) -> Self {
        let c = &self.config;
        if how == DecodeAttention::Gather
            || paged_attention::supports(c.heads, c.kv_heads, c.head_dim)
        {
            self.decode_attention = how;
        }
        self
    }

    fn forward_step(&mut self, step: &Step) -> Result<StepLogits> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.heads, c.kv_heads, c.head_dim);
        let width = kv_heads * d;
        let runs = step.runs;
        let ids = step.ids.clone();
        let positions: Vec<u32> = step.rows.iter().map(|&(_, p)| p as u32).collect();
        let slots: Vec<u32> = step.slots.iter().map(|&s| s as u32).collect();
        let t = ids.len();
        let dev = &self.dev;
        let mut x = self
            .embed
            .index_select(&Tensor::from_vec(ids, t, dev)?, 0)?;
        let pos = Tensor::from_vec(positions, t, dev)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        // scatter_set writes element [i][j] to row index[i][j]: every column of a row goes to
        // that token's slot.
        let write_at = Tensor::from_vec(slots, (t, 1), dev)?
            .broadcast_as((t, width))?
            .contiguous()?;
        let plan = self.plan_attention(runs)?;

        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut qkv = layer.qkv.forward(&h)?.into_iter();
            let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                candle_core::bail!("the q/k/v group has three outputs");
            };
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (
                    candle_nn::ops::rms_norm(&q.reshape((t * heads, d))?, qn, c.rms_eps)?,
                    candle_nn::ops::rms_norm(&k.reshape((t * kv_heads, d))?, kn, c.rms_eps)?,
                ),
                _ => (q, k),
            };
            let q = self.rope(&q.reshape((1, t, heads, d))?, &cos, &sin)?;
            let k = self.rope(&k.reshape((1, t, kv_heads, d))?, &cos, &sin)?;
            self.k[li].scatter_set(&write_at, &k.reshape((t, width))?, 0)?;
            self.v[li].scatter_set(&write_at, &v.contiguous()?, 0)?;
            let q = q.reshape((t, heads, d))?;
            let (k_pool, v_pool) = (&self.k[li], &self.v[li]);
            let mut outs = Vec::with_capacity(plan.chunks.len() + 1);
            if let Some(dec) = &plan.decode {
                outs.push(self.decode_attention(&q, k_pool, v_pool, dec)?);
            }
            for ch in &plan.chunks {
                let q = q.narrow(0, ch.row, ch.len)?;
                outs.push(self.attention(&q, k_pool, v_pool, ch)?);
            }
            let attn = Tensor::cat(&outs, 0)?;
            let attn = match &plan.order {
                Some(order) => attn.index_select(order, 0)?,
                None => attn,
            };
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let mut gate_up = layer.gate_up.forward(&h)?.into_iter();
            let (Some(gate), Some(up)) = (gate_up.next(), gate_up.next()) else {
                candle_core::bail!("the gate/up group has two outputs");
            };
            x = (x + layer.down.forward(&(gate.silu()? * up)?)?)?;
        }

        if step.logit_rows.is_empty() {
            return Ok(step.per_run(std::iter::empty()));
        }
        let last: Vec<u32> = step.logit_rows.iter().map(|&r| r as u32).collect();
        let n = last.len();
        let x = x.index_select(&Tensor::from_vec(last, n, dev)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps)?;
        let logits = self
            .lm_head
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(step.per_run(logits.into_iter()))
    }

    /// The step's attention layout, shared by every layer: single-row runs (decode steps) are
    /// attended together in one batch, padded to the longest context, so a decode step costs a
    /// fixed dozen ops per layer whatever the batch; longer runs (prefill chunks, forced tokens)
    /// are attended one by one.
    fn plan_attention(&self, runs: &[Run]) -> Result<AttentionPlan> {
        let dev = &self.dev;
        let decoding: Vec<usize> = (0..runs.len())
            .filter(|&i| runs[i].tokens.len() == 1)
            .collect();
        let mut chunks = Vec::new();
        // Where each flattened row's output lands in [decode rows, then chunk rows].
        let mut order = Vec::new();
        let mut decode_rows = Vec::new();
        let mut next_chunk_row = decoding.len();
        let mut row = 0;
        for r in runs {
            let len = r.tokens.len();
            if len == 1 {
                order.push(decode_rows.len() as u32);
                decode_rows.push(row as u32);
            } else {
                let keys = r.start + len;
                let slots: Vec<u32> = (0..keys).map(|p| slot(r.table, p) as u32).collect();
                let key_pos = Tensor::arange(0u32, keys as u32, dev)?.reshape((1, keys))?;
                let row_pos =
                    Tensor::arange(r.start as u32, keys as u32, dev)?.reshape((len, 1))?;
                let causal = key_pos.broadcast_gt(&row_pos)?.where_cond(
                    &Tensor::full(f32::NEG_INFINITY, (len, keys), dev)?,
                    &Tensor::zeros((len, keys), DType::F32, dev)?,
                )?;
                chunks.push(Chunk {
                    gather: Tensor::from_vec(slots, keys, dev)?,
                    causal,
                    row,
                    len,
                });
                order.extend((next_chunk_row..next_chunk_row + len).map(|i| i as u32));
                next_chunk_row += len;
            }
            row += len;
        }
        let decode = if decoding.is_empty() {
            None
        } else if self.decode_attention == DecodeAttention::Paged {
            let decoding: Vec<&Run> = decoding.iter().map(|&i| &runs[i]).collect();
            let batch = decoding.len();
            Some(Decode {
                rows: Tensor::from_vec(decode_rows, batch, dev)?,
                batch,
                reads: DecodeReads::Paged {
                    meta: paged_attention::meta(&decoding, dev)?,
                },
            })
        } else {
            let batch = decoding.len();
            let keys = decoding
                .iter()
                .map(|&i| runs[i].start + 1)
                .max()
                .unwrap_or(1);
            let mut gather = Vec::with_capacity(batch * keys);
            let mut pad = Vec::with_capacity(batch * keys);
            for &i in &decoding {
                let r = &runs[i];
                for p in 0..keys {
                    let real = p <= r.start;
                    // Padding reads position 0's slot (always valid) and is masked out.
                    gather.push(slot(r.table, if real { p } else { 0 }) as u32);
                    pad.push(if real { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            Some(Decode {
                rows: Tensor::from_vec(decode_rows, batch, dev)?,
                batch,
                reads: DecodeReads::Gather {
                    gather: Tensor::from_vec(gather, batch * keys, dev)?,
                    pad: Tensor::from_vec(pad, (batch, 1, keys), dev)?,
                    keys,
                },
            })
        };
        let in_order = order.iter().enumerate().all(|(i, &o)| i as u32 == o);
        let order = if in_order {
            None
        } else {
            let n = order.len();
            Some(Tensor::from_vec(order, n, dev)?)
        };
        Ok(AttentionPlan {
            chunks,
            decode,
            order,
        })
    }

    /// Attention of every single-row run at once: `q` is the whole step's `[rows, heads,
    /// head_dim]`; the result is `[decode rows, heads * head_dim]` in run order.
    fn decode_attention(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        dec: &Decode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.heads, c.kv_heads, c.head_dim);
        let q = q.index_select(&dec.rows, 0)?;
        let (gather, pad, keys) = match &dec.reads {
            DecodeReads::Paged { meta } => {
                return paged_attention::decode(&q, k_pool, v_pool, meta, kv_heads)
            }
            DecodeReads::Gather { gather, pad, keys } => (gather, pad, *keys),
        };
        let b = dec.batch;
        let group = heads / kv_heads;
        // `[b * kv_heads, group, d]`: heads `kv * group ..` share KV head `kv`.
        let q = q.reshape((b * kv_heads, group, d))?;
        let cached = |pool: &Tensor| {
            pool.index_select(gather, 0)?
                .reshape((b, keys, kv_heads, d))?
                .permute((0, 2, 1, 3))?
                .reshape((b * kv_heads, keys, d))
        };
        let (k, v) = (cached(k_pool)?, cached(v_pool)?);
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?
            .reshape((b, heads, keys))?
            .broadcast_add(pad)?;
        candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(self.dtype)?
            .reshape((b * kv_heads, group, keys))?
            .matmul(&v)?
            .reshape((b, heads * d))
    }

    /// Rotary embedding of `[1, rows, heads, head_dim]`, each row at its own position (`cos` and
    /// `sin` hold one row per token).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.config.rope_interleaved {
            // GGUF Llama rotates adjacent pairs; candle's kernel for that wants heads first.
            let x = x.transpose(1, 2)?.contiguous()?;
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
                .transpose(1, 2)?
                .contiguous()
        } else {
            candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)
        }
    }

    /// Causal attention of one chunk's new rows (`q`: `[len, heads, head_dim]`) over all its
    /// positions, read from the pool at the chunk's slots. Returns `[len, heads * head_dim]`.
    fn attention(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        chunk: &Chunk,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.heads, c.kv_heads, c.head_dim);
        let group = heads / kv_heads;
        let len = chunk.len;
        let gather = &chunk.gather;
        let keys = gather.dim(0)?;
        // Heads `kv * group .. (kv + 1) * group` share KV head `kv`: fold the group into rows.
        let q = q
            .reshape((len, kv_heads, group, d))?
            .permute((1, 2, 0, 3))?
            .reshape((kv_heads, group * len, d))?;
        let cached = |pool: &Tensor| {
            pool.index_select(gather, 0)?
                .reshape((keys, kv_heads, d))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k, v) = (cached(k_pool)?, cached(v_pool)?);
        let scale = 1.0 / (d as f64).sqrt();
        // Scores and softmax in f32 whatever the model's dtype.
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?
            .reshape((kv_heads, group, len, keys))?
            .broadcast_add(&chunk.causal)?
            .reshape((kv_heads, group * len, keys))?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        p.matmul(&v)?
            .reshape((kv_heads, group, len, d))?
            .permute((2, 0, 1, 3))?
            .reshape((len, heads * d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::native::host_model::batch_tests::{max_diff, table, tiny_weights, tokens};
    use crate::engine::native::host_model::HostModel;
    use crate::engine::native::kv_cache::KvPool;
    use candle_core::quantized::GgmlDType;

    use crate::engine::native::paged_attention::test_device as device;

    fn weights(quantize: Option<GgmlDType>) -> Weights {
        let w = tiny_weights();
        match quantize {
            Some(q) => w.quantized(q).unwrap(),
            None => w,
        }
    }

    /// The largest difference, relative to the largest logit of `b`.
    fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
        max_diff(a, b) / b.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// Three sequences of different lengths, each prefilled in two chunks (the second chunk of
    /// one beside the first of another) and then decoded one token, through both forward paths.
    /// Returns the logits of every step that produced them: `[path][step][run]`.
    fn mixed_steps(host: &HostModel, dev: &mut TensorModel) -> [Vec<Vec<f32>>; 2] {
        mixed_steps_of(host, dev, [tokens(1, 37), tokens(2, 9), tokens(3, 20)])
    }

    /// `mixed_steps` on given sequences of (at least) 37, 9 and 20 tokens.
    fn mixed_steps_of(
        host: &HostModel,
        dev: &mut TensorModel,
        seqs: [Vec<u32>; 3],
    ) -> [Vec<Vec<f32>>; 2] {
        let c = host.config();
        let mut pool = KvPool::new(c.layers, c.kv_heads, c.head_dim, 64);
        let tables = [table(0, 38), table(10, 10), table(20, 21)];
        let run = |i: usize, from: usize, to: usize, logits: bool| Run {
            tokens: &seqs[i][from..to],
            start: from,
            table: &tables[i],
            wants_logits: logits,
        };
        let steps: Vec<Vec<Run>> = vec![
            vec![run(0, 0, 17, false), run(1, 0, 9, true)],
            vec![run(0, 17, 37, true), run(2, 0, 11, false)],
            vec![run(2, 11, 20, true), run(1, 8, 9, true)],
            // Decode rows of different context lengths, batched and padded, around a chunk.
            vec![
                run(0, 36, 37, true),
                run(2, 18, 20, true),
                run(1, 8, 9, true),
            ],
        ];
        let mut out = [Vec::new(), Vec::new()];
        for step in &steps {
            let a = host.forward(&Step::new(step), &mut pool).unwrap();
            let b = dev.run(step).unwrap();
            for (got, path) in [a, b].into_iter().zip(out.iter_mut()) {
                path.extend(got.into_iter().flatten());
            }
        }
        out
    }

    fn compare(quantize: Option<GgmlDType>, dtype: DType, tolerance: f32) {
        compare_weights(weights(quantize), dtype, tolerance);
    }

    /// Both decode paths (paged, and the gather reference) against the CPU kernels.
    fn compare_weights(w: Weights, dtype: DType, tolerance: f32) {
        let paths = [DecodeAttention::Paged, DecodeAttention::Gather].map(|how| {
            let dev = TensorModel::new(&w, &device(), dtype, 64)
                .unwrap()
                .with_decode_attention(how);
            assert_eq!(dev.decode_attention, how);
            (how, dev)
        });
        let host = HostModel::new(w);
        for (how, mut dev) in paths {
            let [a, b] = mixed_steps(&host, &mut dev);
            assert_eq!(a.len(), 7);
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                let diff = rel_diff(y, x);
                assert!(diff < tolerance, "{how:?} {dtype:?}: {diff}");
            }
            // The sequences differ, so agreeing is not vacuous.
            assert!(rel_diff(&a[0], &a[1]) > 1e-2);
        }
    }

    #[test]
    fn dense_f32_matches_the_cpu_kernels() {
        compare(None, DType::F32, 1e-5);
    }

    /// The Llama switches: no q/k norms, RoPE on adjacent pairs (GGUF Llama's layout).
    #[test]
    fn llama_layout_matches_the_cpu_kernels() {
        let mut w = weights(None);
        w.config.rope_interleaved = true;
        for l in &mut w.layers {
            l.q_norm = None;
            l.k_norm = None;
        }
        compare_weights(w, DType::F32, 1e-5);
    }

    #[test]
    fn quantized_weights_match_the_cpu_kernels() {
        // Both sides quantize activations to 8 bits, with different rounding.
        compare(Some(GgmlDType::Q8_0), DType::F32, 1e-2);
        compare(Some(GgmlDType::Q4_1), DType::F32, 1e-2);
    }

    /// A half type through the whole path (the casts around the quantized matmul and the f32
    /// softmax included). The GPU runs bf16; candle's CPU matmul has no bf16, so f16 stands in.
    #[test]
    fn half_precision_stays_close_to_f32() {
        compare(None, DType::F16, 1e-2);
        compare(Some(GgmlDType::Q8_0), DType::F16, 1e-2);
    }

    /// SmolLM2's GGUF (Llama, Q4_1, 30 layers, GQA 9:3): both paths give close logits and the
    /// same greedy token over a mixed step schedule.
    #[test]
    fn smollm2_matches_the_cpu_kernels() {
        let Some(path) = crate::test_files::cached(
            "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "smollm2_matches_the_cpu_kernels",
            "--smollm2",
        ) else {
            return;
        };
        let (w, content) = Weights::from_gguf(&path).unwrap();
        let (tokenizer, _) = crate::engine::native::tokenizer::from_gguf(&content).unwrap();
        // Real text, so the model is confident and the greedy token is not a near-tie.
        let encode = |text: &str, n: usize| {
            let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
            assert!(ids.len() >= n, "{} tokens: {text}", ids.len());
            ids[..n].to_vec()
        };
        let seqs = [
            encode(
                "The user said they moved to Berlin last spring and now work as a nurse at \
                 the city hospital. They like cycling to work and cooking Italian food on \
                 weekends, and their favourite dish is lasagne with a glass of red wine",
                37,
            ),
            encode("My name is Alex and I live in the", 9),
            encode(
                "Q: What is the capital of France? A: The capital of France is Paris. Q: What \
                 is the capital of",
                20,
            ),
        ];
        let mut dev = TensorModel::new(&w, &device(), DType::F32, 64).unwrap();
        let host = HostModel::new(w);
        let [a, b] = mixed_steps_of(&host, &mut dev, seqs);
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
                .0
        };
        for (x, y) in a.iter().zip(&b) {
            // Both quantize activations to 8 bits for Q4_1, with different rounding; over 30
            // layers that moves logits by up to ~5% of the largest (each path is 3-4% from
            // the exact product with the dequantized weights).
            assert!(rel_diff(y, x) < 8e-2, "{}", rel_diff(y, x));
            assert_eq!(argmax(x), argmax(y));
        }
    }

    /// Reusing cached positions: a prompt's second half, run after its first half was written
    /// by another step, gives the one-shot logits.
    #[test]
    fn a_cached_prefix_is_read_back_through_the_block_table() {
        let w = weights(None);
        let mut dev = TensorModel::new(&w, &device(), DType::F32, 16).unwrap();
        let s = tokens(9, 40);
        let t = [5u32, 2, 7];
        let one_shot = dev
            .run(&[Run {
                tokens: &s,
                start: 0,
                table: &t,
                wants_logits: true,
            }])
            .unwrap()
            .remove(0)
            .unwrap();
        let mut fresh = TensorModel::new(&w, &device(), DType::F32, 16).unwrap();
        let t2 = [3u32, 11, 0];
        for (from, to) in [(0, 32), (32, 40)] {
            let got = fresh
                .run(&[Run {
                    tokens: &s[from..to],
                    start: from,
                    table: &t2,
                    wants_logits: to == 40,
                }])
                .unwrap()
                .remove(0);
            if let Some(l) = got {
                assert!(rel_diff(&l, &one_shot) < 1e-5);
            }
        }
    }
}
