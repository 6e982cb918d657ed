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
//!
//! The kernels are matrix-shaped. Keys are stored transposed within their block (see
//! `kv_cache::KvPool`), so up to six query heads of a task, whichever rows they belong to, are
//! scored against a block's 16 keys at once: per head element, one load of 16 keys serves twelve
//! FMAs, and no horizontal sum is needed. Up to six heads' weighted values are summed the same
//! way, 16 outputs at a time. Every score and every output is one FMA chain in a fixed order,
//! so how heads are grouped never changes a result. Before, each head took dot products with
//! eight keys at a time (a key load per FMA, and a horizontal sum per score): on a 4,049-token
//! SmolLM2 prefill, attention was about half the time, and the matrix kernels (with the merge
//! run in parallel and a task's partials in one allocation) took prefill from 127-137 to
//! 170-174 tokens/s.

use rayon::prelude::*;

use std::collections::HashMap;

use super::kv_cache::{key_index, slot, BLOCK_SIZE};
use super::math::{exp_shifted_sum, max_of};
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
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|t| {
            // The task's rows read the same blocks for these positions: any row's table will do.
            let table = runs[rows[t.rows[0]].0].table;
            let block_floats = BLOCK_SIZE * slot_width;
            let blocks: Vec<usize> = (t.p0..t.p1)
                .step_by(BLOCK_SIZE)
                .map(|p| table[p / BLOCK_SIZE] as usize)
                .collect();
            assert!(blocks
                .iter()
                .all(|&b| (b + 1) * block_floats <= k_pool.len().min(v_pool.len())));
            // Each row reads the positions from `p0` to its own (causal) end.
            let lens: Vec<usize> = t
                .rows
                .iter()
                .map(|&r| (rows[r].1 + 1).min(t.p1) - t.p0)
                .collect();
            // Scores per query head, whole blocks wide: a row's last block is scored whole and
            // the positions past the row's end are never read.
            let width = blocks.len() * BLOCK_SIZE;
            let heads = lens.len() * group;
            let q_of = |h: usize| {
                let (i, g) = (h / group, h % group);
                &q[(t.rows[i] * c.heads + t.kv * group + g) * d..][..d]
            };
            let mut scores = vec![0f32; heads * width];
            let (mut qs, mut at) = (Vec::with_capacity(heads), Vec::with_capacity(heads));
            for (bi, &b) in blocks.iter().enumerate() {
                let s0 = bi * BLOCK_SIZE;
                // The KV head's keys of the block: `[head_dim][16]`.
                let keys = &k_pool[b * block_floats + key_index(0, t.kv * d)..][..d * BLOCK_SIZE];
                qs.clear();
                at.clear();
                for h in (0..heads).filter(|&h| lens[h / group] > s0) {
                    qs.push(q_of(h));
                    at.push(h * width + s0);
                }
                block_scores(keys, &qs, scale, &mut scores, &at);
            }
            let (mut max, mut sum) = (vec![0f32; heads], vec![0f32; heads]);
            for (h, sc) in scores.chunks_exact_mut(width).enumerate() {
                let sc = &mut sc[..lens[h / group]];
                max[h] = max_of(sc);
                sum[h] = exp_shifted_sum(sc, max[h]);
            }
            // Values, `L1_POSITIONS` positions at a time for every query head reading them.
            let offsets: Vec<usize> = (t.p0..t.p1)
                .map(|p| slot(table, p) * slot_width + t.kv * d)
                .collect();
            let mut acc = vec![0f32; heads * d];
            let mut ws = Vec::with_capacity(heads);
            for (s0, offs) in (0..offsets.len())
                .step_by(L1_POSITIONS)
                .zip(offsets.chunks(L1_POSITIONS))
            {
                // Heads reading the same positions of the slice go together: all of them but
                // those of rows ending inside it (a prefill tile's diagonal).
                let reading = |h: usize| offs.len().min(lens[h / group].saturating_sub(s0));
                let mut h = 0;
                while h < heads {
                    let n = reading(h);
                    let end = (h..heads).find(|&e| reading(e) != n).unwrap_or(heads);
                    if n > 0 {
                        ws.clear();
                        at.clear();
                        for h in h..end {
                            ws.push(&scores[h * width + s0..][..n]);
                            at.push(h * d);
                        }
                        weighted_values(&ws, v_pool, &offs[..n], d, &mut acc, &at);
                    }
                    h = end;
                }
            }
            Partial { max, sum, acc }
        })
        .collect();

    // Merge each (row, KV head)'s partials in position order, whichever tasks computed them:
    // (row, KV head, first position, task, the row's index in the task).
    let mut order: Vec<(usize, usize, usize, usize, usize)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| {
            t.rows
                .iter()
                .enumerate()
                .map(move |(i, &r)| (r, t.kv, t.p0, ti, i))
        })
        .collect();
    order.sort_unstable();
    // Rows merge in parallel: serial, the merge took a tenth of a long prefill's attention while
    // the other cores waited.
    let by_row: Vec<_> = order.chunk_by(|a, b| a.0 == b.0).collect();
    assert_eq!(by_row.len(), rows.len(), "every row has partials");
    let mut out = vec![0f32; rows.len() * c.heads * d];
    out.par_chunks_mut(c.heads * d)
        .zip(by_row)
        .for_each(|(out, row_parts)| {
            for parts in row_parts.chunk_by(|a, b| a.1 == b.1) {
                let kv = parts[0].1;
                for g in 0..group {
                    // The part's head index within its task.
                    let part = |&(_, _, _, ti, i): &(usize, usize, usize, usize, usize)| {
                        (&partials[ti], i * group + g)
                    };
                    let m = parts
                        .iter()
                        .map(|e| {
                            let (p, h) = part(e);
                            p.max[h]
                        })
                        .fold(f32::NEG_INFINITY, f32::max);
                    let o = &mut out[(kv * group + g) * d..][..d];
                    let mut total = 0f32;
                    for e in parts {
                        let (p, h) = part(e);
                        let w = (p.max[h] - m).exp();
                        total += p.sum[h] * w;
                        axpy(w, &p.acc[h * d..(h + 1) * d], o);
                    }
                    let inv = 1.0 / total;
                    for v in o.iter_mut() {
                        *v *= inv;
                    }
                }
            }
        });
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

