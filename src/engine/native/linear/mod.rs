//! Linear layers `y = x Wᵀ (+ b)` over all of a step's rows at once, on plain `f32` rows.
//!
//! candle's CPU quantized matmul walks the activation rows one by one and reads the whole weight
//! matrix for each, so a step of 8 decoding sequences read the weights 8 times and a 512-token
//! prefill chunk 512 times; its Q4_1 dot product has no SIMD path at all. Here each task takes a
//! slice of weight rows and dots every activation row against them, in tiles that stay in cache,
//! so the weights cross the memory bus once per step whatever the batch. Every type of the GGUF
//! files people bring (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the Q4_K, Q5_K and Q6_K of `Q4_K_M`,
//! `Q5_K_M` and `Q6_K` files) has an AVX2 kernel that decodes each weight block once for up to
//! eight activation rows, taken from a group of eight rows interleaved block by block. Before
//! the K-quant and Q5 kernels, a shipped Qwen2.5-0.5B `Q4_K_M` prefilled at 45 tokens/s through
//! candle's per-block code; 78-88 now on a Zen 3 core pair (`docs/performance.md`).
//! Other GGUF types (Q2_K, Q3_K) use candle's block dot products with the same row reuse; dense
//! weights go through candle's gemm.
//!
//! The layer API is here; the parts live beside it: `blocks` (the GGUF block formats, the
//! `Block` trait and the scalar decoding), `matmul` (activation quantization and the tiled,
//! parallel driver), `avx` (the AVX2 block kernels) and `candle` (the tensor path's weights and
//! the other GGUF types through candle's block dot products).

#[cfg(target_feature = "avx2")]
mod avx;
mod blocks;
mod candle;
mod matmul;

use anyhow::{bail, Context};
use candle_core::quantized::{k_quants, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use blocks::{
    block_bytes, cast_blocks, Block, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0,
    BlockQ5_1, BlockQ6K, BlockQ8_0,
};
pub(crate) use candle::CandleWeight;
use candle::{ggml, GgmlRows};
use matmul::quantized_rows;

/// Activation rows are quantized in blocks of this many values, as the weights are.
const QK: usize = 32;

pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    /// Output features.
    pub(crate) n: usize,
    /// Input features.
    pub(crate) k: usize,
}

/// The block types our kernels run, each a `repr(C)` mirror of its GGUF layout: the `Weight`
/// variants, the loader, fusion and the candle hand-over are generated from this one list.
macro_rules! native_blocks {
    ($($variant:ident: $block:ty),* $(,)?) => {
        enum Weight {
            $($variant(Vec<$block>),)*
            /// Any other GGUF block type, through candle's per-block dot products.
            Ggml(Box<dyn GgmlRows>),
            /// `[n, k]` f32.
            Dense(Tensor),
        }

        impl Weight {
            /// Our blocks for `dtype`, or `None` when no kernel of ours takes it.
            fn native(dtype: GgmlDType, bytes: &[u8], k: usize) -> anyhow::Result<Option<Weight>> {
                Ok(match dtype {
                    $(GgmlDType::$variant if k % (QK * <$block>::ACTS) == 0 => {
                        Some(Weight::$variant(cast_blocks(bytes)?))
                    })*
                    _ => None,
                })
            }

            fn forward_native(&self, x: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
                match self {
                    $(Weight::$variant(w) => Some(quantized_rows(w, x, m, k, n)),)*
                    _ => None,
                }
            }

            /// The block type and GGUF bytes of our blocks.
            fn native_bytes(&self) -> Option<(GgmlDType, &[u8])> {
                match self {
                    // SAFETY: our block types have no padding (sizes asserted below).
                    $(Weight::$variant(b) => Some((GgmlDType::$variant, unsafe { block_bytes(b) })),)*
                    _ => None,
                }
            }

            /// The parts' blocks concatenated; `None` unless all are our blocks of one type.
            fn concat(parts: &[&Weight]) -> Option<Weight> {
                match parts[0] {
                    $(Weight::$variant(_) => {
                        let mut all = Vec::new();
                        for p in parts {
                            match p {
                                Weight::$variant(b) => all.extend_from_slice(b),
                                _ => return None,
                            }
                        }
                        Some(Weight::$variant(all))
                    })*
                    _ => None,
                }
            }
        }
    };
}

native_blocks! {
    Q4_0: BlockQ4_0,
    Q4_1: BlockQ4_1,
    Q5_0: BlockQ5_0,
    Q5_1: BlockQ5_1,
    Q8_0: BlockQ8_0,
    Q4K: BlockQ4K,
    Q5K: BlockQ5K,
    Q6K: BlockQ6K,
}

impl Linear {
    pub(crate) fn from_qtensor(t: &QTensor, bias: Option<Vec<f32>>) -> anyhow::Result<Self> {
        let (n, k) = t.shape().dims2().context("a linear weight is 2-D")?;
        let bytes = t.data()?;
        let weight = match Weight::native(t.dtype(), &bytes, k)? {
            Some(w) => w,
            None => match t.dtype() {
                GgmlDType::Q2K => ggml::<k_quants::BlockQ2K>(&bytes, n, k)?,
                GgmlDType::Q3K => ggml::<k_quants::BlockQ3K>(&bytes, n, k)?,
                GgmlDType::Q8K => ggml::<k_quants::BlockQ8K>(&bytes, n, k)?,
                _ => Weight::Dense(t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?),
            },
        };
        Self::check_bias(&bias, n)?;
        Ok(Self { weight, bias, n, k })
    }

