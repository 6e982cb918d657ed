//! Linear layers `y = x Wᵀ (+ b)` over all of a step's rows at once, on plain `f32` rows.
//!
//! candle's CPU quantized matmul walks the activation rows one by one and reads the whole weight
//! matrix for each, so a step of 8 decoding sequences read the weights 8 times and a 512-token
//! prefill chunk 512 times; its Q4_1 dot product has no SIMD path at all. Here each task takes a
//! slice of weight rows and dots every activation row against them while they sit in L1, so the
//! weights cross the memory bus once per step whatever the batch. Q4_0, Q4_1 and Q8_0 (the types
//! of the small GGUF models we serve) have AVX2 kernels that also decode each weight block once
//! for four activation rows; other GGUF types use candle's block dot products with the same row
//! reuse; dense weights (safetensors) go through candle's gemm.

use anyhow::{bail, Context};
use candle_core::quantized::{k_quants, GgmlDType, GgmlType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Activation rows are quantized in blocks of this many values, as the weights are.
const QK: usize = 32;

pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

enum Weight {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    /// Any other GGUF block type, through candle's per-block dot products.
    Ggml(Box<dyn GgmlRows>),
    /// `[n, k]` f32.
    Dense(Tensor),
}

impl Linear {
    pub fn from_qtensor(t: &QTensor, bias: Option<Vec<f32>>) -> anyhow::Result<Self> {
        let (n, k) = t.shape().dims2().context("a linear weight is 2-D")?;
        let bytes = t.data()?;
        let weight = match t.dtype() {
            GgmlDType::Q4_0 if k % QK == 0 => Weight::Q4_0(cast_blocks(&bytes)?),
            GgmlDType::Q4_1 if k % QK == 0 => Weight::Q4_1(cast_blocks(&bytes)?),
            GgmlDType::Q8_0 if k % QK == 0 => Weight::Q8_0(cast_blocks(&bytes)?),
            GgmlDType::Q5_0 => ggml::<k_quants::BlockQ5_0>(&bytes, n, k)?,
            GgmlDType::Q5_1 => ggml::<k_quants::BlockQ5_1>(&bytes, n, k)?,
            GgmlDType::Q2K => ggml::<k_quants::BlockQ2K>(&bytes, n, k)?,
            GgmlDType::Q3K => ggml::<k_quants::BlockQ3K>(&bytes, n, k)?,
            GgmlDType::Q4K => ggml::<k_quants::BlockQ4K>(&bytes, n, k)?,
            GgmlDType::Q5K => ggml::<k_quants::BlockQ5K>(&bytes, n, k)?,
            GgmlDType::Q6K => ggml::<k_quants::BlockQ6K>(&bytes, n, k)?,
            GgmlDType::Q8K => ggml::<k_quants::BlockQ8K>(&bytes, n, k)?,
            _ => Weight::Dense(t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?),
        };
        Self::check_bias(&bias, n)?;
        Ok(Self { weight, bias, n, k })
    }

    /// A dense `[n, k]` weight.
    pub fn dense(w: Tensor, bias: Option<Vec<f32>>) -> anyhow::Result<Self> {
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
    pub fn fuse(parts: &[Linear]) -> Option<Linear> {
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
        // Every part's blocks of the same type, concatenated; `None` when a part differs.
        fn concat<T: Clone>(
            parts: &[Linear],
            pick: fn(&Weight) -> Option<&Vec<T>>,
        ) -> Option<Vec<T>> {
            let mut all = Vec::new();
            for p in parts {
                all.extend_from_slice(pick(&p.weight)?);
            }
            Some(all)
        }
        let weight = match &parts[0].weight {
            Weight::Q4_0(_) => Weight::Q4_0(concat(parts, |w| match w {
                Weight::Q4_0(b) => Some(b),
                _ => None,
            })?),
            Weight::Q4_1(_) => Weight::Q4_1(concat(parts, |w| match w {
                Weight::Q4_1(b) => Some(b),
                _ => None,
            })?),
            Weight::Q8_0(_) => Weight::Q8_0(concat(parts, |w| match w {
                Weight::Q8_0(b) => Some(b),
                _ => None,
            })?),
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
        };
        Some(Linear { weight, bias, n, k })
    }

    /// This layer with its dense weight quantized to `dtype` (tests run the quantized kernels on
    /// the tiny generated model this way).
    #[cfg(test)]
    pub fn quantized(&self, dtype: GgmlDType) -> anyhow::Result<Linear> {
        let Weight::Dense(w) = &self.weight else {
            bail!("only a dense layer can be quantized");
        };
        Linear::from_qtensor(&QTensor::quantize(w, dtype)?, self.bias.clone())
    }

    /// `x` is `[m, k]` row-major; the result is `[m, n]`.
    pub fn forward(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let m = x.len() / self.k;
        debug_assert_eq!(m * self.k, x.len());
        let mut y = match &self.weight {
            Weight::Q4_0(w) => quantized_rows(w, x, m, self.k, self.n),
            Weight::Q4_1(w) => quantized_rows(w, x, m, self.k, self.n),
            Weight::Q8_0(w) => quantized_rows(w, x, m, self.k, self.n),
            Weight::Ggml(w) => w.forward(x, m, self.k, self.n),
            Weight::Dense(w) => {
                let x = Tensor::from_slice(x, (m, self.k), &Device::Cpu)?;
                x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?
            }
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
pub enum CandleWeight {
    Quantized(QTensor),
    Dense(Tensor),
}

impl Linear {
    /// The weight and bias in candle's types on `dev` (the same bytes, so the same model).
    pub fn to_candle(&self, dev: &Device) -> anyhow::Result<(CandleWeight, Option<&[f32]>)> {
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
        // SAFETY: our block types have no padding (sizes asserted below).
        let weight = match &self.weight {
            Weight::Q4_0(b) => q(GgmlDType::Q4_0, unsafe { block_bytes(b) })?,
            Weight::Q4_1(b) => q(GgmlDType::Q4_1, unsafe { block_bytes(b) })?,
            Weight::Q8_0(b) => q(GgmlDType::Q8_0, unsafe { block_bytes(b) })?,
            Weight::Ggml(w) => {
                let (dtype, bytes) = w.raw();
                q(dtype, bytes)?
            }
            Weight::Dense(w) => CandleWeight::Dense(w.to_device(dev)?),
        };
        Ok((weight, self.bias.as_deref()))
    }
}

/// Layers that read the same input (q/k/v; gate/up), run as one layer when their weight types
/// allow it.
pub struct Group {
    widths: Vec<usize>,
    run: GroupRun,
}

enum GroupRun {
    Fused(Linear),
    Separate(Vec<Linear>),
}

impl Group {
    pub fn new(parts: Vec<Linear>) -> Self {
        let widths = parts.iter().map(|p| p.n).collect();
        let run = match Linear::fuse(&parts) {
            Some(l) => GroupRun::Fused(l),
            None => GroupRun::Separate(parts),
        };
        Self { widths, run }
    }

    #[cfg(test)]
    pub fn quantized(&self, dtype: GgmlDType) -> anyhow::Result<Group> {
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
    pub fn layers(&self) -> (&[usize], &[Linear]) {
        match &self.run {
            GroupRun::Fused(l) => (&self.widths, std::slice::from_ref(l)),
            GroupRun::Separate(p) => (&self.widths, p),
        }
    }

    /// One `[m, n_i]` output per part.
    pub fn forward(&self, x: &[f32]) -> candle_core::Result<Vec<Vec<f32>>> {
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
// Our kernels: Q4_0, Q4_1 and Q8_0 weights against activations quantized to 8 bits.

/// Weight block layouts exactly as GGUF stores them (scales as f16 bits).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_0 {
    d: u16,
    qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    d: u16,
    qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// 32 activation values as `d * qs[i]`; `s` is `d * Σ qs` (what an offset or a min multiplies).
#[derive(Clone, Copy)]
struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// A weight block type with a dot product against activation blocks, for 1 and 4 rows.
trait Block: Copy + Send + Sync {
    fn dot(w: &[Self], x: &[ActBlock]) -> f32;
    /// Four activation rows against one weight row: each weight block is decoded once.
    fn dot4(w: &[Self], x: [&[ActBlock]; 4]) -> [f32; 4] {
        [
            Self::dot(w, x[0]),
            Self::dot(w, x[1]),
            Self::dot(w, x[2]),
            Self::dot(w, x[3]),
        ]
    }
}

#[cfg(not(target_feature = "avx2"))]
fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The unpacked values of a 4-bit block: low nibbles are elements 0..16, high nibbles 16..32.
#[cfg(not(target_feature = "avx2"))]
fn nibbles(qs: &[u8; QK / 2]) -> [i32; QK] {
    let mut v = [0i32; QK];
    for j in 0..QK / 2 {
        v[j] = (qs[j] & 0x0F) as i32;
        v[j + QK / 2] = (qs[j] >> 4) as i32;
    }
    v
}

#[cfg(not(target_feature = "avx2"))]
fn idot(a: &[i32; QK], b: &[i8; QK]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x * y as i32).sum()
}

// A 4-bit value q stands for d*q + m (Q4_1) or d*(q - 8) (Q4_0, so m = -8d); against activations
// a*p, Σ (d q + m) a p = d a Σ q p + m s.
impl Block for BlockQ4_1 {
    #[cfg(target_feature = "avx2")]
    fn dot(w: &[Self], x: &[ActBlock]) -> f32 {
        // SAFETY: compiled only where AVX2 is enabled for the whole crate.
        unsafe { avx::q4_rows::<1>(w.iter().map(|b| (b.d, Some(b.m), &b.qs)), [x])[0] }
    }
    #[cfg(target_feature = "avx2")]
    fn dot4(w: &[Self], x: [&[ActBlock]; 4]) -> [f32; 4] {
        unsafe { avx::q4_rows::<4>(w.iter().map(|b| (b.d, Some(b.m), &b.qs)), x) }
    }
    #[cfg(not(target_feature = "avx2"))]
    fn dot(w: &[Self], x: &[ActBlock]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(b, a)| f16(b.d) * a.d * idot(&nibbles(&b.qs), &a.qs) as f32 + f16(b.m) * a.s)
            .sum()
    }
}

impl Block for BlockQ4_0 {
    #[cfg(target_feature = "avx2")]
    fn dot(w: &[Self], x: &[ActBlock]) -> f32 {
        unsafe { avx::q4_rows::<1>(w.iter().map(|b| (b.d, None, &b.qs)), [x])[0] }
    }
    #[cfg(target_feature = "avx2")]
    fn dot4(w: &[Self], x: [&[ActBlock]; 4]) -> [f32; 4] {
        unsafe { avx::q4_rows::<4>(w.iter().map(|b| (b.d, None, &b.qs)), x) }
    }
    #[cfg(not(target_feature = "avx2"))]
    fn dot(w: &[Self], x: &[ActBlock]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(b, a)| {
                let d = f16(b.d);
                d * a.d * idot(&nibbles(&b.qs), &a.qs) as f32 - 8.0 * d * a.s
            })
            .sum()
    }
}

impl Block for BlockQ8_0 {
    #[cfg(target_feature = "avx2")]
    fn dot(w: &[Self], x: &[ActBlock]) -> f32 {
        unsafe { avx::q8_rows::<1>(w, [x])[0] }
    }
    #[cfg(target_feature = "avx2")]
    fn dot4(w: &[Self], x: [&[ActBlock]; 4]) -> [f32; 4] {
        unsafe { avx::q8_rows::<4>(w, x) }
    }
    #[cfg(not(target_feature = "avx2"))]
    fn dot(w: &[Self], x: &[ActBlock]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(b, a)| {
                let s: i32 =
                    b.qs.iter()
                        .zip(&a.qs)
                        .map(|(&p, &q)| p as i32 * q as i32)
                        .sum();
                f16(b.d) * a.d * s as f32
            })
            .sum()
    }
}

#[cfg(target_feature = "avx2")]
mod avx {
    use super::{ActBlock, BlockQ8_0, QK};
    use std::arch::x86_64::*;

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

    /// Unsigned bytes times signed bytes, summed into 8 f32 lanes.
    #[inline(always)]
    unsafe fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Dot products of one row of 4-bit blocks (`(d, m, qs)`; `m = None` means Q4_0's
    /// `-8d`) with `R` activation rows.
    #[inline(always)]
    pub unsafe fn q4_rows<'a, const R: usize>(
        w: impl Iterator<Item = (u16, Option<u16>, &'a [u8; QK / 2])>,
        x: [&[ActBlock]; R],
    ) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offset = [0f32; R];
        let mask = _mm256_set1_epi8(0x0F);
        for (i, (d, m, qs)) in w.enumerate() {
            let d = f16(d);
            let m = match m {
                Some(m) => f16(m),
                None => -8.0 * d,
            };
            let raw = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
            let q = _mm256_and_si256(
                _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4)),
                mask,
            );
            for r in 0..R {
                let a = x[r].get_unchecked(i);
                let p = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_us8(q, p), acc[r]);
                offset[r] += m * a.s;
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + offset[r];
        }
        out
    }

    #[inline(always)]
    pub unsafe fn q8_rows<const R: usize>(w: &[BlockQ8_0], x: [&[ActBlock]; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for (i, b) in w.iter().enumerate() {
            let d = f16(b.d);
            let q = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            // maddubs wants one unsigned side: move the weight's sign onto the activation.
            let qa = _mm256_sign_epi8(q, q);
            for r in 0..R {
                let a = x[r].get_unchecked(i);
                let p = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                let ps = _mm256_sign_epi8(p, q);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_us8(qa, ps), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        out
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
    let kb = k / QK;
    let mut act = vec![
        ActBlock {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        };
        m * kb
    ];
    if m >= 16 {
        act.par_chunks_mut(kb)
            .zip(x.par_chunks(k))
            .for_each(|(a, x)| quantize_row(x, a));
    } else {
        for (a, x) in act.chunks_mut(kb).zip(x.chunks(k)) {
            quantize_row(x, a);
        }
    }
    let act_row = |r: usize| &act[r * kb..(r + 1) * kb];
    by_weight_rows(m, n, |j0, chunk: &mut [f32]| {
        // Rows in tiles small enough to stay in L1 while the task's weight rows stream past;
        // without tiling a 300-row prefill ran at half the speed of a 16-row one.
        for r0 in (0..m).step_by(ROW_TILE) {
            let r1 = (r0 + ROW_TILE).min(m);
            for (i, out) in chunk.chunks_exact_mut(m).enumerate() {
                let j = j0 + i;
                let wrow = &w[j * kb..(j + 1) * kb];
                let mut r = r0;
                while r + 4 <= r1 {
                    let v = B::dot4(
                        wrow,
                        [act_row(r), act_row(r + 1), act_row(r + 2), act_row(r + 3)],
                    );
                    out[r..r + 4].copy_from_slice(&v);
                    r += 4;
                }
                for (r, o) in out.iter_mut().enumerate().take(r1).skip(r) {
                    *o = B::dot(wrow, act_row(r));
                }
            }
        }
    })
}

/// Activation rows per tile: 32 rows of a 1,536-wide input are 72 KiB of 8-bit blocks, 576-wide
/// 23 KiB.
const ROW_TILE: usize = 32;

/// Runs `f(j0, chunk)` in parallel over slices of weight rows: `chunk` holds, for weight rows
/// `j0..`, the `m` outputs of each (`chunk[i * m + r]` is output `(r, j0 + i)`). Returns the
/// `[m, n]` result.
fn by_weight_rows(m: usize, n: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per_task = rows_per_task(n, m);
    // Computed as `[n, m]` so each task owns a contiguous slice, then transposed (a no-op for
    // the one-row decode step).
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(c, chunk)| f(c * per_task, chunk));
    if m == 1 {
        return t;
    }
    // In tiles, in parallel: a naive strided transpose of a 300-row prefill's outputs took as
    // long as a third of the matmul.
    const TILE: usize = 32;
    let mut y = vec![0f32; m * n];
    y.par_chunks_mut(TILE * n)
        .enumerate()
        .for_each(|(rb, band)| {
            let r0 = rb * TILE;
            let rows = band.len() / n;
            for j0 in (0..n).step_by(TILE) {
                for j in j0..(j0 + TILE).min(n) {
                    let col = &t[j * m + r0..j * m + r0 + rows];
                    for (r, &v) in col.iter().enumerate() {
                        band[r * n + j] = v;
                    }
                }
            }
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
        by_weight_rows(m, n, |j0, chunk: &mut [f32]| {
            for (i, out) in chunk.chunks_exact_mut(m).enumerate() {
                let j = j0 + i;
                let wrow = &self.blocks[j * wb..(j + 1) * wb];
                for (r, o) in out.iter_mut().enumerate() {
                    *o = T::vec_dot(k, wrow, &act[r * kb..(r + 1) * kb]);
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

    /// Our kernels against candle's dequantize-then-matmul, for every batch shape the engine
    /// uses (1 row, a multiple of 4, a ragged remainder, a prefill chunk).
    #[test]
    fn quantized_kernels_match_candle() {
        // candle's own Q4_1 kernel wants an even number of blocks per row.
        let (n, k) = (72, 128);
        let w = Tensor::from_vec(data(n * k, 1), (n, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q5_1,
            GgmlDType::F16,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = Linear::from_qtensor(&q, None).unwrap();
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

    /// A row's result is bit-identical whether it runs alone or in a batch (with 4-row and
    /// remainder paths), so batching never changes a greedy output.
    #[test]
    fn quantized_rows_do_not_depend_on_the_batch() {
        let (n, k) = (40, 64);
        let w = Tensor::from_vec(data(n * k, 5), (n, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q6K,
        ] {
            let k = if dtype == GgmlDType::Q6K { 256 } else { k };
            let w = if k == 64 {
                w.clone()
            } else {
                Tensor::from_vec(data(n * k, 6), (n, k), &Device::Cpu).unwrap()
            };
            let lin = Linear::from_qtensor(&QTensor::quantize(&w, dtype).unwrap(), None).unwrap();
            let m = 7;
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