/// Positions whose values the query heads of a task read in turn: 32 head-dim-64 f32 rows are
/// 8 KiB, so they stay in L1 between heads. Over a whole task (128 positions, 32 KiB of keys
/// then 32 KiB of values) each of Qwen2.5-0.5B's 7 heads per KV head read them from L2, and
/// attention took a fifth of a 1,600-token prefill. Keys go a block (16 positions) at a time.
const L1_POSITIONS: usize = 32;

/// One task's share of a softmax: per query head of each of its rows (`row * group + g`), the
/// max score, the sum of `exp(score - max)` and the values weighted by it (`head_dim` each).
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// Query heads whose scores (or weighted values) one kernel call computes together: six heads
/// by two 8-float registers of positions (or outputs) are twelve accumulators of the sixteen
/// registers, and each loaded key (or value) register serves six FMAs.
const HEADS_PER_KERNEL: usize = 6;

/// The scores of the query heads `qs` against the 16 keys of one block (`keys`, laid out
/// `[head_dim][16]`), times `scale`, written at `out[at[i]..at[i] + 16]` for head `i`.
///
/// Every score is one FMA chain over the head dimension, whatever the other heads of the call:
/// a row's scores do not depend on who shares its task.
fn block_scores(keys: &[f32], qs: &[&[f32]], scale: f32, out: &mut [f32], at: &[usize]) {
    let d = keys.len() / BLOCK_SIZE;
    assert!(qs.len() == at.len() && qs.iter().all(|q| q.len() == d));
    assert!(at.iter().all(|&a| a + BLOCK_SIZE <= out.len()));
    #[cfg(target_feature = "avx2")]
    {
        const _: () = assert!(BLOCK_SIZE == 16);
        for (qs, at) in qs.chunks(HEADS_PER_KERNEL).zip(at.chunks(HEADS_PER_KERNEL)) {
            // SAFETY: AVX2 is enabled for the whole build; the lengths and offsets are checked
            // above.
            unsafe {
                match qs.len() {
                    1 => avx::block_scores::<1>(keys, qs, scale, out, at),
                    2 => avx::block_scores::<2>(keys, qs, scale, out, at),
                    3 => avx::block_scores::<3>(keys, qs, scale, out, at),
                    4 => avx::block_scores::<4>(keys, qs, scale, out, at),
                    5 => avx::block_scores::<5>(keys, qs, scale, out, at),
                    _ => avx::block_scores::<6>(keys, qs, scale, out, at),
                }
            }
        }
    }
    #[cfg(not(target_feature = "avx2"))]
    for (q, &a) in qs.iter().zip(at) {
        for (j, o) in out[a..a + BLOCK_SIZE].iter_mut().enumerate() {
            let mut s = 0f32;
            for (c, &qc) in q.iter().enumerate() {
                s += qc * keys[c * BLOCK_SIZE + j];
            }
            *o = s * scale;
        }
    }
}

