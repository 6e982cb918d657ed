//! Linear layers `y = x Wᵀ (+ b)` over all of a step's rows at once, on plain `f32` rows.
//!
//! candle's CPU quantized matmul walks the activation rows one by one and reads the whole weight
//! matrix for each, so a step of 8 decoding sequences read the weights 8 times and a 512-token
//! prefill chunk 512 times; its Q4_1 dot product has no SIMD path at all. Here each task takes a
//! slice of weight rows and dots every activation row against them, in tiles that stay in cache,
//! so the weights cross the memory bus once per step whatever the batch. Every type of the GGUF
//! files people bring (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the Q4_K, Q5_K and Q6_K of `Q4_K_M`,
//! `Q5_K_M` and `Q6_K` files) has an AVX2 kernel that decodes each weight block once for four
//! activation rows. Before the K-quant and Q5 kernels, a shipped Qwen2.5-0.5B `Q4_K_M` prefilled
//! at 45 tokens/s through candle's per-block code against 61-65 now (`docs/performance.md`).
//! Other GGUF types (Q2_K, Q3_K) use candle's block dot products with the same row reuse; dense
//! weights go through candle's gemm.

use anyhow::{bail, Context};
use candle_core::quantized::{k_quants, GgmlDType, GgmlType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

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

/// A linear layer's weight as candle holds it, for the tensor path (`tensor_model`): GGUF blocks
/// keep their bytes and type, dense weights stay a tensor.
pub(crate) enum CandleWeight {
    Quantized(QTensor),
    Dense(Tensor),
}

impl Linear {
    /// The weight and bias in candle's types on `dev` (the same bytes, so the same model).
    pub(crate) fn to_candle(&self, dev: &Device) -> anyhow::Result<(CandleWeight, Option<&[f32]>)> {
        let q = |dtype: GgmlDType, bytes: &[u8]| -> anyhow::Result<CandleWeight> {
            Ok(CandleWeight::Quantized(
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    bytes,
                    vec![self.n, self.k],
                    dev,
                )?,
            ))
        };
        let weight = match &self.weight {
            Weight::Ggml(w) => {
                let (dtype, bytes) = w.raw();
                q(dtype, bytes)?
            }
            Weight::Dense(w) => CandleWeight::Dense(w.to_device(dev)?),
            w => {
                let (dtype, bytes) = w.native_bytes().expect("one of our block types");
                q(dtype, bytes)?
            }
        };
        Ok((weight, self.bias.as_deref()))
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

/// The GGUF bytes of blocks held as `repr(C)` mirrors of the GGUF layout (the inverse of
/// `cast_blocks` and `ggml`).
///
/// # Safety
/// `T` must have no padding, so that its memory is exactly its GGUF bytes: true of our block
/// types (their sizes are asserted equal to the GGUF block sizes below) and of candle's.
unsafe fn block_bytes<T>(blocks: &[T]) -> &[u8] {
    // SAFETY: every byte of a padding-free `T` is initialised; the slice covers exactly them.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

/// Reinterpret GGUF bytes as blocks of our own `repr(C)` types (copied: the bytes need not be
/// aligned).
fn cast_blocks<B: Block>(bytes: &[u8]) -> anyhow::Result<Vec<B>> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        bail!("{} bytes are not whole {size}-byte blocks", bytes.len());
    }
    let count = bytes.len() / size;
    let mut out: Vec<B> = Vec::with_capacity(count);
    // SAFETY: `B` is a plain-old-data `repr(C)` block (integers only) for which every bit
    // pattern is valid; `count * size` bytes are copied into the reserved capacity.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, count * size);
        out.set_len(count);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Our kernels: GGUF weight blocks against activations quantized to 8 bits in blocks of 32.
//
// Every type we run splits into 32-value sub-blocks whose values are `d*q + m` with small
// unsigned `q` (Q4_0/Q4_1/Q5_0/Q5_1, and Q4_K/Q5_K with a scale and min per sub-block), or
// `d*q` with signed `q` (Q8_0, and Q6_K with one scale per 16 values). A sub-block against the
// activation block `a*p` is then `d a Σ q p + m Σ a p`: one `maddubs` and one FMA per row, and a
// 256-value K-quant superblock is eight such sub-blocks against eight activation blocks.

/// Weight block layouts exactly as GGUF stores them (scales as f16 bits).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ4_0 {
    d: u16,
    qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; QK / 2],
}
/// Bit `i` of `qh` is the fifth bit of value `i`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ5_0 {
    d: u16,
    qh: [u8; 4],
    qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ5_1 {
    d: u16,
    m: u16,
    qh: [u8; 4],
    qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ8_0 {
    d: u16,
    qs: [i8; QK],
}
/// 256 values: eight sub-blocks with 6-bit scales and mins packed in `scales`; sub-block `2c`
/// is the low nibbles of `qs[32c..32c + 32]`, `2c + 1` their high nibbles.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ4K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; 128],
}
/// Q4_K plus a fifth bit: bit `s` of `qh[l]` belongs to value `l` of sub-block `s`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ5K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qh: [u8; 32],
    qs: [u8; 128],
}
/// 256 values of 6 bits (minus 32), in two halves of 128: in half `h`, value `32t + l` takes
/// its low 4 bits from `ql[64h + l]` (t = 0, 2) or `ql[64h + 32 + l]` (t = 1, 3), the low or
/// high nibble as `t < 2`, and bits `2t..2t+2` of `qh[32h + l]`; one i8 scale per 16 values.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlockQ6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