    /// A dense `[n, k]` weight.
    pub(crate) fn dense(w: Tensor, bias: Option<Vec<f32>>) -> anyhow::Result<Self> {
        let (n, k) = w.dims2()?;
        Self::check_bias(&bias, n)?;
        Ok(Self {
            weight: Weight::Dense(w.to_dtype(DType::F32)?.contiguous()?),
            bias,
            n,
            k,
        })
    }

    fn check_bias(bias: &Option<Vec<f32>>, n: usize) -> anyhow::Result<()> {
        match bias {
            Some(b) if b.len() != n => bail!("bias of {} for {n} outputs", b.len()),
            _ => Ok(()),
        }
    }

    /// Several layers reading the same input as one (q/k/v; gate/up): one pass over the input,
    /// one parallel dispatch. `None` when their weight types differ.
    pub(crate) fn fuse(parts: &[Linear]) -> Option<Linear> {
        let k = parts[0].k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let n = parts.iter().map(|p| p.n).sum();
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            let mut b = Vec::with_capacity(n);
            for p in parts {
                match &p.bias {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.extend(std::iter::repeat_n(0.0, p.n)),
                }
            }
            Some(b)
        } else {
            None
        };
        let weight = match &parts[0].weight {
            Weight::Dense(_) => {
                let all: Option<Vec<Tensor>> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        Weight::Dense(w) => Some(w.clone()),
                        _ => None,
                    })
                    .collect();
                Weight::Dense(Tensor::cat(&all?, 0).ok()?)
            }
            Weight::Ggml(_) => return None,
            _ => Weight::concat(&parts.iter().map(|p| &p.weight).collect::<Vec<_>>())?,
        };
        Some(Linear { weight, bias, n, k })
    }

    /// This layer with its dense weight quantized to `dtype`: `--quantize` for safetensors
    /// checkpoints, and the tests' way to run the quantized kernels on the tiny model.
    pub(crate) fn quantized(&self, dtype: GgmlDType) -> anyhow::Result<Linear> {
        let Weight::Dense(w) = &self.weight else {
            bail!("only a dense layer can be quantized");
        };
        Linear::from_qtensor(&QTensor::quantize(w, dtype)?, self.bias.clone())
    }

    /// Bytes the weight and bias hold in memory.
    pub(crate) fn resident_bytes(&self) -> usize {
        let w = match &self.weight {
            Weight::Ggml(g) => g.raw().1.len(),
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            w => w.native_bytes().map_or(0, |(_, b)| b.len()),
        };
        w + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `x` is `[m, k]` row-major; the result is `[m, n]`.
    pub(crate) fn forward(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let m = x.len() / self.k;
        debug_assert_eq!(m * self.k, x.len());
        let mut y = match &self.weight {
            Weight::Ggml(w) => w.forward(x, m, self.k, self.n),
            Weight::Dense(w) => {
                let x = Tensor::from_slice(x, (m, self.k), &Device::Cpu)?;
                x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?
            }
            w => w
                .forward_native(x, m, self.k, self.n)
                .expect("every other weight is one of our block types"),
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.n) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        Ok(y)
    }
}

/// Layers that read the same input (q/k/v; gate/up), run as one layer when their weight types
/// allow it.
pub(crate) struct Group {
    widths: Vec<usize>,
    run: GroupRun,
}

enum GroupRun {
    Fused(Linear),
    Separate(Vec<Linear>),
}

impl Group {
    pub(crate) fn new(parts: Vec<Linear>) -> Self {
        let widths = parts.iter().map(|p| p.n).collect();
        let run = match Linear::fuse(&parts) {
            Some(l) => GroupRun::Fused(l),
            None => GroupRun::Separate(parts),
        };
        Self { widths, run }
    }

    #[cfg(test)]
    pub(crate) fn quantized(&self, dtype: GgmlDType) -> anyhow::Result<Group> {
        let run = match &self.run {
            GroupRun::Fused(l) => GroupRun::Fused(l.quantized(dtype)?),
            GroupRun::Separate(p) => GroupRun::Separate(
                p.iter()
                    .map(|l| l.quantized(dtype))
                    .collect::<anyhow::Result<_>>()?,
            ),
        };
        Ok(Group {
            widths: self.widths.clone(),
            run,
        })
    }

    /// The layers to run and the output width of each part: one fused layer whose output splits
    /// at `widths`, or one layer per part.
    pub(crate) fn layers(&self) -> (&[usize], &[Linear]) {
        match &self.run {
            GroupRun::Fused(l) => (&self.widths, std::slice::from_ref(l)),
            GroupRun::Separate(p) => (&self.widths, p),
        }
    }