/// For each query head `i`: `out[at[i]..at[i] + d] += Σ_p ws[i][p] * value_p`, the `d` values
/// at `offsets[p]` in `pool`. Every output is one FMA chain over the positions in order,
/// whatever the other heads of the call.
fn weighted_values(
    ws: &[&[f32]],
    pool: &[f32],
    offsets: &[usize],
    d: usize,
    out: &mut [f32],
    at: &[usize],
) {
    assert!(ws.len() == at.len() && ws.iter().all(|w| w.len() == offsets.len()));
    assert!(at.iter().all(|&a| a + d <= out.len()));
    assert!(offsets.iter().all(|&o| o + d <= pool.len()));
    #[cfg(target_feature = "avx2")]
    if d.is_multiple_of(16) {
        for (ws, at) in ws.chunks(HEADS_PER_KERNEL).zip(at.chunks(HEADS_PER_KERNEL)) {
            // SAFETY: as in `block_scores`.
            unsafe {
                match ws.len() {
                    1 => avx::weighted_values::<1>(ws, pool, offsets, d, out, at),
                    2 => avx::weighted_values::<2>(ws, pool, offsets, d, out, at),
                    3 => avx::weighted_values::<3>(ws, pool, offsets, d, out, at),
                    4 => avx::weighted_values::<4>(ws, pool, offsets, d, out, at),
                    5 => avx::weighted_values::<5>(ws, pool, offsets, d, out, at),
                    _ => avx::weighted_values::<6>(ws, pool, offsets, d, out, at),
                }
            }
        }
        return;
    }
    for (w, &a) in ws.iter().zip(at) {
        for (&wp, &off) in w.iter().zip(offsets) {
            axpy(wp, &pool[off..off + d], &mut out[a..a + d]);
        }
    }
}

#[cfg(target_feature = "avx2")]
mod avx {
    use std::arch::x86_64::*;

    use super::BLOCK_SIZE;

    /// `N` query heads against one block: per head element, one load of 16 keys (two
    /// registers), a broadcast per head and two FMAs per head.
    #[inline(always)]
    pub(super) unsafe fn block_scores<const N: usize>(
        keys: &[f32],
        qs: &[&[f32]],
        scale: f32,
        out: &mut [f32],
        at: &[usize],
    ) {
        let d = keys.len() / BLOCK_SIZE;
        let q: [*const f32; N] = std::array::from_fn(|i| qs[i].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let k = keys.as_ptr();
        for c in 0..d {
            let k0 = _mm256_loadu_ps(k.add(c * BLOCK_SIZE));
            let k1 = _mm256_loadu_ps(k.add(c * BLOCK_SIZE + 8));
            for i in 0..N {
                let qc = _mm256_broadcast_ss(&*q[i].add(c));
                acc[i][0] = _mm256_fmadd_ps(qc, k0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(qc, k1, acc[i][1]);
            }
        }
        let s = _mm256_set1_ps(scale);
        for i in 0..N {
            let o = out.as_mut_ptr().add(at[i]);
            _mm256_storeu_ps(o, _mm256_mul_ps(acc[i][0], s));
            _mm256_storeu_ps(o.add(8), _mm256_mul_ps(acc[i][1], s));
        }
    }

    /// `N` query heads' weighted values, 16 outputs at a time held in registers over all the
    /// positions: per position, two loads of values and a broadcast weight per head.
    #[inline(always)]
    pub(super) unsafe fn weighted_values<const N: usize>(
        ws: &[&[f32]],
        pool: &[f32],
        offsets: &[usize],
        d: usize,
        out: &mut [f32],
        at: &[usize],
    ) {
        let w: [*const f32; N] = std::array::from_fn(|i| ws[i].as_ptr());
        let o: [*mut f32; N] = std::array::from_fn(|i| out.as_mut_ptr().add(at[i]));
        let base = pool.as_ptr();
        for c in (0..d).step_by(16) {
            let mut acc: [[__m256; 2]; N] = std::array::from_fn(|i| {
                [
                    _mm256_loadu_ps(o[i].add(c)),
                    _mm256_loadu_ps(o[i].add(c + 8)),
                ]
            });
            for (p, &off) in offsets.iter().enumerate() {
                let v = base.add(off + c);
                let (v0, v1) = (_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8)));
                for i in 0..N {
                    let wp = _mm256_broadcast_ss(&*w[i].add(p));
                    acc[i][0] = _mm256_fmadd_ps(wp, v0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(wp, v1, acc[i][1]);
                }
            }
            for i in 0..N {
                _mm256_storeu_ps(o[i].add(c), acc[i][0]);
                _mm256_storeu_ps(o[i].add(c + 8), acc[i][1]);
            }
        }
    }
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

    /// Eight independent accumulators so the compiler can keep them in one SIMD register.
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
                    let key = |p: usize| -> Vec<f32> {
                        let s = slot(&table, p);
                        let block = &kp[s / 16 * 16 * width..];
                        (0..d)
                            .map(|i| block[key_index(s % 16, kv * d + i)])
                            .collect()
                    };
                    let at = |pool: &[f32], p: usize| {
                        let s = slot(&table, p) * width + kv * d;
                        pool[s..s + d].to_vec()
                    };
                    let scores: Vec<f32> = (0..=pos)
                        .map(|p| dot(qh, &key(p)) / (d as f32).sqrt())
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
