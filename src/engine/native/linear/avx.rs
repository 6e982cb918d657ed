//! The AVX2 kernels: GGUF weight blocks against activations quantized to 8 bits in blocks of 32,
//! for 1, 4 or 8 activation rows at once (built only where the crate has AVX2).
//!
//! Every type we run splits into 32-value sub-blocks whose values are `d*q + m` with small
//! unsigned `q` (Q4_0/Q4_1/Q5_0/Q5_1, and Q4_K/Q5_K with a scale and min per sub-block), or
//! `d*q` with signed `q` (Q8_0, and Q6_K with one scale per 16 values). A sub-block against the
//! activation block `a*p` is then `d a Σ q p + m Σ a p`: one `maddubs` and one FMA per row, and a
//! 256-value K-quant superblock is eight such sub-blocks against eight activation blocks.
//!
//! The 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the re-quantized GGUFs, `--quantize`
//! safetensors, and the attention, gate/up and LM head tensors of Qwen2.5-0.5B `Q4_K_M` files)
//! go through `Exact` instead: a block's integer dot products are summed exactly across lanes,
//! so eight rows convert, scale and accumulate once per block (Q8_0 prefill, bench binaries
//! alternated: 99-103 -> 108-114 tokens/s; `Q4_K_M`, 85-89 -> 88-91). A single row sums four
//! blocks' lanes in one tree (the shipped `Q4_K_M`'s decode at 1, 21.0 -> 23.1 tokens/s over
//! three alternated pairs, its Q5_0 tensors being instruction-bound there; Q8_0, memory-bound,
//! unchanged). Tried and not kept: a single row against eight weight rows at a time, lanes =
//! weight rows (Q8_0 decode at 1 fell from 21 to 16-18 tokens/s; Q5_0's eight decoded blocks
//! spilled registers). The K-quants keep `Acc`.

