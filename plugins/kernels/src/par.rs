//! How work is split across threads.
//!
//! Row-wise ops hand each task enough rows to amortise rayon's overhead. Reductions over
//! rows (norm-weight and bias gradients, loss sums) split the rows into a number of blocks
//! that depends only on the row count, never on the thread count, and add the per-block
//! partial sums in block order: results are bit-identical whatever `threads` is.

/// Elements one task should cover at least.
const TASK_ELEMS: usize = 16 * 1024;

/// Upper bound on the number of partial sums a reduction keeps.
const MAX_PARTIALS: usize = 64;

/// Rows per task for a row-wise op over rows of `row_len` elements (at least 1).
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (TASK_ELEMS / row_len.max(1)).max(1)
}

/// Rows per block for a reduction over `n` rows of `row_len` elements (at least 1).
pub(crate) fn rows_per_block(n: usize, row_len: usize) -> usize {
    n.div_ceil(MAX_PARTIALS)
        .max(rows_per_task(row_len) / 4)
        .max(1)
}

/// Add `partials` (blocks of `width`) into `out` in block order.
pub(crate) fn add_partials(partials: &[f32], width: usize, out: &mut [f32]) {
    out.fill(0.0);
    if width == 0 {
        return;
    }
    for p in partials.chunks_exact(width) {
        for (o, &v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
}