/// 32 activation values of a block, as `d * qs[i]` (`d` is in the row's `ds`): one aligned
/// load. The values sit apart from their scales so that a row's blocks are dense: with the
/// scales inside, a block took a whole 64-byte line (aligned) or most loads crossed a line
/// (40 bytes unaligned), and a 16-row activation tile of a 896-wide input no longer fitted L1
/// beside the streaming weights.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct ActValues([i8; QK]);

/// One quantized activation row: block `b` is `ds[b][0] * qs[b]`, and `ds[b][1]` is
/// `ds[b][0] * Σ qs[b]` (what an offset or a min multiplies).
#[derive(Clone, Copy)]
struct ActRow<'a> {
    qs: &'a [ActValues],
    ds: &'a [[f32; 2]],
}

/// A step's activations quantized in blocks of `QK`, row after row.
struct Acts {
    qs: Vec<ActValues>,
    ds: Vec<[f32; 2]>,
    /// Blocks per row.
    kb: usize,
}

impl Acts {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let mut qs = vec![ActValues([0; QK]); m * kb];
        let mut ds = vec![[0f32; 2]; m * kb];
        if m >= 16 {
            qs.par_chunks_mut(kb)
                .zip(ds.par_chunks_mut(kb))
                .zip(x.par_chunks(k))
                .for_each(|((q, d), x)| quantize_row(x, q, d));
        } else {
            for ((q, d), x) in qs.chunks_mut(kb).zip(ds.chunks_mut(kb)).zip(x.chunks(k)) {
                quantize_row(x, q, d);
            }
        }
        Self { qs, ds, kb }
    }

    fn row(&self, r: usize) -> ActRow<'_> {
        let b = r * self.kb..(r + 1) * self.kb;
        ActRow {
            qs: &self.qs[b.clone()],
            ds: &self.ds[b],
        }
    }
}

fn quantize_row(x: &[f32], qs: &mut [ActValues], ds: &mut [[f32; 2]]) {
    for ((b, d), xs) in qs.iter_mut().zip(ds).zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.0.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        *d = [scale, scale * sum as f32];
    }
}

#[cfg(any(test, not(target_feature = "avx2")))]
fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K superblock.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A weight block type with a dot product against activation blocks, for 1 and 4 rows.
trait Block: Copy + Send + Sync {
    /// Activation blocks (of `QK` values) one weight block spans.
    const ACTS: usize = 1;
    fn dot(w: &[Self], x: ActRow) -> f32;
    /// Four activation rows against one weight row: each weight block is decoded once.
    fn dot4(w: &[Self], x: [ActRow; 4]) -> [f32; 4] {
        x.map(|x| Self::dot(w, x))
    }
    /// Eight activation rows against one weight row.
    fn dot8(w: &[Self], x: [ActRow; 8]) -> [f32; 8] {
        x.map(|x| Self::dot(w, x))
    }
    /// The block's values (`ACTS * QK` of them): the layout as the kernels read it, checked
    /// against candle's dequantization and used where AVX2 is missing.
    #[cfg(any(test, not(target_feature = "avx2")))]
    fn values(&self, out: &mut [f32]);
}