use super::blocks::{
    scale_min_k4, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use super::matmul::{ActRows, Lanes, GROUP};
use super::QK;
use std::arch::x86_64::*;

/// One f16 by F16C (`blocks::f16` goes through `half`'s checks).
#[inline(always)]
unsafe fn f16(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The f16 at `p` and the one after it (both must lie in one block), loaded by a `vmovd`, which
/// reads no register. A plain load, even a 32-bit one, LLVM narrows to the 16 bits used and
/// inserts (`vpinsrw`) into whichever register it left free, in the block loops the accumulator:
/// every block's scale then waited for the previous block's FMA.
#[inline(always)]
unsafe fn f16_pair(p: *const u16) -> (f32, f32) {
    let bits: __m128i;
    // SAFETY: the caller's `p` has four readable bytes (a scale and what follows it in its block).
    std::arch::asm!(
        "vmovd {bits}, dword ptr [{p}]",
        p = in(reg) p,
        bits = out(xmm_reg) bits,
        options(pure, readonly, nostack, preserves_flags)
    );
    let v = _mm_cvtph_ps(bits);
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// A block's first two f16s (its scale, and its offset where it has one), through [`f16_pair`]
/// for the four- and eight-row kernels (decode at 8, Q8_0, bench binaries alternated: 44.9, 41.0
/// -> 49.8, 46.6 tokens/s, and 44.9, 50.5 -> 45.6, 51.3), plain loads for the one-row kernel
/// (with `f16_pair` there too, decode at 1 on `Q4_K_M` fell from 20.0, 20.0 to 18.2, 18.9).
///
/// `p` is the block, whose first field is its f16 scale (all the 32-value types, `repr(C)`). It
/// is made from the whole block, not from `&self.d`: the pair read covers the next field too,
/// beyond what a pointer to `d` alone may read.
#[inline(always)]
unsafe fn scales<const VMOVD: bool>(p: *const u16) -> (f32, f32) {
    if VMOVD {
        f16_pair(p)
    } else {
        (f16(p.read_unaligned()), f16(p.add(1).read_unaligned()))
    }
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
    _mm256_cvtepi32_ps(unsigned_products(u, s))
}

/// The combined scales of one block: one row's in a register, or a group's lanes.
enum Scales {
    One(__m256),
    Group(Lanes),
}

/// Running sums of `R` rows' dot products (rows `x.row..x.row + R` of a group).
///
/// Every row's arithmetic is the same whatever `R`: a block adds `sum * (d_act * d_weight)` to
/// its row, and an offset adds `m * s_act` with one rounding (an FMA), so a sequence's logits do
/// not depend on how many rows share its step.
struct Acc<const R: usize> {
    v: [__m256; R],
    /// Lane `i`: the offsets of the group's row `i`.
    offset: __m256,
    /// The offsets of a one-row kernel, kept apart: for a decode step's single row, vector
    /// loads, a multiply and a store of eight lanes per block cost more than one row's scalars.
    offset1: f32,
}

impl<const R: usize> Acc<R> {
    #[inline(always)]
    unsafe fn new(x: &ActRows, blocks: usize) -> Self {
        // The kernels index `x` unchecked: the rows must lie in the group and its blocks must
        // cover the weight row.
        assert!(x.row + R <= GROUP && x.d.len() >= blocks && x.s.len() >= blocks);
        assert!(x.qs.len() >= blocks * GROUP);
        Self {
            v: [_mm256_setzero_ps(); R],
            offset: _mm256_setzero_ps(),
            offset1: 0.0,
        }
    }

    /// `d_act * d` at block `i`, for the rows' `lane`s.
    #[inline(always)]
    unsafe fn scales(x: &ActRows, i: usize, d: f32) -> Scales {
        let da = x.d.get_unchecked(i);
        if R == 1 {
            // One row: a register broadcast. (Through a stack array, a scalar store and its
            // reload stalled on store forwarding and decode ran at a third of its speed.)
            Scales::One(_mm256_set1_ps(da.0.get_unchecked(x.row) * d))
        } else {
            // Several rows: one multiply and one store for the group, then a broadcast load per
            // row (a load port each), measured faster than a lane permute per row.
            let mut out = Lanes([0.0; GROUP]);
            let p = _mm256_mul_ps(_mm256_load_ps(da.0.as_ptr()), _mm256_set1_ps(d));
            _mm256_store_ps(out.0.as_mut_ptr(), p);
            Scales::Group(out)
        }
    }

    /// Row `r`'s scale from `scales`, in every lane.
    #[inline(always)]
    unsafe fn lane(x: &ActRows, scales: &Scales, r: usize) -> __m256 {
        match scales {
            Scales::One(v) => *v,
            Scales::Group(l) => _mm256_broadcast_ss(l.0.get_unchecked(x.row + r)),
        }
    }

    /// `offset += m * s_act` for the rows at block `i` (one rounding, as a vector FMA lane).
    #[inline(always)]
    unsafe fn add_offset(&mut self, x: &ActRows, i: usize, m: f32) {
        if R == 1 {
            self.offset1 = m.mul_add(*x.s.get_unchecked(i).0.get_unchecked(x.row), self.offset1);
        } else {
            let s = _mm256_load_ps(x.s.get_unchecked(i).0.as_ptr());
            self.offset = _mm256_fmadd_ps(_mm256_set1_ps(m), s, self.offset);
        }
    }

    /// Sub-block `i` of every row: values `d*q + m`, `q` unsigned below 64.
    #[inline(always)]
    unsafe fn unsigned(&mut self, x: &ActRows, i: usize, d: f32, m: f32, q: __m256i) {
        self.add_offset(x, i, m);
        let sc = Self::scales(x, i, d);
        for (r, v) in self.v.iter_mut().enumerate() {
            let t = mul_sum_us8(q, act(x, i, x.row + r));
            *v = _mm256_fmadd_ps(t, Self::lane(x, &sc, r), *v);
        }
    }

    /// Sub-block `i` of every row: values `q` signed in -127..=127, with the weight's scale `d`
    /// per f32 lane (so per 4 values).
    #[inline(always)]
    unsafe fn signed_lanes(&mut self, x: &ActRows, i: usize, d: __m256, q: __m256i) {
        let qa = _mm256_sign_epi8(q, q);
        let da = x.d.get_unchecked(i);
        for (r, v) in self.v.iter_mut().enumerate() {
            let t = mul_sum_us8(qa, _mm256_sign_epi8(act(x, i, x.row + r), q));
            let t = _mm256_mul_ps(t, _mm256_broadcast_ss(da.0.get_unchecked(x.row + r)));
            *v = _mm256_fmadd_ps(t, d, *v);
        }
    }

    #[inline(always)]
    unsafe fn finish(self, x: &ActRows) -> [f32; R] {
        if R == 1 {
            return std::array::from_fn(|r| hsum(self.v[r]) + self.offset1);
        }
        let mut offset = Lanes([0.0; GROUP]);
        _mm256_store_ps(offset.0.as_mut_ptr(), self.offset);
        std::array::from_fn(|r| hsum(self.v[r]) + offset.0[x.row + r])
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

/// The 32-value block types whose kernels sum each block's products as exact integers: every
/// output is `Σ fma(E, d_act * d, acc) + Σ fma(m, s_act, offset)` in block order, where `E` is
/// the block's exact integer dot product (and `m` its offset, for the unsigned types). Integers
/// add exactly in any order, so the kernels below may sum a block's products across lanes however
/// suits their shape (eight activation rows, four or one) and every output keeps the same bits.
/// Against converting and scaling each row's eight partial lanes per block, a group of eight
/// rows converts, scales and accumulates once per block.
trait Exact: Copy {
    /// Whether values carry an offset (`d*q + m`); Q8_0's are `d*q`.
    const OFFSET: bool;
    /// The weight block ready for `products`, with its scale `d` and offset `m` (`VMOVD`: load
    /// the scales through [`f16_pair`]).
    unsafe fn prep<const VMOVD: bool>(&self) -> ([__m256i; 2], f32, f32);
    /// The block's products against activation values `a`, in eight i32 lanes.
    unsafe fn products(w: &[__m256i; 2], a: __m256i) -> __m256i;
}

/// Unsigned `q` (at most 127) times signed activation bytes (at least -127), pairs widened
/// exactly to i32: a pair is at most 2 * 127 * 127, within i16.
#[inline(always)]
unsafe fn unsigned_products(q: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1))
}

impl Exact for BlockQ4_0 {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn prep<const VMOVD: bool>(&self) -> ([__m256i; 2], f32, f32) {
        let d = scales::<VMOVD>((self as *const Self).cast()).0;
        ([nibbles(&self.qs), _mm256_setzero_si256()], d, -8.0 * d)
    }
    #[inline(always)]
    unsafe fn products(w: &[__m256i; 2], a: __m256i) -> __m256i {
        unsigned_products(w[0], a)
    }
}

impl Exact for BlockQ4_1 {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn prep<const VMOVD: bool>(&self) -> ([__m256i; 2], f32, f32) {
        let (d, m) = scales::<VMOVD>((self as *const Self).cast());
        ([nibbles(&self.qs), _mm256_setzero_si256()], d, m)
    }
    #[inline(always)]
    unsafe fn products(w: &[__m256i; 2], a: __m256i) -> __m256i {
        unsigned_products(w[0], a)
    }
}

impl Exact for BlockQ5_0 {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn prep<const VMOVD: bool>(&self) -> ([__m256i; 2], f32, f32) {
        let d = scales::<VMOVD>((self as *const Self).cast()).0;
        let q = _mm256_or_si256(nibbles(&self.qs), fifth_bits(&self.qh));
        ([q, _mm256_setzero_si256()], d, -16.0 * d)
    }
    #[inline(always)]
    unsafe fn products(w: &[__m256i; 2], a: __m256i) -> __m256i {
        unsigned_products(w[0], a)
    }
}

impl Exact for BlockQ5_1 {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn prep<const VMOVD: bool>(&self) -> ([__m256i; 2], f32, f32) {
        let q = _mm256_or_si256(nibbles(&self.qs), fifth_bits(&self.qh));
        let (d, m) = scales::<VMOVD>((self as *const Self).cast());
        ([q, _mm256_setzero_si256()], d, m)
    }
    #[inline(always)]
    unsafe fn products(w: &[__m256i; 2], a: __m256i) -> __m256i {
        unsigned_products(w[0], a)
    }
}

impl Exact for BlockQ8_0 {
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn prep<const VMOVD: bool>(&self) -> ([__m256i; 2], f32, f32) {
        let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        // maddubs wants one unsigned side: the weight's magnitude, its sign moved onto the
        // activation.
        (
            [q, _mm256_sign_epi8(q, q)],
            scales::<VMOVD>((self as *const Self).cast()).0,
            0.0,
        )
    }
    #[inline(always)]
    unsafe fn products(w: &[__m256i; 2], a: __m256i) -> __m256i {
        // Pairs of products fit i16 (2 * 127 * 127); madd widens them exactly.
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(w[1], _mm256_sign_epi8(a, w[0])),
            _mm256_set1_epi16(1),
        )
    }
}

/// `R` rows of a group against one weight row.
#[inline(always)]
unsafe fn exact<B: Exact, const R: usize>(w: &[B], x: ActRows) -> [f32; R] {
    match R {
        GROUP => {
            let v = exact_group(w, x);
            std::array::from_fn(|r| v[r])
        }
        4 => {
            let v = exact_four(w, x);
            std::array::from_fn(|r| v[r])
        }
        _ => std::array::from_fn(|r| exact_one(w, x.skip(r))),
    }
}

pub(super) unsafe fn q4_0<const R: usize>(w: &[BlockQ4_0], x: ActRows) -> [f32; R] {
    exact(w, x)
}

pub(super) unsafe fn q4_1<const R: usize>(w: &[BlockQ4_1], x: ActRows) -> [f32; R] {
    exact(w, x)
}

pub(super) unsafe fn q5_0<const R: usize>(w: &[BlockQ5_0], x: ActRows) -> [f32; R] {
    exact(w, x)
}

pub(super) unsafe fn q5_1<const R: usize>(w: &[BlockQ5_1], x: ActRows) -> [f32; R] {
    exact(w, x)
}

pub(super) unsafe fn q8_0<const R: usize>(w: &[BlockQ8_0], x: ActRows) -> [f32; R] {
    exact(w, x)
}

/// Row `r`'s activation values at block `i`.
#[inline(always)]
unsafe fn act(x: &ActRows, i: usize, r: usize) -> __m256i {
    _mm256_load_si256(x.qs.get_unchecked(i * GROUP + r).0.as_ptr() as *const __m256i)
}

/// Lane `i`: the sum of `v[i]`'s eight lanes (exact: integers).
#[inline(always)]
unsafe fn lane_sums8(v: &[__m256i; 8]) -> __m256i {
    let (lo, hi) = (lane_sums4_halves(&v[..4]), lane_sums4_halves(&v[4..]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(lo, hi),
        _mm256_permute2x128_si256::<0x31>(lo, hi),
    )
}

/// Lane `i`: the sum of `v[i]`'s eight lanes (exact: integers).
#[inline(always)]
unsafe fn lane_sums4(v: &[__m256i; 4]) -> __m128i {
    let halves = lane_sums4_halves(v);
    _mm_add_epi32(
        _mm256_castsi256_si128(halves),
        _mm256_extracti128_si256::<1>(halves),
    )
}

/// `[Σ low half of v[0..4] | Σ high half of v[0..4]]`: `hadd` works within 128-bit halves.
#[inline(always)]
unsafe fn lane_sums4_halves(v: &[__m256i]) -> __m256i {
    _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]))
}