    /// Bytes the group's weights and biases hold in memory.
    pub(crate) fn resident_bytes(&self) -> usize {
        self.layers().1.iter().map(Linear::resident_bytes).sum()
    }

    /// One `[m, n_i]` output per part.
    pub(crate) fn forward(&self, x: &[f32]) -> candle_core::Result<Vec<Vec<f32>>> {
        match &self.run {
            GroupRun::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            GroupRun::Fused(l) => {
                let y = l.forward(x)?;
                let m = y.len() / l.n;
                let mut out: Vec<Vec<f32>> = self
                    .widths
                    .iter()
                    .map(|w| Vec::with_capacity(m * w))
                    .collect();
                for row in y.chunks_exact(l.n) {
                    let mut at = 0;
                    for (o, w) in out.iter_mut().zip(&self.widths) {
                        o.extend_from_slice(&row[at..at + w]);
                        at += w;
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    pub(super) fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every block type we decode, with the input width its blocks need.
    pub(super) const OURS: [(GgmlDType, usize); 8] = [
        (GgmlDType::Q4_0, 128),
        (GgmlDType::Q4_1, 128),
        (GgmlDType::Q5_0, 128),
        (GgmlDType::Q5_1, 128),
        (GgmlDType::Q8_0, 128),
        (GgmlDType::Q4K, 512),
        (GgmlDType::Q5K, 512),
        (GgmlDType::Q6K, 512),
    ];

    /// Our kernels against candle's dequantize-then-matmul, for every batch shape the engine
    /// uses (1 row, a multiple of 4, a ragged remainder, a prefill chunk).
    #[test]
    fn quantized_kernels_match_candle() {
        let n = 72;
        for (dtype, k) in OURS
            .into_iter()
            .chain([(GgmlDType::F16, 128), (GgmlDType::Q3K, 256)])
        {
            let w = Tensor::from_vec(data(n * k, 1), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = Linear::from_qtensor(&q, None).unwrap();
            let native = ours.weight.native_bytes().is_some();
            assert_eq!(native, OURS.iter().any(|(t, _)| *t == dtype), "{dtype:?}");
            let reference = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 4, 7, 33] {
                let x = data(m * k, m as u32 + 7);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let want: Vec<f32> = reference
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = ours.forward(&x).unwrap();
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 0.02 * scale,
                        "{dtype:?} m={m} [{i}]: ours {g} candle {w}"
                    );
                }
            }
        }
    }

    /// A row's result is bit-identical whether it runs alone or in a batch (with 8-row, 4-row and
    /// remainder paths), so batching never changes a greedy output.
    #[test]
    fn quantized_rows_do_not_depend_on_the_batch() {
        // Seven blocks of 32: the one-row kernel's four-block steps and a tail of three.
        let (n, k) = (43, 224);
        let w = Tensor::from_vec(data(n * k, 5), (n, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q3K,
        ] {
            let k = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q3K) {
                256
            } else {
                k
            };
            let w = if k == 224 {
                w.clone()
            } else {
                Tensor::from_vec(data(n * k, 6), (n, k), &Device::Cpu).unwrap()
            };
            let lin = Linear::from_qtensor(&QTensor::quantize(&w, dtype).unwrap(), None).unwrap();
            // Two 8-row groups then a tail of 5 (an 8-row kernel over 3 zero padding rows), 3 and
            // 2 rows (a 4-row kernel over padding), and a tail of one.
            for m in [21, 19, 3, 2, 17] {
                let x = data(m * k, 8);
                let batched = lin.forward(&x).unwrap();
                for r in 0..m {
                    let alone = lin.forward(&x[r * k..(r + 1) * k]).unwrap();
                    assert_eq!(
                        &batched[r * n..(r + 1) * n],
                        &alone[..],
                        "{dtype:?} row {r} of {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_layers_equal_their_parts_and_keep_biases() {
        let k = 64;
        let parts: Vec<(usize, Option<Vec<f32>>)> =
            vec![(32, Some(data(32, 3))), (16, None), (32, Some(data(32, 4)))];
        let make = |seed: u32, n: usize, b: Option<Vec<f32>>| {
            let w = Tensor::from_vec(data(n * k, seed), (n, k), &Device::Cpu).unwrap();
            Linear::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap(), b).unwrap()
        };
        let x = data(3 * k, 9);
        let separate: Vec<Vec<f32>> = parts
            .iter()
            .enumerate()
            .map(|(i, (n, b))| make(i as u32, *n, b.clone()).forward(&x).unwrap())
            .collect();
        let layers: Vec<Linear> = parts
            .iter()
            .enumerate()
            .map(|(i, (n, b))| make(i as u32, *n, b.clone()))
            .collect();
        let fused = Linear::fuse(&layers).unwrap();
        let y = fused.forward(&x).unwrap();
        for r in 0..3 {
            let row: Vec<f32> = separate
                .iter()
                .zip(&parts)
                .flat_map(|(s, (n, _))| s[r * n..(r + 1) * n].to_vec())
                .collect();
            assert_eq!(&y[r * 80..(r + 1) * 80], &row[..]);
        }
    }
}
