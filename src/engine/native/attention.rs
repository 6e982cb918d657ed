//! Causal attention over the KV block pool, for a ragged batch.
//!
//! Every row attends over its own sequence's cached keys and values, read in place through the
//! sequence's block table. The work is split into tasks of (rows, KV head, range of positions)
//! so that a one-row decode step still uses every core, and each row's partial softmaxes are
//! merged exactly afterwards (as in flash-decoding). A task's rows read each position's keys and
//! values once between them (from L1 and L2 instead of L3 or memory): up to 16 consecutive rows
//! of one prefill run, and every row whose sequence reads a whole range through the same blocks
//! (a request's three branches over their shared dialogue, every sequence over the system
//! prompt). With SmolLM2's 1,232-token system prompt a decode row read 57 MB of f32 keys and
//! values per step before its dialogue, more than the model's weights (about 100 MB) for two
//! sequences. The ranges depend on positions only, and a row's arithmetic does not depend on its
//! task, so a sequence's result is the same whoever shares its step and however its prompt was
//! chunked.

use rayon::prelude::*;

use std::collections::HashMap;

use super::kv_cache::{slot, BLOCK_SIZE};
use super::math::exp_shifted_sum;
use super::step::Run;
use super::weights::Config;

/// Causal attention of every row's query heads over its own sequence's cached keys and values.
/// `q` is `[rows, heads, head_dim]`; the result is `[rows, heads * head_dim]`.
///
/// The work is split into tasks of (rows, kv head, range of positions): a decode step has
/// a single row, and one task per row would leave all but one core idle while it reads the whole
/// context. Each task returns a partial softmax (its max, sum and weighted values) per row, and
/// the partials of a (row, kv head) are merged exactly, as in flash-decoding.
pub(crate) fn attention(
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
    let tasks = tasks(rows, runs, c.kv_heads);
    let partials: Vec<Vec<Partial>> = tasks
        .par_iter()
        .map(|t| {
            // The task's rows read the same blocks for these positions: any row's table will do.
            let table = runs[rows[t.rows[0]].0].table;
            let offsets: Vec<usize> = (t.p0..t.p1)
                .map(|p| slot(table, p) * slot_width + t.kv * d)
                .collect();
            // The kernels read `d` values at each offset without bounds checks.
            assert!(offsets
                .iter()
                .all(|&o| o + d <= k_pool.len() && o + d <= v_pool.len()));
            // Each row reads the positions from `p0` to its own (causal) end.
            let lens: Vec<usize> = t
                .rows
                .iter()
                .map(|&r| (rows[r].1 + 1).min(t.p1) - t.p0)
                .collect();
            let stride = group * offsets.len();
            let q_of = |i: usize, g: usize| &q[(t.rows[i] * c.heads + t.kv * group + g) * d..][..d];
            // Every query head of every row of the task reads the same keys and values: in
            // slices of `L1_POSITIONS` they are read from L1 by all but the first.
            let mut scores = vec![0f32; lens.len() * stride];
            for (s0, offs) in (0..offsets.len())
                .step_by(L1_POSITIONS)
                .zip(offsets.chunks(L1_POSITIONS))
            {
                for (i, &len) in lens.iter().enumerate().filter(|&(_, &len)| len > s0) {
                    let offs = &offs[..offs.len().min(len - s0)];
                    let row_scores = &mut scores[i * stride..(i + 1) * stride];
                    for (g, sc) in row_scores.chunks_exact_mut(offsets.len()).enumerate() {
                        key_scores(
                            q_of(i, g),
                            k_pool,
                            offs,
                            scale,
                            &mut sc[s0..s0 + offs.len()],
                        );
                    }
                }
            }
            let mut parts: Vec<Partial> = lens
                .iter()
                .zip(scores.chunks_exact_mut(stride))
                .map(|(&len, row_scores)| {
                    let mut max = vec![f32::NEG_INFINITY; group];
                    let mut sum = vec![0f32; group];
                    for (g, sc) in row_scores.chunks_exact_mut(offsets.len()).enumerate() {
                        let sc = &mut sc[..len];
                        max[g] = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        sum[g] = exp_shifted_sum(sc, max[g]);
                    }
                    let acc = vec![0f32; group * d];
                    Partial { max, sum, acc }
                })
                .collect();
            for (s0, offs) in (0..offsets.len())
                .step_by(L1_POSITIONS)
                .zip(offsets.chunks(L1_POSITIONS))
            {
                for (i, &len) in lens.iter().enumerate().filter(|&(_, &len)| len > s0) {
                    let offs = &offs[..offs.len().min(len - s0)];
                    let row_scores = &scores[i * stride..(i + 1) * stride];
                    for (sc, a) in row_scores
                        .chunks_exact(offsets.len())
                        .zip(parts[i].acc.chunks_exact_mut(d))
                    {
                        weighted_values(&sc[s0..s0 + offs.len()], v_pool, offs, a);
                    }
                }
            }
            parts
        })
        .collect();

    // Merge each (row, KV head)'s partials in position order, whichever tasks computed them.
    let mut order: Vec<(usize, usize, usize, &Partial)> = tasks
        .iter()
        .zip(&partials)
        .flat_map(|(t, parts)| t.rows.iter().zip(parts).map(|(&r, p)| (r, t.kv, t.p0, p)))
        .collect();
    order.sort_unstable_by_key(|&(r, kv, p0, _)| (r, kv, p0));
    let mut out = vec![0f32; rows.len() * c.heads * d];
    for parts in order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (row, kv) = (parts[0].0, parts[0].1);
        for g in 0..group {
            let m = parts
                .iter()
                .map(|p| p.3.max[g])
                .fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(row * c.heads + kv * group + g) * d..][..d];
            let mut total = 0f32;
            for &(_, _, _, p) in parts {
                let w = (p.max[g] - m).exp();
                total += p.sum[g] * w;
                axpy(w, &p.acc[g * d..(g + 1) * d], o);
            }
            let inv = 1.0 / total;
            for v in o.iter_mut() {
                *v *= inv;
            }
        }
    }
    out
}