/// All eight rows of a group.
#[inline(always)]
unsafe fn exact_group<B: Exact>(w: &[B], x: ActRows) -> [f32; GROUP] {
    // Unchecked below: the group's blocks cover the weight row.
    assert!(x.row == 0 && x.d.len() >= w.len() && x.s.len() >= w.len());
    assert!(x.qs.len() >= w.len() * GROUP);
    let (mut acc, mut offset) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (i, b) in w.iter().enumerate() {
        let (q, d, m) = b.prep::<true>();
        let e: [__m256i; GROUP] = std::array::from_fn(|r| B::products(&q, act(&x, i, r)));
        let e = _mm256_cvtepi32_ps(lane_sums8(&e));
        let da = _mm256_load_ps(x.d.get_unchecked(i).0.as_ptr());
        acc = _mm256_fmadd_ps(e, _mm256_mul_ps(da, _mm256_set1_ps(d)), acc);
        if B::OFFSET {
            let s = _mm256_load_ps(x.s.get_unchecked(i).0.as_ptr());
            offset = _mm256_fmadd_ps(_mm256_set1_ps(m), s, offset);
        }
    }
    let mut out = [0f32; GROUP];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(acc, offset));
    out
}

/// Rows `x.row..x.row + 4` (the first or second half of a group).
#[inline(always)]
unsafe fn exact_four<B: Exact>(w: &[B], x: ActRows) -> [f32; 4] {
    assert!(x.row + 4 <= GROUP && x.d.len() >= w.len() && x.s.len() >= w.len());
    assert!(x.qs.len() >= w.len() * GROUP);
    let (mut acc, mut offset) = (_mm_setzero_ps(), _mm_setzero_ps());
    for (i, b) in w.iter().enumerate() {
        let (q, d, m) = b.prep::<true>();
        let e: [__m256i; 4] = std::array::from_fn(|r| B::products(&q, act(&x, i, x.row + r)));
        let e = lane_sums4(&e);
        let da = _mm_loadu_ps(x.d.get_unchecked(i).0.as_ptr().add(x.row));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(e), _mm_mul_ps(da, _mm_set1_ps(d)), acc);
        if B::OFFSET {
            let s = _mm_loadu_ps(x.s.get_unchecked(i).0.as_ptr().add(x.row));
            offset = _mm_fmadd_ps(_mm_set1_ps(m), s, offset);
        }
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(acc, offset));
    out
}