/// Every block type's kernels: AVX2 where the build has it, else through `values`.
macro_rules! kernels {
    ($($block:ty => $rows:ident $(, acts = $acts:expr)?;)*) => {$(
        impl Block for $block {
            $(const ACTS: usize = $acts;)?
            #[cfg(target_feature = "avx2")]
            fn dot(w: &[Self], x: ActRow) -> f32 {
                // SAFETY: compiled only where AVX2 is enabled for the whole crate; `x` spans
                // `w` (the caller slices both from one row).
                unsafe { avx::$rows::<1>(w, [x])[0] }
            }
            #[cfg(target_feature = "avx2")]
            fn dot4(w: &[Self], x: [ActRow; 4]) -> [f32; 4] {
                unsafe { avx::$rows::<4>(w, x) }
            }
            #[cfg(target_feature = "avx2")]
            fn dot8(w: &[Self], x: [ActRow; 8]) -> [f32; 8] {
                unsafe { avx::$rows::<8>(w, x) }
            }
            #[cfg(not(target_feature = "avx2"))]
            fn dot(w: &[Self], x: ActRow) -> f32 {
                let mut v = [0f32; QK * 8];
                let v = &mut v[..QK * Self::ACTS];
                let mut sum = 0.0;
                let acts = x.qs.chunks_exact(Self::ACTS).zip(x.ds.chunks_exact(Self::ACTS));
                for (b, (qs, ds)) in w.iter().zip(acts) {
                    b.values(v);
                    for ((vs, q), d) in v.chunks_exact(QK).zip(qs).zip(ds) {
                        let s: f32 = vs.iter().zip(&q.0).map(|(&v, &q)| v * q as f32).sum();
                        sum += s * d[0];
                    }
                }
                sum
            }
            #[cfg(any(test, not(target_feature = "avx2")))]
            fn values(&self, out: &mut [f32]) {
                values::$rows(self, out)
            }
        }
    )*};
}

kernels! {
    BlockQ4_0 => q4_0;
    BlockQ4_1 => q4_1;
    BlockQ5_0 => q5_0;
    BlockQ5_1 => q5_1;
    BlockQ8_0 => q8_0;
    BlockQ4K => q4k, acts = 8;
    BlockQ5K => q5k, acts = 8;
    BlockQ6K => q6k, acts = 8;
}

/// Scalar decoding of each block type, written from the GGUF layouts above.
#[cfg(any(test, not(target_feature = "avx2")))]
mod values {
    use super::*;

