//! The AVX2 kernels: GGUF weight blocks against activations quantized to 8 bits in blocks of 32,
//! for 1, 4 or 8 activation rows at once (built only where the crate has AVX2).
//!
//! Every type we run splits into 32-value sub-blocks whose values are `d*q + m` with small
//! unsigned `q` (Q4_0/Q4_1/Q5_0/Q5_1, and Q4_K/Q5_K with a scale and min per sub-block), or
//! `d*q` with signed `q` (Q8_0, and Q6_K with one scale per 16 values). A sub-block against the
//! activation block `a*p` is then `d a Σ q p + m Σ a p`: one `maddubs` and one FMA per row, and a
//! 256-value K-quant superblock is eight such sub-blocks against eight activation blocks.

use super::blocks::{
    scale_min_k4, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use super::matmul::ActRow;
use super::QK;
use std::arch::x86_64::*;

/// One f16 by F16C (`blocks::f16` goes through `half`'s checks).
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
    let both = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4));
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

pub(super) unsafe fn q4_0<const R: usize>(w: &[BlockQ4_0], x: [ActRow; R]) -> [f32; R] {
    let mut acc = Acc::<R>::new();
    for (i, b) in w.iter().enumerate() {
        let d = f16(b.d);
        acc.unsigned(&x, i, d, -8.0 * d, nibbles(&b.qs));
    }
    acc.finish()
}

pub(super) unsafe fn q4_1<const R: usize>(w: &[BlockQ4_1], x: [ActRow; R]) -> [f32; R] {
    let mut acc = Acc::<R>::new();
    for (i, b) in w.iter().enumerate() {
        acc.unsigned(&x, i, f16(b.d), f16(b.m), nibbles(&b.qs));
    }
    acc.finish()
}

pub(super) unsafe fn q5_0<const R: usize>(w: &[BlockQ5_0], x: [ActRow; R]) -> [f32; R] {
    let mut acc = Acc::<R>::new();
    for (i, b) in w.iter().enumerate() {
        let d = f16(b.d);
        let q = _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh));
        acc.unsigned(&x, i, d, -16.0 * d, q);
    }
    acc.finish()
}

pub(super) unsafe fn q5_1<const R: usize>(w: &[BlockQ5_1], x: [ActRow; R]) -> [f32; R] {
    let mut acc = Acc::<R>::new();
    for (i, b) in w.iter().enumerate() {
        let q = _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh));
        acc.unsigned(&x, i, f16(b.d), f16(b.m), q);
    }
    acc.finish()
}

pub(super) unsafe fn q8_0<const R: usize>(w: &[BlockQ8_0], x: [ActRow; R]) -> [f32; R] {
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

pub(super) unsafe fn q4k<const R: usize>(w: &[BlockQ4K], x: [ActRow; R]) -> [f32; R] {
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

pub(super) unsafe fn q5k<const R: usize>(w: &[BlockQ5K], x: [ActRow; R]) -> [f32; R] {
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

pub(super) unsafe fn q6k<const R: usize>(w: &[BlockQ6K], x: [ActRow; R]) -> [f32; R] {
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