/// One attention task: rows of the step (each at a position of at least `p0`, reading up to its
/// own position) against the positions `p0..p1` of one KV head.
struct Task {
    rows: Vec<usize>,
    kv: usize,
    p0: usize,
    p1: usize,
}

/// The tasks of a step.
///
/// A tile is up to `ROWS_PER_TASK` consecutive rows of one run; its positions are split in
/// ranges `POSITIONS_PER_TASK` wide from 0, whatever the tile, so a row's ranges (and so its
/// arithmetic, and its greedy output) are the same whoever shares its step and however its run
/// was chunked. A whole range that several tiles read through the same blocks (a request's
/// branches over their shared dialogue, every sequence over the system prompt) is one task for
/// all of them, so the step reads those keys and values once instead of once per sequence.
fn tasks(rows: &[(usize, usize)], runs: &[Run], kv_heads: usize) -> Vec<Task> {
    let mut tasks: Vec<Task> = Vec::new();
    // (KV head, block ids of a whole range) -> the task reading them.
    let mut shared: HashMap<(usize, &[u32]), usize> = HashMap::new();
    let mut first = 0;
    while first < rows.len() {
        let mut end = first + 1;
        while end < rows.len()
            && end - first < ROWS_PER_TASK
            && rows[end].0 == rows[first].0
            && rows[end].1 == rows[end - 1].1 + 1
        {
            end += 1;
        }
        let table = runs[rows[first].0].table;
        let last = rows[end - 1].1;
        for kv in 0..kv_heads {
            let mut p0 = 0;
            while p0 <= last {
                let p1 = (last + 1).min(p0.saturating_add(POSITIONS_PER_TASK));
                let tile: Vec<usize> = (first..end).filter(|&r| rows[r].1 >= p0).collect();
                // Shared only if every row of the tile reads the whole range.
                let whole = p1 - p0 == POSITIONS_PER_TASK && rows[tile[0]].1 + 1 >= p1;
                let key = whole.then(|| (kv, &table[p0 / BLOCK_SIZE..p1 / BLOCK_SIZE]));
                match key.and_then(|k| shared.get(&k)) {
                    Some(&t) if tasks[t].rows.len() + tile.len() <= MAX_SHARED_ROWS => {
                        tasks[t].rows.extend(tile)
                    }
                    _ => {
                        if let Some(k) = key {
                            shared.insert(k, tasks.len());
                        }
                        tasks.push(Task {
                            rows: tile,
                            kv,
                            p0,
                            p1,
                        });
                    }
                }
                p0 = p1;
            }
        }
        first = end;
    }
    tasks
}

/// The most rows one task takes over a shared range: enough for a few requests' branches; its
/// scores (rows x query heads per KV head x 128 positions) stay a few hundred KiB at most.
const MAX_SHARED_ROWS: usize = 64;