/// Row `x.row` alone. Four blocks at a time, their exact sums in one `hadd` tree (a tree per
/// block cost six of the kernel's ~30 instructions per block), then the same scalar chain in
/// block order as one block at a time.
#[inline(always)]
unsafe fn exact_one<B: Exact>(w: &[B], x: ActRows) -> f32 {
    assert!(x.row < GROUP && x.d.len() >= w.len() && x.s.len() >= w.len());
    assert!(x.qs.len() >= w.len() * GROUP);
    let (mut acc, mut offset) = (0f32, 0f32);
    let mut add = |i: usize, e: f32, d: f32, m: f32| {
        acc = e.mul_add(x.d.get_unchecked(i).0.get_unchecked(x.row) * d, acc);
        if B::OFFSET {
            offset = m.mul_add(*x.s.get_unchecked(i).0.get_unchecked(x.row), offset);
        }
    };
    let quads = w.len() / 4;
    for (c, quad) in w.chunks_exact(4).enumerate() {
        let mut dm = [(0f32, 0f32); 4];
        let e: [__m256i; 4] = std::array::from_fn(|j| {
            let (q, d, m) = quad[j].prep::<false>();
            dm[j] = (d, m);
            B::products(&q, act(&x, 4 * c + j, x.row))
        });
        let mut lanes = [0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), _mm_cvtepi32_ps(lane_sums4(&e)));
        for (j, (e, (d, m))) in lanes.into_iter().zip(dm).enumerate() {
            add(4 * c + j, e, d, m);
        }
    }
    for (i, b) in w.iter().enumerate().skip(4 * quads) {
        let (q, d, m) = b.prep::<false>();
        let e = B::products(&q, act(&x, i, x.row));
        let s = _mm_add_epi32(_mm256_castsi256_si128(e), _mm256_extracti128_si256::<1>(e));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
        add(i, _mm_cvtsi128_si32(s) as f32, d, m);
    }
    acc + offset
}