    fn nibbles(qs: &[u8; QK / 2]) -> impl Iterator<Item = u8> + '_ {
        qs.iter().map(|q| q & 0x0F).chain(qs.iter().map(|q| q >> 4))
    }
    fn fifth(qh: &[u8; 4], i: usize) -> u8 {
        ((u32::from_le_bytes(*qh) >> i) & 1) as u8 * 16
    }
    pub(crate) fn q4_0(b: &BlockQ4_0, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(nibbles(&b.qs)) {
            *o = f16(b.d) * (q as f32 - 8.0);
        }
    }
    pub(crate) fn q4_1(b: &BlockQ4_1, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(nibbles(&b.qs)) {
            *o = f16(b.d) * q as f32 + f16(b.m);
        }
    }
    pub(crate) fn q5_0(b: &BlockQ5_0, out: &mut [f32]) {
        for (i, (o, q)) in out.iter_mut().zip(nibbles(&b.qs)).enumerate() {
            *o = f16(b.d) * ((q | fifth(&b.qh, i)) as f32 - 16.0);
        }
    }
    pub(crate) fn q5_1(b: &BlockQ5_1, out: &mut [f32]) {
        for (i, (o, q)) in out.iter_mut().zip(nibbles(&b.qs)).enumerate() {
            *o = f16(b.d) * (q | fifth(&b.qh, i)) as f32 + f16(b.m);
        }
    }
    pub(crate) fn q8_0(b: &BlockQ8_0, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(&b.qs) {
            *o = f16(b.d) * q as f32;
        }
    }
    fn k4(d: u16, dmin: u16, scales: &[u8; 12], q: impl Fn(usize, usize) -> u8, out: &mut [f32]) {
        for (s, sub) in out.chunks_exact_mut(QK).enumerate() {
            let (sc, m) = scale_min_k4(s, scales);
            for (l, o) in sub.iter_mut().enumerate() {
                *o = f16(d) * sc as f32 * q(s, l) as f32 - f16(dmin) * m as f32;
            }
        }
    }
    pub(crate) fn q4k(b: &BlockQ4K, out: &mut [f32]) {
        k4(
            b.d,
            b.dmin,
            &b.scales,
            |s, l| (b.qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F,
            out,
        )
    }
    pub(crate) fn q5k(b: &BlockQ5K, out: &mut [f32]) {
        let q = |s: usize, l: usize| {
            ((b.qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F) | (((b.qh[l] >> s) & 1) << 4)
        };
        k4(b.d, b.dmin, &b.scales, q, out)
    }
    pub(crate) fn q6k(b: &BlockQ6K, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let (h, t, l) = (i / 128, (i % 128) / 32, i % 32);
            let low = b.ql[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2)) & 0x0F;
            let high = (b.qh[32 * h + l] >> (2 * t)) & 3;
            let q = (low | high << 4) as i32 - 32;
            *o = f16(b.d) * b.scales[8 * h + 2 * t + l / 16] as f32 * q as f32;
        }
    }
}

#[cfg(target_feature = "avx2")]
mod avx {
    use super::*;
    use std::arch::x86_64::*;

    /// One f16 by F16C (the crate-level `f16` goes through `half`'s checks).
    #[inline(always)]
    unsafe fn f16(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Unsigned bytes times signed bytes, summed into 8 f32 lanes (lane `i` holds bytes
    /// `4i..4i + 4`).
    #[inline(always)]
    unsafe fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Running sums of `R` rows' dot products.
    struct Acc<const R: usize> {
        v: [__m256; R],
        offset: [f32; R],
    }

    impl<const R: usize> Acc<R> {
        #[inline(always)]
        unsafe fn new() -> Self {
            Self {
                v: [_mm256_setzero_ps(); R],
                offset: [0.0; R],
            }
        }

        /// Sub-block `i` of every row: values `d*q + m`, `q` unsigned below 64.
        #[inline(always)]
        unsafe fn unsigned(&mut self, x: &[ActRow; R], i: usize, d: f32, m: f32, q: __m256i) {
            // The weight's scale is broadcast once per block, each row's is a broadcast load.
            let dw = _mm256_set1_ps(d);
            for ((x, v), offset) in x.iter().zip(&mut self.v).zip(&mut self.offset) {
                let p = _mm256_load_si256(x.qs.get_unchecked(i).0.as_ptr() as *const __m256i);
                let ds = x.ds.get_unchecked(i);
                let t = _mm256_mul_ps(mul_sum_us8(q, p), _mm256_broadcast_ss(&ds[0]));
                *v = _mm256_fmadd_ps(t, dw, *v);
                *offset += m * ds[1];
            }
        }

        /// Sub-block `i` of every row: values `d*q`, `q` signed in -127..=127, `d` per f32
        /// lane (so per 4 values).
        #[inline(always)]
        unsafe fn signed(&mut self, x: &[ActRow; R], i: usize, d: __m256, q: __m256i) {
            // maddubs wants one unsigned side: move the weight's sign onto the activation.
            let qa = _mm256_sign_epi8(q, q);
            for (x, v) in x.iter().zip(&mut self.v) {
                let p = _mm256_load_si256(x.qs.get_unchecked(i).0.as_ptr() as *const __m256i);
                let ps = _mm256_sign_epi8(p, q);
                let d_act = &x.ds.get_unchecked(i)[0];
                let t = _mm256_mul_ps(mul_sum_us8(qa, ps), _mm256_broadcast_ss(d_act));
                *v = _mm256_fmadd_ps(t, d, *v);
            }
        }

        #[inline(always)]
        unsafe fn finish(self) -> [f32; R] {
            std::array::from_fn(|r| hsum(self.v[r]) + self.offset[r])
        }
    }

    /// 16 bytes of nibbles as 32 values: low nibbles first, then high.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
        let raw = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let both =
            _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4));
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Bit `i` of `qh` as 16 in byte `i` (the fifth bit of a Q5 value).
    #[inline(always)]
    unsafe fn fifth_bits(qh: &[u8; 4]) -> __m256i {
        let sel = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(u32::from_le_bytes(*qh) as i32), sel);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Where bit `bit` of each byte of `qh` is set, 16.
    #[inline(always)]
    unsafe fn bit_as_16(qh: __m256i, bit: u8) -> __m256i {
        let b = _mm256_set1_epi8(bit as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, b), b);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    pub(crate) unsafe fn q4_0<const R: usize>(w: &[BlockQ4_0], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        for (i, b) in w.iter().enumerate() {
            let d = f16(b.d);
            acc.unsigned(&x, i, d, -8.0 * d, nibbles(&b.qs));
        }
        acc.finish()
    }