/// Rows of one prefill run per task. Each task reads its positions' keys and values once for
/// all its rows: per row, a 1,600-token prefill's keys and values (1.6 MB per layer on
/// Qwen2.5-0.5B) do not stay in a core's L2, so each row read them from L3.
const ROWS_PER_TASK: usize = 16;

/// Positions per attention task: a 500-token decode row becomes 4 tasks per KV head. A whole
/// number of KV blocks, so a range's blocks are its table's `p0 / BLOCK_SIZE..p1 / BLOCK_SIZE`.
const POSITIONS_PER_TASK: usize = 128;
const _: () = assert!(POSITIONS_PER_TASK.is_multiple_of(BLOCK_SIZE));

/// Positions whose keys (or values) the query heads of a group read in turn: 32 head-dim-64 f32
/// rows are 8 KiB, so they stay in L1 between heads. Over a whole task (128 positions, 32 KiB of
/// keys then 32 KiB of values) each of Qwen2.5-0.5B's 7 heads per KV head read them from L2,
/// and attention took a fifth of a 1,600-token prefill.
const L1_POSITIONS: usize = 32;

/// One task's share of a softmax: per query head of the group, the max score, the sum of
/// `exp(score - max)` and the values weighted by it.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// `out[i] = q · key_i * scale` for the keys at `offsets` in `pool`.
fn key_scores(q: &[f32], pool: &[f32], offsets: &[usize], scale: f32, out: &mut [f32]) {
    let d = q.len();
    #[cfg(target_feature = "avx2")]
    if d.is_multiple_of(8) {
        // SAFETY: AVX2 is enabled for the whole build; the caller checked every offset + d.
        unsafe { avx::key_scores(q, pool, offsets, scale, out) };
        return;
    }
    for (o, &off) in out.iter_mut().zip(offsets) {
        *o = dot(q, &pool[off..off + d]) * scale;
    }
}

/// `out += Σ_i w[i] * value_i` for the values at `offsets` in `pool`.
fn weighted_values(w: &[f32], pool: &[f32], offsets: &[usize], out: &mut [f32]) {
    let d = out.len();
    #[cfg(target_feature = "avx2")]
    if d.is_multiple_of(32) {
        // SAFETY: as above.
        unsafe { avx::weighted_values(w, pool, offsets, out) };
        return;
    }
    for (&wi, &off) in w.iter().zip(offsets) {
        axpy(wi, &pool[off..off + d], out);
    }
}

#[cfg(target_feature = "avx2")]
// Indexing parallel arrays of SIMD registers by lane group reads clearer than zipped iterators.
#[allow(clippy::needless_range_loop)]
mod avx {
    use std::arch::x86_64::*;

