//! Sums over leading dimensions: bias gradients and the like.
//!
//! `y` names the trailing dimensions that are kept; everything before them is summed, so
//! `[B, T, C] → [C]` gives a bias gradient and `[B, T, C] → [T, C]` a position-embedding
//! gradient from the same op. Each block of rows sums into its own partial vector with plain
//! vector adds; the partials are then added in block order (see [`crate::par`]).

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{expect_attrs, floats, inputs, outputs, Floats, Out, Result};
use crate::error::KernelError;
use crate::par::{add_partials, rows_per_block};
use crate::simd::multiversion;
use crate::Ctx;

multiversion! {
    /// `acc += Σ rows` for rows of `acc.len()` elements.
    fn add_rows<M>(rows: &[f32], acc: &mut [f32]) {
        let c = acc.len();
        for r in rows.chunks_exact(c) {
            for (a, &v) in acc.iter_mut().zip(r) {
                *a += v;
            }
        }
    }
}

pub(crate) fn sum_rows(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "sum_rows";
    let [x] = inputs::<1>(OP, ins)?;
    let [y] = outputs::<1>(OP, outs)?;
    expect_attrs(OP, attrs, 0)?;
    let x = floats(OP, "x", x, Floats::F32OrBf16)?;
    let mut y = Out::open(OP, "y", y, Floats::F32OrBf16, false)?;
    let ys = y.shape();
    if ys.len() > x.shape.len() || x.shape[x.shape.len() - ys.len()..] != *ys {
        return Err(KernelError::Shape {
            op: OP,
            name: "y",
            found: ys.to_vec(),
            expected: format!("trailing dimensions of x's shape {:?}", x.shape),
        });
    }
    let c: usize = ys.iter().product();
    let n = x.data.len().checked_div(c).unwrap_or(0);
    if n > 0 {
        let rows = rows_per_block(n, c);
        let mut partials = vec![0.0f32; n.div_ceil(rows) * c];
        let level = ctx.level;
        partials
            .par_chunks_mut(c)
            .zip(x.data.par_chunks(rows * c))
            .for_each(|(acc, xb)| add_rows(level, xb, acc));
        add_partials(&partials, c, y.data());
    } else {
        y.data().fill(0.0);
    }
    y.finish();
    Ok(())
}