/// Q4_K and Q5_K: sub-block `s` of a superblock is `d*sc_s*q - dmin*m_s`.
#[inline(always)]
unsafe fn k4_sub<const R: usize>(
    acc: &mut Acc<R>,
    x: &ActRows,
    i: usize,
    (d, dmin, scales): (f32, f32, &[u8; 12]),
    s: usize,
    q: __m256i,
) {
    let (sc, m) = scale_min_k4(s, scales);
    acc.unsigned(x, i * 8 + s, d * sc as f32, -dmin * m as f32, q);
}

pub(super) unsafe fn q4k<const R: usize>(w: &[BlockQ4K], x: ActRows) -> [f32; R] {
    let mut acc = Acc::<R>::new(&x, w.len() * 8);
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
    acc.finish(&x)
}

pub(super) unsafe fn q5k<const R: usize>(w: &[BlockQ5K], x: ActRows) -> [f32; R] {
    let mut acc = Acc::<R>::new(&x, w.len() * 8);
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
    acc.finish(&x)
}

pub(super) unsafe fn q6k<const R: usize>(w: &[BlockQ6K], x: ActRows) -> [f32; R] {
    let mut acc = Acc::<R>::new(&x, w.len() * 8);
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
                acc.signed_lanes(&x, i * 8 + 4 * h + t, ds, q);
            }
        }
    }
    acc.finish(&x)
}