    pub(crate) unsafe fn q4_1<const R: usize>(w: &[BlockQ4_1], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        for (i, b) in w.iter().enumerate() {
            acc.unsigned(&x, i, f16(b.d), f16(b.m), nibbles(&b.qs));
        }
        acc.finish()
    }

    pub(crate) unsafe fn q5_0<const R: usize>(w: &[BlockQ5_0], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        for (i, b) in w.iter().enumerate() {
            let d = f16(b.d);
            let q = _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh));
            acc.unsigned(&x, i, d, -16.0 * d, q);
        }
        acc.finish()
    }

    pub(crate) unsafe fn q5_1<const R: usize>(w: &[BlockQ5_1], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        for (i, b) in w.iter().enumerate() {
            let q = _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh));
            acc.unsigned(&x, i, f16(b.d), f16(b.m), q);
        }
        acc.finish()
    }

    pub(crate) unsafe fn q8_0<const R: usize>(w: &[BlockQ8_0], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        for (i, b) in w.iter().enumerate() {
            let q = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            acc.signed(&x, i, _mm256_set1_ps(f16(b.d)), q);
        }
        acc.finish()
    }

    /// Q4_K and Q5_K: sub-block `s` of a superblock is `d*sc_s*q - dmin*m_s`.
    #[inline(always)]
    unsafe fn k4_sub<const R: usize>(
        acc: &mut Acc<R>,
        x: &[ActRow; R],
        i: usize,
        (d, dmin, scales): (f32, f32, &[u8; 12]),
        s: usize,
        q: __m256i,
    ) {
        let (sc, m) = scale_min_k4(s, scales);
        acc.unsigned(x, i * 8 + s, d * sc as f32, -dmin * m as f32, q);
    }

    pub(crate) unsafe fn q4k<const R: usize>(w: &[BlockQ4K], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        let mask = _mm256_set1_epi8(0x0F);
        for (i, b) in w.iter().enumerate() {
            let ds = (f16(b.d), f16(b.dmin), &b.scales);
            for c in 0..4 {
                let raw = _mm256_loadu_si256(b.qs.as_ptr().add(32 * c) as *const __m256i);
                k4_sub(&mut acc, &x, i, ds, 2 * c, _mm256_and_si256(raw, mask));
                let high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                k4_sub(&mut acc, &x, i, ds, 2 * c + 1, high);
            }
        }
        acc.finish()
    }

    pub(crate) unsafe fn q5k<const R: usize>(w: &[BlockQ5K], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        let mask = _mm256_set1_epi8(0x0F);
        for (i, b) in w.iter().enumerate() {
            let ds = (f16(b.d), f16(b.dmin), &b.scales);
            let qh = _mm256_loadu_si256(b.qh.as_ptr() as *const __m256i);
            for c in 0..4 {
                let raw = _mm256_loadu_si256(b.qs.as_ptr().add(32 * c) as *const __m256i);
                let low = _mm256_or_si256(_mm256_and_si256(raw, mask), bit_as_16(qh, 1 << (2 * c)));
                k4_sub(&mut acc, &x, i, ds, 2 * c, low);
                let high = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
                    bit_as_16(qh, 2 << (2 * c)),
                );
                k4_sub(&mut acc, &x, i, ds, 2 * c + 1, high);
            }
        }
        acc.finish()
    }

    pub(crate) unsafe fn q6k<const R: usize>(w: &[BlockQ6K], x: [ActRow; R]) -> [f32; R] {
        let mut acc = Acc::<R>::new();
        let (mask4, mask2, m32) = (
            _mm256_set1_epi8(0x0F),
            _mm256_set1_epi8(0x03),
            _mm256_set1_epi8(32),
        );
        for (i, b) in w.iter().enumerate() {
            let d = f16(b.d);
            for h in 0..2 {
                let l0 = _mm256_loadu_si256(b.ql.as_ptr().add(64 * h) as *const __m256i);
                let l1 = _mm256_loadu_si256(b.ql.as_ptr().add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(b.qh.as_ptr().add(32 * h) as *const __m256i);
                let lows = [
                    _mm256_and_si256(l0, mask4),
                    _mm256_and_si256(l1, mask4),
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), mask4),
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), mask4),
                ];
                for (t, low) in lows.into_iter().enumerate() {
                    // Two bits of qh, moved to bits 4-5; the masks keep each shift in its byte.
                    let shift = _mm_cvtsi32_si128(2 * t as i32);
                    let high = _mm256_and_si256(_mm256_srl_epi16(qh, shift), mask2);
                    let q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), m32);
                    let sc = 8 * h + 2 * t;
                    let ds = _mm256_set_m128(
                        _mm_set1_ps(d * b.scales[sc + 1] as f32),
                        _mm_set1_ps(d * b.scales[sc] as f32),
                    );
                    acc.signed(&x, i * 8 + 4 * h + t, ds, q);
                }
            }
        }
        acc.finish()
    }
}