    /// Eight keys at a time, each with its own accumulator, so the FMAs do not wait on each
    /// other; the eight sums come out of one transpose-and-add.
    pub(crate) unsafe fn key_scores(
        q: &[f32],
        pool: &[f32],
        offsets: &[usize],
        scale: f32,
        out: &mut [f32],
    ) {
        let d = q.len();
        let (qp, base) = (q.as_ptr(), pool.as_ptr());
        let scale_v = _mm256_set1_ps(scale);
        let mut i = 0;
        while i + 8 <= offsets.len() {
            let mut acc = [_mm256_setzero_ps(); 8];
            let keys: [*const f32; 8] = std::array::from_fn(|j| base.add(offsets[i + j]));
            let mut c = 0;
            while c < d {
                let qv = _mm256_loadu_ps(qp.add(c));
                for j in 0..8 {
                    acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[j].add(c)), acc[j]);
                }
                c += 8;
            }
            let t0 = _mm256_hadd_ps(acc[0], acc[1]);
            let t1 = _mm256_hadd_ps(acc[2], acc[3]);
            let t2 = _mm256_hadd_ps(acc[4], acc[5]);
            let t3 = _mm256_hadd_ps(acc[6], acc[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let sums = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(u0, u1),
                _mm256_permute2f128_ps::<0x31>(u0, u1),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(sums, scale_v));
            i += 8;
        }
        while i < offsets.len() {
            let key = base.add(offsets[i]);
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < d {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(key.add(c)), acc);
                c += 8;
            }
            let s = _mm_add_ps(_mm256_extractf128_ps::<1>(acc), _mm256_castps256_ps128(acc));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            out[i] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s))) * scale;
            i += 1;
        }
    }

    /// 32 output values at a time held in registers over all positions, even and odd positions
    /// in separate accumulators (eight independent FMA chains).
    pub(crate) unsafe fn weighted_values(
        w: &[f32],
        pool: &[f32],
        offsets: &[usize],
        out: &mut [f32],
    ) {
        let d = out.len();
        let base = pool.as_ptr();
        let mut c = 0;
        while c < d {
            let o = out.as_mut_ptr().add(c);
            let mut a = [
                _mm256_loadu_ps(o),
                _mm256_loadu_ps(o.add(8)),
                _mm256_loadu_ps(o.add(16)),
                _mm256_loadu_ps(o.add(24)),
            ];
            let mut b = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 2 <= offsets.len() {
                let (va, vb) = (base.add(offsets[i] + c), base.add(offsets[i + 1] + c));
                let (wa, wb) = (_mm256_set1_ps(w[i]), _mm256_set1_ps(w[i + 1]));
                for k in 0..4 {
                    a[k] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(va.add(8 * k)), a[k]);
                    b[k] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vb.add(8 * k)), b[k]);
                }
                i += 2;
            }
            if i < offsets.len() {
                let va = base.add(offsets[i] + c);
                let wa = _mm256_set1_ps(w[i]);
                for k in 0..4 {
                    a[k] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(va.add(8 * k)), a[k]);
                }
            }
            for k in 0..4 {
                _mm256_storeu_ps(o.add(8 * k), _mm256_add_ps(a[k], b[k]));
            }
            c += 32;
        }
    }
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

    /// The split-and-merge attention against a textbook one, for a decode row whose context is
    /// long enough to be split across tasks and for a prefill run of several rows.
    #[test]
    fn split_attention_matches_naive_softmax_attention() {
        // 8: the scalar value path; 64 and 128: every SIMD path (and SmolLM2's and Qwen3's
        // head sizes).
        for d in [8, 64, 128] {
            split_attention_matches_naive(d);
        }
    }

    /// One layer's attention shape, the rest of the model irrelevant here.
    fn config(heads: usize, kv_heads: usize, d: usize) -> Config {
        Config {
            hidden: heads * d,
            layers: 1,
            heads,
            kv_heads,
            head_dim: d,
            vocab: 1,
            rope_theta: 1.0,
            rms_eps: 1e-6,
            max_positions: 4096,
            rope_interleaved: false,
        }
    }

    /// Deterministic values in [-1, 1), different per `salt`.
    fn noise(i: usize, salt: usize) -> f32 {
        (((i * 7919 + salt * 104_729) % 1000) as f32) / 500.0 - 1.0
    }

    /// Every row's attention computed with all of `rows` equals the row's computed alone, bit
    /// for bit.
    fn assert_rows_equal_alone(
        c: &Config,
        rows: &[(usize, usize)],
        runs: &[Run],
        kp: &[f32],
        vp: &[f32],
    ) {
        let (width, row_width) = (c.kv_heads * c.head_dim, c.heads * c.head_dim);
        let q: Vec<f32> = (0..rows.len() * row_width).map(|i| noise(i, 3)).collect();
        let together = attention(c, &q, rows, runs, kp, vp, width);
        for (r, &row) in rows.iter().enumerate() {
            let qr = &q[r * row_width..(r + 1) * row_width];
            let alone = attention(c, qr, &[row], runs, kp, vp, width);
            assert_eq!(
                &together[r * row_width..(r + 1) * row_width],
                &alone[..],
                "row {r}"
            );
        }
    }

    /// A prefill run is computed in tiles of rows; each row's result must not depend on the
    /// tile it fell in (nor on its tile's other rows), or a prompt's outputs would change with
    /// how it was chunked and who shared its step: bit-identical to the row computed alone.
    #[test]
    fn a_row_in_a_tile_equals_the_row_alone() {
        let (heads, kv_heads, d) = (6, 2, 64);
        let c = config(heads, kv_heads, d);
        let width = kv_heads * d;
        let blocks = 300usize.div_ceil(16);
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let kp: Vec<f32> = (0..blocks * 16 * width).map(|i| noise(i, 1)).collect();
        let vp: Vec<f32> = (0..blocks * 16 * width).map(|i| noise(i, 2)).collect();
        let runs = [
            Run {
                tokens: &[],
                start: 0,
                table: &table,
                wants_logits: true,
            },
            Run {
                tokens: &[],
                start: 0,
                table: &table,
                wants_logits: true,
            },
        ];
        // Two runs: 40 rows across the 128-position range boundary (three tiles, the last
        // partial), then a 5-row run; a decode-like row between would split tiles too.
        let rows: Vec<(usize, usize)> = (100..140)
            .map(|p| (0, p))
            .chain((200..205).map(|p| (1, p)))
            .collect();
        assert_rows_equal_alone(&c, &rows, &runs, &kp, &vp);
    }

    /// Rows of different sequences whose tables share blocks (a request's branches over their
    /// dialogue) read a shared whole range in one task, and each row's result is still exactly
    /// its result alone.
    #[test]
    fn sequences_sharing_blocks_share_tasks_and_not_results() {
        let (heads, kv_heads, d) = (6, 2, 64);
        let c = config(heads, kv_heads, d);
        let width = kv_heads * d;
        // Three tables: the first 17 blocks (272 positions: two whole ranges and one block)
        // shared, then a block of their own each; a fourth table shares nothing.
        let own = |i: u32| -> Vec<u32> { (0..17).chain([17 + i]).collect() };
        let tables = [own(0), own(1), own(2), (20..38).collect::<Vec<u32>>()];
        let kp: Vec<f32> = (0..38 * 16 * width).map(|i| noise(i, 1)).collect();
        let vp: Vec<f32> = (0..38 * 16 * width).map(|i| noise(i, 2)).collect();
        let runs: Vec<Run> = tables
            .iter()
            .map(|t| Run {
                tokens: &[],
                start: 0,
                table: t,
                wants_logits: true,
            })
            .collect();
        // Decode rows of the three sharing sequences and the other one, then a prefill tile of
        // the first sharing sequence past the shared blocks, and one still inside them.
        let rows: Vec<(usize, usize)> = [(0, 280), (1, 275), (2, 283), (3, 280)]
            .into_iter()
            .chain((284..288).map(|p| (0, p)))
            .chain([(1, 200)])
            .collect();
        let tasks = tasks(&rows, &runs, kv_heads);
        let shared: Vec<Vec<usize>> = tasks
            .iter()
            .filter(|t| t.kv == 0 && t.rows.len() > 1)
            .map(|t| t.rows.clone())
            .collect();
        // Range 0..128: every row of the sharing sequences; range 128..256: all but the last
        // row (it reads only part of it, so it is alone there); range 256..: the tile alone
        // (each sequence has its own last block).
        assert_eq!(
            shared,
            [
                vec![0, 1, 2, 4, 5, 6, 7, 8],
                vec![0, 1, 2, 4, 5, 6, 7],
                vec![4, 5, 6, 7]
            ]
        );
        assert_rows_equal_alone(&c, &rows, &runs, &kp, &vp);
    }

    fn split_attention_matches_naive(d: usize) {
        let (heads, kv_heads) = (6, 2);
        let c = config(heads, kv_heads, d);
        let len: usize = 301;
        let width = kv_heads * d;
        // Blocks deliberately out of order, as a real block table is.
        let blocks = len.div_ceil(16);
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let kp: Vec<f32> = (0..blocks * 16 * width).map(|i| noise(i, 1)).collect();
        let vp: Vec<f32> = (0..blocks * 16 * width).map(|i| noise(i, 2)).collect();
        for rows in [
            vec![(0, len - 1)],
            (len - 5..len).map(|p| (0, p)).collect::<Vec<_>>(),
        ] {
            let q: Vec<f32> = (0..rows.len() * heads * d).map(|i| noise(i, 3)).collect();
            let runs = [Run {
                tokens: &[],
                start: 0,
                table: &table,
                wants_logits: true,
            }];
            let got = attention(&c, &q, &rows, &runs, &kp, &vp, width);
            for (r, &(_, pos)) in rows.iter().enumerate() {
                for h in 0..heads {
                    let kv = h / (heads / kv_heads);
                    let qh = &q[(r * heads + h) * d..][..d];
                    let at = |pool: &[f32], p: usize| {
                        let s = slot(&table, p) * width + kv * d;
                        pool[s..s + d].to_vec()
                    };
                    let scores: Vec<f32> = (0..=pos)
                        .map(|p| dot(qh, &at(&kp, p)) / (d as f32).sqrt())
                        .collect();
                    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for i in 0..d {
                        let want: f32 = (0..=pos).map(|p| e[p] / z * at(&vp, p)[i]).sum();
                        let g = got[(r * heads + h) * d + i];
                        assert!(
                            (g - want).abs() < 1e-5,
                            "row {r} head {h} [{i}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
