//! The element-wise exponentials of a step: SiLU over the MLP's gate and the softmax over
//! attention scores, eight lanes at a time.
//!
//! Both were scalar `f32::exp` calls (libm, about 5 ns each). A 1,600-token prefill on
//! Qwen2.5-0.5B makes 190 M of them for SiLU (on one core: the loop was serial) and about
//! 430 M for the softmax, several seconds of a prefill that takes 20. The AVX2 version is the
//! usual range reduction `e^x = 2^k e^r` with `|r| <= ln2/2` and a degree-6 polynomial for
//! `e^r` (Cephes' `expf` coefficients), within 2 ulp of libm over the range used here; it is
//! the same arithmetic for every row, so batching still never changes a result.

use rayon::prelude::*;

/// `gate[i] = silu(gate[i]) * up[i]`, the SwiGLU of the MLP, in parallel for large steps.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 16 << 10;
    assert_eq!(gate.len(), up.len());
    if gate.len() >= 4 * CHUNK {
        gate.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(|(g, u)| silu_mul_serial(g, u));
    } else {
        silu_mul_serial(gate, up);
    }
}

fn silu_mul_serial(gate: &mut [f32], up: &[f32]) {
    let mut i = 0;
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: AVX2 is enabled for the whole build; every access is below `gate.len()`,
        // which equals `up.len()`.
        unsafe {
            use std::arch::x86_64::*;
            let one = _mm256_set1_ps(1.0);
            while i + 8 <= gate.len() {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = avx::exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(s, u));
                i += 8;
            }
        }
    }
    for (g, u) in gate[i..].iter_mut().zip(&up[i..]) {
        *g = *g / (1.0 + scalar_exp(-*g)) * u;
    }
}

/// The largest of `v` (negative infinity when empty).
pub(crate) fn max_of(v: &[f32]) -> f32 {
    let mut i = 0;
    let mut m = f32::NEG_INFINITY;
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: as in `silu_mul_serial`.
        unsafe {
            use std::arch::x86_64::*;
            let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
            while i + 8 <= v.len() {
                acc = _mm256_max_ps(acc, _mm256_loadu_ps(v.as_ptr().add(i)));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            m = lanes.into_iter().fold(m, f32::max);
        }
    }
    v[i..].iter().copied().fold(m, f32::max)
}

/// `v[i] = e^(v[i] - max)`; returns their sum.
pub(crate) fn exp_shifted_sum(v: &mut [f32], max: f32) -> f32 {
    let mut i = 0;
    let mut sum = 0f32;
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: as in `silu_mul_serial`.
        unsafe {
            use std::arch::x86_64::*;
            let m = _mm256_set1_ps(max);
            let mut acc = _mm256_setzero_ps();
            while i + 8 <= v.len() {
                let e = avx::exp(_mm256_sub_ps(_mm256_loadu_ps(v.as_ptr().add(i)), m));
                _mm256_storeu_ps(v.as_mut_ptr().add(i), e);
                acc = _mm256_add_ps(acc, e);
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            sum += lanes.iter().sum::<f32>();
        }
    }
    for x in &mut v[i..] {
        *x = scalar_exp(*x - max);
        sum += *x;
    }
    sum
}

/// The tail of a row: the same polynomial as the vector lanes where AVX2 exists, so a value's
/// result does not depend on where it falls in its row.
fn scalar_exp(x: f32) -> f32 {
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: AVX2 is enabled for the whole build.
        unsafe {
            use std::arch::x86_64::*;
            _mm256_cvtss_f32(avx::exp(_mm256_set1_ps(x)))
        }
    }
    #[cfg(not(target_feature = "avx2"))]
    x.exp()
}

#[cfg(target_feature = "avx2")]
mod avx {
    use std::arch::x86_64::*;

    /// `e^x` per lane. Below -87.3 the result is the smallest normal instead of a subnormal or
    /// zero (harmless for softmax weights and SiLU); above 88.3 it is clamped to `e^88.3`.
    #[inline(always)]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, so that `x - k ln2` is exact for the k that occur.
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let two_k = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e, _mm256_castsi256_ps(two_k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut xs: Vec<f32> = (-9000..=1000).map(|i| i as f32 * 0.0097).collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 88.0, -87.0]);
        let max = 0.0;
        let mut v = xs.clone();
        let sum = exp_shifted_sum(&mut v, max);
        let mut want_sum = 0f64;
        for (x, got) in xs.iter().zip(&v) {
            let want = x.exp();
            want_sum += want as f64;
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "e^{x}: {got} vs {want}"
            );
        }
        assert!((sum as f64 - want_sum).abs() <= 1e-5 * want_sum);
        // Far below the range: a tiny positive weight, never NaN or negative.
        let mut low = vec![-1e4f32; 9];
        assert!(exp_shifted_sum(&mut low, 0.0) < 1e-30);
        assert!(low.iter().all(|v| *v >= 0.0));
    }

    #[test]
    fn silu_matches_its_definition_at_any_length() {
        for len in [1, 7, 8, 9, 100, 70_000] {
            let g: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 12.0).collect();
            let u: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut got = g.clone();
            silu_mul(&mut got, &u);
            for i in 0..len {
                let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
                assert!(
                    (got[i] - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "len {len} [{i}]: {} vs {want}",
                    got[i]
                );
            }
        }
    }
}
