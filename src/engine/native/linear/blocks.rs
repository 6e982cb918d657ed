//! The GGUF block formats our kernels run: `repr(C)` mirrors of the GGUF layouts (sizes asserted),
//! their bytes in and out (`cast_blocks`, `block_bytes`), the `Block` trait that the matmul driver
//! calls with each type's kernels, and the scalar decoding of each layout (`values`: the
//! reference the AVX2 kernels are tested against, and the fallback where AVX2 is missing).

use anyhow::bail;

#[cfg(target_feature = "avx2")]
use super::avx;
use super::matmul::ActRows;
#[cfg(not(target_feature = "avx2"))]
use super::matmul::GROUP;
use super::QK;

/// The GGUF bytes of blocks held as `repr(C)` mirrors of the GGUF layout (the inverse of
/// `cast_blocks` and `ggml`).
///
/// # Safety
/// `T` must have no padding, so that its memory is exactly its GGUF bytes: true of our block
/// types (their sizes are asserted equal to the GGUF block sizes below) and of candle's.
pub(super) unsafe fn block_bytes<T>(blocks: &[T]) -> &[u8] {
    // SAFETY: every byte of a padding-free `T` is initialised; the slice covers exactly them.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

/// Reinterpret GGUF bytes as blocks of our own `repr(C)` types (copied: the bytes need not be
/// aligned).
pub(super) fn cast_blocks<B: Block>(bytes: &[u8]) -> anyhow::Result<Vec<B>> {
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

/// Weight block layouts exactly as GGUF stores them (scales as f16 bits).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ4_0 {
    pub(super) d: u16,
    pub(super) qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ4_1 {
    pub(super) d: u16,
    pub(super) m: u16,
    pub(super) qs: [u8; QK / 2],
}
/// Bit `i` of `qh` is the fifth bit of value `i`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ5_0 {
    pub(super) d: u16,
    pub(super) qh: [u8; 4],
    pub(super) qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ5_1 {
    pub(super) d: u16,
    pub(super) m: u16,
    pub(super) qh: [u8; 4],
    pub(super) qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ8_0 {
    pub(super) d: u16,
    pub(super) qs: [i8; QK],
}
/// 256 values: eight sub-blocks with 6-bit scales and mins packed in `scales`; sub-block `2c`
/// is the low nibbles of `qs[32c..32c + 32]`, `2c + 1` their high nibbles.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ4K {
    pub(super) d: u16,
    pub(super) dmin: u16,
    pub(super) scales: [u8; 12],
    pub(super) qs: [u8; 128],
}
/// Q4_K plus a fifth bit: bit `s` of `qh[l]` belongs to value `l` of sub-block `s`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ5K {
    pub(super) d: u16,
    pub(super) dmin: u16,
    pub(super) scales: [u8; 12],
    pub(super) qh: [u8; 32],
    pub(super) qs: [u8; 128],
}
/// 256 values of 6 bits (minus 32), in two halves of 128: in half `h`, value `32t + l` takes
/// its low 4 bits from `ql[64h + l]` (t = 0, 2) or `ql[64h + 32 + l]` (t = 1, 3), the low or
/// high nibble as `t < 2`, and bits `2t..2t+2` of `qh[32h + l]`; one i8 scale per 16 values.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct BlockQ6K {
    pub(super) ql: [u8; 128],
    pub(super) qh: [u8; 64],
    pub(super) scales: [i8; 16],
    pub(super) d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

#[cfg(any(test, not(target_feature = "avx2")))]
fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K superblock.
pub(super) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A weight block type with a dot product against activation blocks, for 1, 4 and 8 rows of a
/// group.
pub(super) trait Block: Copy + Send + Sync {
    /// Activation blocks (of `QK` values) one weight block spans.
    const ACTS: usize = 1;
    /// Row `x.row` of the group.
    fn dot(w: &[Self], x: ActRows) -> f32;
    /// Rows `x.row..x.row + 4` against one weight row: each weight block is decoded once.
    fn dot4(w: &[Self], x: ActRows) -> [f32; 4] {
        std::array::from_fn(|i| Self::dot(w, x.skip(i)))
    }
    /// Rows `x.row..x.row + 8` (the whole group) against one weight row.
    fn dot8(w: &[Self], x: ActRows) -> [f32; 8] {
        std::array::from_fn(|i| Self::dot(w, x.skip(i)))
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
            fn dot(w: &[Self], x: ActRows) -> f32 {
                // SAFETY: compiled only where AVX2 is enabled for the whole crate; the kernel
                // checks that `x` spans `w` and that its rows lie in the group.
                unsafe { avx::$rows::<1>(w, x)[0] }
            }
            #[cfg(target_feature = "avx2")]
            fn dot4(w: &[Self], x: ActRows) -> [f32; 4] {
                unsafe { avx::$rows::<4>(w, x) }
            }
            #[cfg(target_feature = "avx2")]
            fn dot8(w: &[Self], x: ActRows) -> [f32; 8] {
                unsafe { avx::$rows::<8>(w, x) }
            }
            #[cfg(not(target_feature = "avx2"))]
            fn dot(w: &[Self], x: ActRows) -> f32 {
                let mut v = [0f32; QK * 8];
                let v = &mut v[..QK * Self::ACTS];
                let mut sum = 0.0;
                for (wi, b) in w.iter().enumerate() {
                    b.values(v);
                    for (a, vs) in v.chunks_exact(QK).enumerate() {
                        let i = wi * Self::ACTS + a;
                        let q = &x.qs[i * GROUP + x.row].0;
                        let s: f32 = vs.iter().zip(q).map(|(&v, &q)| v * q as f32).sum();
                        sum += s * x.d[i].0[x.row];
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
    pub(super) fn q4_0(b: &BlockQ4_0, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(nibbles(&b.qs)) {
            *o = f16(b.d) * (q as f32 - 8.0);
        }
    }
    pub(super) fn q4_1(b: &BlockQ4_1, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(nibbles(&b.qs)) {
            *o = f16(b.d) * q as f32 + f16(b.m);
        }
    }
    pub(super) fn q5_0(b: &BlockQ5_0, out: &mut [f32]) {
        for (i, (o, q)) in out.iter_mut().zip(nibbles(&b.qs)).enumerate() {
            *o = f16(b.d) * ((q | fifth(&b.qh, i)) as f32 - 16.0);
        }
    }
    pub(super) fn q5_1(b: &BlockQ5_1, out: &mut [f32]) {
        for (i, (o, q)) in out.iter_mut().zip(nibbles(&b.qs)).enumerate() {
            *o = f16(b.d) * (q | fifth(&b.qh, i)) as f32 + f16(b.m);
        }
    }
    pub(super) fn q8_0(b: &BlockQ8_0, out: &mut [f32]) {
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
    pub(super) fn q4k(b: &BlockQ4K, out: &mut [f32]) {
        k4(
            b.d,
            b.dmin,
            &b.scales,
            |s, l| (b.qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F,
            out,
        )
    }
    pub(super) fn q5k(b: &BlockQ5K, out: &mut [f32]) {
        let q = |s: usize, l: usize| {
            ((b.qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F) | (((b.qh[l] >> s) & 1) << 4)
        };
        k4(b.d, b.dmin, &b.scales, q, out)
    }
    pub(super) fn q6k(b: &BlockQ6K, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let (h, t, l) = (i / 128, (i % 128) / 32, i % 32);
            let low = b.ql[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2)) & 0x0F;
            let high = (b.qh[32 * h + l] >> (2 * t)) & 3;
            let q = (low | high << 4) as i32 - 32;
            *o = f16(b.d) * b.scales[8 * h + 2 * t + l / 16] as f32 * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{data, OURS};
    use super::super::{Linear, Weight};
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

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
}