/// Weight rows per parallel task: enough work to amortise the dispatch, enough tasks to balance.
fn rows_per_task(n: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_balance = n.div_ceil(threads * 4);
    // Small batches: bigger tasks (dispatch costs more than the work); large ones: smaller.
    let floor = if m <= 4 { 32 } else { 8 };
    by_balance.max(floor).min(n.max(1))
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ` for one of our block types.
fn quantized_rows<B: Block>(w: &[B], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let acts = Acts::quantize(x, m, k);
    let wb = acts.kb / B::ACTS;
    // Activation rows in tiles small enough to stay in L1 beside the weight rows streaming past,
    // against weight rows in tiles that stay in L2 while every activation tile passes: without
    // the first a 300-row prefill ran at half the speed of a 16-row one; without the second each
    // activation tile streamed the task's weights (0.75 MB for Qwen2.5-0.5B's gate/up) from L3
    // again.
    let rows_per_w_tile = (W_TILE_BYTES / (wb * std::mem::size_of::<B>()).max(1)).max(1);
    let act_block_bytes = std::mem::size_of::<ActValues>() + std::mem::size_of::<[f32; 2]>();
    let row_tile = (A_TILE_BYTES / (acts.kb * act_block_bytes).max(1)).clamp(8, 32) / 8 * 8;
    by_weight_rows(m, n, |cols, out| {
        for w0 in cols.clone().step_by(rows_per_w_tile) {
            let w1 = (w0 + rows_per_w_tile).min(cols.end);
            for r0 in (0..m).step_by(row_tile) {
                let r1 = (r0 + row_tile).min(m);
                for j in w0..w1 {
                    let wrow = &w[j * wb..(j + 1) * wb];
                    let mut r = r0;
                    while r + 8 <= r1 {
                        let v = B::dot8(wrow, std::array::from_fn(|i| acts.row(r + i)));
                        out.put(r, j, &v);
                        r += 8;
                    }
                    while r + 4 <= r1 {
                        let v = B::dot4(wrow, std::array::from_fn(|i| acts.row(r + i)));
                        out.put(r, j, &v);
                        r += 4;
                    }
                    for r in r..r1 {
                        out.put(r, j, &[B::dot(wrow, acts.row(r))]);
                    }
                }
            }
        }
    })
}

/// Weight bytes per tile: a quarter of this machine's 512 KiB L2 per core.
const W_TILE_BYTES: usize = 128 << 10;
/// Activation bytes per tile, rounded down to whole 8-row groups: 16 rows of a 896-wide input
/// (16 KiB) stay in a 32 KiB L1 while weight rows stream past. Measured on Qwen2.5-0.5B
/// `Q4_K_M` prefill: 32-row tiles of 40-byte blocks 61 tok/s; 8 rows per weight decode instead
/// of 4, 72; aligned 64-byte blocks, 79; 16-row tiles, 81; values apart from scales (36 bytes a
/// block), see `docs/performance.md`.
const A_TILE_BYTES: usize = 16 << 10;

/// The `[m, n]` output of one task of [`by_weight_rows`]: it may write only its own columns.
struct Columns {
    ptr: *mut f32,
    m: usize,
    n: usize,
    cols: std::ops::Range<usize>,
}

impl Columns {
    /// Outputs `(r, j)`, `(r + 1, j)`, ...: consecutive rows of column `j`.
    #[inline]
    fn put(&self, r: usize, j: usize, v: &[f32]) {
        assert!(self.cols.contains(&j) && r + v.len() <= self.m);
        for (i, &v) in v.iter().enumerate() {
            // SAFETY: in bounds (checked above), and column `j` belongs to this task alone: the
            // tasks' column ranges are disjoint and the output outlives them.
            unsafe { *self.ptr.add((r + i) * self.n + j) = v };
        }
    }
}

/// The output pointer shared by the tasks of [`by_weight_rows`], each writing its own columns.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint columns (see `Columns::put`).
unsafe impl Sync for SharedOut {}

/// Runs `f(columns, out)` in parallel over ranges of weight rows (output columns); each task
/// writes the `m` outputs of its columns straight into the `[m, n]` result. (Computing `[n, m]`
/// and transposing cost 7% of a 1,600-token prefill on Qwen2.5-0.5B.)
fn by_weight_rows(
    m: usize,
    n: usize,
    f: impl Fn(std::ops::Range<usize>, &Columns) + Sync,
) -> Vec<f32> {
    let per_task = rows_per_task(n, m);
    let mut y = vec![0f32; m * n];
    let out = SharedOut(y.as_mut_ptr());
    let out = &out;
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let cols = t * per_task..((t + 1) * per_task).min(n);
        let columns = Columns {
            ptr: out.0,
            m,
            n,
            cols: cols.clone(),
        };
        f(cols, &columns)
    });
    y
}

// ---------------------------------------------------------------------------------------------
// Other GGUF types: candle's block dot products, with the same row reuse.

trait GgmlRows: Send + Sync {
    fn forward(&self, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32>;
    /// The block type and the blocks' GGUF bytes.
    fn raw(&self) -> (GgmlDType, &[u8]);
}

struct GgmlWeight<T: GgmlType> {
    blocks: Vec<T>,
}

fn ggml<T: GgmlType + 'static>(bytes: &[u8], n: usize, k: usize) -> anyhow::Result<Weight> {
    if !k.is_multiple_of(T::BLCK_SIZE) {
        bail!("{k} inputs are not whole blocks of {}", T::BLCK_SIZE);
    }
    let size = std::mem::size_of::<T>();
    let count = n * (k / T::BLCK_SIZE);
    if bytes.len() != count * size {
        bail!("{} bytes for {count} blocks of {size}", bytes.len());
    }
    let mut blocks = vec![T::zeros(); count];
    // SAFETY: candle's block types are `repr(C)` mirrors of the GGUF layout made of integers
    // and f16s, valid for any bits; exactly `count * size` bytes are written.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len());
    }
    Ok(Weight::Ggml(Box::new(GgmlWeight { blocks })))
}

impl<T: GgmlType> GgmlRows for GgmlWeight<T> {
    fn raw(&self) -> (GgmlDType, &[u8]) {
        // SAFETY: candle's block types are `repr(C)` mirrors of the GGUF layout (see `ggml`).
        (T::DTYPE, unsafe { block_bytes(&self.blocks) })
    }

    fn forward(&self, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let kb = k / T::VecDotType::BLCK_SIZE;
        let mut act = vec![T::VecDotType::zeros(); m * kb];
        for (a, x) in act.chunks_mut(kb).zip(x.chunks(k)) {
            T::VecDotType::from_float(x, a);
        }
        let wb = k / T::BLCK_SIZE;
        by_weight_rows(m, n, |cols, out| {
            for j in cols {
                let wrow = &self.blocks[j * wb..(j + 1) * wb];
                for r in 0..m {
                    out.put(r, j, &[T::vec_dot(k, wrow, &act[r * kb..(r + 1) * kb])]);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    fn data(len: usize, seed: u32) -> Vec<f32> {
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
    const OURS: [(GgmlDType, usize); 8] = [
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

    /// Our reading of each GGUF layout (what the AVX2 kernels implement) equals candle's
    /// dequantization value for value, on weights with a wide spread of scales.
    #[test]
    fn block_layouts_match_candle_dequantization() {
        fn check<B: Block>(blocks: &[B], want: &[f32], dtype: GgmlDType) {
            let per = QK * B::ACTS;
            let mut got = vec![0f32; per];
            for (b, want) in blocks.iter().zip(want.chunks_exact(per)) {
                b.values(&mut got);
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{dtype:?} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
        let (n, k) = (8, 512);
        // Rows of very different magnitude exercise every scale and min bit.
        let x: Vec<f32> = data(n * k, 11)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % 97) as f32 * if i % 5 == 0 { -3.0 } else { 0.5 })
            .collect();
        let w = Tensor::from_vec(x, (n, k), &Device::Cpu).unwrap();
        for (dtype, _) in OURS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let lin = Linear::from_qtensor(&q, None).unwrap();
            match &lin.weight {
                Weight::Q4_0(b) => check(b, &want, dtype),
                Weight::Q4_1(b) => check(b, &want, dtype),
                Weight::Q5_0(b) => check(b, &want, dtype),
                Weight::Q5_1(b) => check(b, &want, dtype),
                Weight::Q8_0(b) => check(b, &want, dtype),
                Weight::Q4K(b) => check(b, &want, dtype),
                Weight::Q5K(b) => check(b, &want, dtype),
                Weight::Q6K(b) => check(b, &want, dtype),
                _ => panic!("{dtype:?} is not one of our block types"),
            }
        }
    }

    /// A row's result is bit-identical whether it runs alone or in a batch (with 8-row, 4-row and
    /// remainder paths), so batching never changes a greedy output.
    #[test]
    fn quantized_rows_do_not_depend_on_the_batch() {
        let (n, k) = (40, 64);
        let w = Tensor::from_vec(data(n * k, 5), (n, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
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
            let w = if k == 64 {
                w.clone()
            } else {
                Tensor::from_vec(data(n * k, 6), (n, k), &Device::Cpu).unwrap()
            };
            let lin = Linear::from_qtensor(&QTensor::quantize(&w, dtype).unwrap(), None).unwrap();
            // 21 rows: two 8-row groups, a 4-row group and a single row.
            let m = 21;
            let x = data(m * k, 8);
            let batched = lin.forward(&x).unwrap();
            for r in 0..m {
                let alone = lin.forward(&x[r * k..(r + 1) * k]).unwrap();
                assert_eq!(
                    &batched[r * n..(r + 1) * n],
                    &alone[..],
                    "{dtype:?} row {r}"
                );
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
