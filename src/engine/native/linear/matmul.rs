//! The quantized matmul around the block kernels: a step's activations quantized to 8 bits in
//! blocks of `QK` (`Acts`), and the driver that runs a block type's dot products over tiles of
//! weight rows and activation rows, in parallel over ranges of weight rows (`by_weight_rows`,
//! which candle's block types share).

use rayon::prelude::*;

use super::blocks::Block;
use super::QK;

/// 32 activation values of a block, as `d * qs[i]` (`d` is in the group's `d` lanes): one
/// aligned load. The values sit apart from their scales so that a row's blocks are dense: with
/// the scales inside, a block took a whole 64-byte line (aligned) or most loads crossed a line
/// (40 bytes unaligned), and a 16-row activation tile of a 896-wide input no longer fitted L1
/// beside the streaming weights.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct ActValues(pub(super) [i8; QK]);

/// Activation rows are quantized in groups of this many, interleaved block by block: the most
/// rows a kernel takes at once.
pub(super) const GROUP: usize = 8;

/// One f32 per row of a group (lane `i` is row `i`), aligned for one vector load.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct Lanes(pub(super) [f32; GROUP]);

/// Rows `row..` of one group of quantized activation rows: block `b` of the group's row `i` is
/// `d[b].0[i] * qs[b * GROUP + i]`, and `s[b].0[i]` is `d[b].0[i] * Σ qs[b * GROUP + i]` (what
/// an offset or a min multiplies).
///
/// Interleaving the group's rows block by block lets an 8-row kernel address all of them from
/// one pointer, take the eight rows' scales in one load, and multiply them by the weight's
/// scale (and the mins by their sums) once per block instead of once per row. With one pointer
/// pair per row, sixteen pointers spilled to the stack, and the per-row scale multiply and
/// scalar offset were a third of the unsigned kernels' instructions.
#[derive(Clone, Copy)]
pub(super) struct ActRows<'a> {
    pub(super) qs: &'a [ActValues],
    pub(super) d: &'a [Lanes],
    pub(super) s: &'a [Lanes],
    /// The first row taken, within the group; a kernel of `R` rows takes `row..row + R`.
    pub(super) row: usize,
}

impl ActRows<'_> {
    /// The same group from row `row + i`.
    pub(super) fn skip(self, i: usize) -> Self {
        Self {
            row: self.row + i,
            ..self
        }
    }
}

/// A step's activations quantized in blocks of `QK`, in groups of `GROUP` rows.
struct Acts {
    qs: Vec<ActValues>,
    d: Vec<Lanes>,
    s: Vec<Lanes>,
    /// Blocks per row.
    kb: usize,
}

impl Acts {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let groups = m.div_ceil(GROUP);
        // Padding rows of the last group stay zero: kernels never return them.
        let mut qs = vec![ActValues([0; QK]); groups * kb * GROUP];
        let mut d = vec![Lanes([0.0; GROUP]); groups * kb];
        let mut s = vec![Lanes([0.0; GROUP]); groups * kb];
        let (gq, gd) = (kb * GROUP, kb);
        if m >= 2 * GROUP {
            qs.par_chunks_mut(gq)
                .zip(d.par_chunks_mut(gd))
                .zip(s.par_chunks_mut(gd))
                .zip(x.par_chunks(k * GROUP))
                .for_each(|(((qs, d), s), x)| quantize_group(x, k, qs, d, s));
        } else {
            for (((qs, d), s), x) in qs
                .chunks_mut(gq)
                .zip(d.chunks_mut(gd))
                .zip(s.chunks_mut(gd))
                .zip(x.chunks(k * GROUP))
            {
                quantize_group(x, k, qs, d, s);
            }
        }
        Self { qs, d, s, kb }
    }

    /// Row `r` onwards, within its group.
    fn rows(&self, r: usize) -> ActRows<'_> {
        let g = r / GROUP;
        ActRows {
            qs: &self.qs[g * self.kb * GROUP..(g + 1) * self.kb * GROUP],
            d: &self.d[g * self.kb..(g + 1) * self.kb],
            s: &self.s[g * self.kb..(g + 1) * self.kb],
            row: r % GROUP,
        }
    }
}

/// Quantize one group's rows (`x` holds up to `GROUP` rows of `k` values).
fn quantize_group(x: &[f32], k: usize, qs: &mut [ActValues], d: &mut [Lanes], s: &mut [Lanes]) {
    for (i, x) in x.chunks(k).enumerate() {
        quantize_row(x, i, qs, d, s);
    }
}

/// Quantize row `i` of a group.
fn quantize_row(x: &[f32], i: usize, qs: &mut [ActValues], d: &mut [Lanes], s: &mut [Lanes]) {
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs[b * GROUP + i].0.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        d[b].0[i] = scale;
        s[b].0[i] = scale * sum as f32;
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
pub(super) fn quantized_rows<B: Block>(
    w: &[B],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let acts = Acts::quantize(x, m, k);
    let wb = acts.kb / B::ACTS;
    // Activation rows in tiles small enough to stay in L1 beside the weight rows streaming past,
    // against weight rows in tiles that stay in L2 while every activation tile passes: without
    // the first a 300-row prefill ran at half the speed of a 16-row one; without the second each
    // activation tile streamed the task's weights (0.75 MB for Qwen2.5-0.5B's gate/up) from L3
    // again.
    let rows_per_w_tile = (W_TILE_BYTES / (wb * std::mem::size_of::<B>()).max(1)).max(1);
    let act_block_bytes = std::mem::size_of::<ActValues>() + 2 * std::mem::size_of::<f32>();
    let row_tile = (A_TILE_BYTES / (acts.kb * act_block_bytes).max(1)).clamp(8, 32) / 8 * 8;
    by_weight_rows(m, n, |cols, out| {
        for w0 in cols.clone().step_by(rows_per_w_tile) {
            let w1 = (w0 + rows_per_w_tile).min(cols.end);
            for r0 in (0..m).step_by(row_tile) {
                let r1 = (r0 + row_tile).min(m);
                for j in w0..w1 {
                    let wrow = &w[j * wb..(j + 1) * wb];
                    // Rows in eights; a tail of 2-7 rows (a decode step's few sequences) is the
                    // last of its group, whose padding rows are zero: one wider kernel decodes
                    // the weight row once for all of them, where one-row kernels decoded it per
                    // row. Every kernel computes a row alike, so the padding changes no output.
                    for r in (r0..r1).step_by(8) {
                        match (r1 - r).min(8) {
                            1 => out.put(r, j, &[B::dot(wrow, acts.rows(r))]),
                            t @ 2..=4 => out.put(r, j, &B::dot4(wrow, acts.rows(r))[..t]),
                            t => out.put(r, j, &B::dot8(wrow, acts.rows(r))[..t]),
                        }
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
/// of 4, 72; aligned 64-byte blocks, 79; 16-row tiles, 81; values apart from scales (a block is
/// 32 bytes of values and 8 of scales), then rows interleaved in groups, see
/// `docs/performance.md`.
const A_TILE_BYTES: usize = 16 << 10;

/// The `[m, n]` output of one task of [`by_weight_rows`]: it may write only its own columns.
pub(super) struct Columns {
    ptr: *mut f32,
    m: usize,
    n: usize,
    cols: std::ops::Range<usize>,
}

impl Columns {
    /// Outputs `(r, j)`, `(r + 1, j)`, ...: consecutive rows of column `j`.
    #[inline]
    pub(super) fn put(&self, r: usize, j: usize, v: &[f32]) {
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
pub(super) fn by_weight_rows(
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
