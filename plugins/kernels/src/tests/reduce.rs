//! `sum_rows` against an f64 reference.

use codex_plugin_api::DType;

use super::*;

fn check(x_shape: &[usize], keep: usize, dtype: DType, seed: u64) {
    let y_shape = &x_shape[x_shape.len() - keep..];
    let c: usize = y_shape.iter().product();
    let len: usize = x_shape.iter().product();
    let x = quantise(dtype, &uniform(&mut rng(seed), len, -1.0, 1.0));
    let mut want = vec![0.0; c];
    for row in x.chunks(c.max(1)) {
        for (w, v) in want.iter_mut().zip(row) {
            *w += v;
        }
    }
    let rows = (len / c.max(1)) as f64;
    for (name, k) in kernels() {
        let what = format!("{name} {dtype:?} {x_shape:?} → {y_shape:?}");
        let mut out = [Buf::floats(dtype, y_shape, &vec![5.0; c])];
        run(
            &k,
            "sum_rows",
            &[&Buf::floats(dtype, x_shape, &x)],
            &[],
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&what, &out[0].values(), &want, tol(dtype, rows.sqrt()));
    }
}

#[test]
fn sum_rows_matches_reference() {
    let cases: &[(&[usize], usize)] = &[
        (&[1, 1], 1),
        (&[1, 3], 1),
        (&[5, 3], 1),
        (&[4, 7, 3], 1),
        (&[4, 7, 3], 2),
        (&[6], 0),
        (&[2048, 128], 1),
        (&[3, 33, 384], 2),
        (&[2, 3], 2),
    ];
    for (i, (shape, keep)) in cases.iter().enumerate() {
        check(shape, *keep, DType::F32, i as u64);
        check(shape, *keep, DType::BF16, 10 + i as u64);
    }
}
