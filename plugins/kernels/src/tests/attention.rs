//! `causal_attention` against naive masked-softmax attention in f64.

use codex_plugin_api::DType;

use super::*;

/// `(out, lse)` of every head.
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    t: usize,
    d: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; q.len()], Vec::new());
    for h in 0..q.len() / (t * d).max(1) {
        let base = h * t * d;
        for i in 0..t {
            let s: Vec<f64> = (0..=i)
                .map(|j| {
                    scale
                        * dotf(
                            &q[base + i * d..base + (i + 1) * d],
                            &k[base + j * d..base + (j + 1) * d],
                        )
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (j, sj) in s.iter().enumerate() {
                let p = (sj - m).exp() / l;
                for c in 0..d {
                    out[base + i * d + c] += p * v[base + j * d + c];
                }
            }
            lse.push(m + l.ln());
        }
    }
    (out, lse)
}

/// `(dq, dk, dv)` from the full probability matrix of each head.
fn reference_bwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    t: usize,
    d: usize,
    scale: f64,
) -> [Vec<f64>; 3] {
    let (out, lse) = reference(q, k, v, t, d, scale);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; q.len()], vec![0.0; q.len()]);
    for h in 0..q.len() / (t * d).max(1) {
        let b = h * t * d;
        let row = |x: &[f64], i: usize| x[b + i * d..b + (i + 1) * d].to_vec();
        for i in 0..t {
            let delta = dotf(&row(dout, i), &row(&out, i));
            for j in 0..=i {
                let p = (scale * dotf(&row(q, i), &row(k, j)) - lse[h * t + i]).exp();
                let dp = dotf(&row(dout, i), &row(v, j));
                let ds = p * (dp - delta) * scale;
                for c in 0..d {
                    dv[b + j * d + c] += p * dout[b + i * d + c];
                    dq[b + i * d + c] += ds * k[b + j * d + c];
                    dk[b + j * d + c] += ds * q[b + i * d + c];
                }
            }
        }
    }
    [dq, dk, dv]
}

fn check(shape: &[usize], dtype: DType, seed: u64) {
    let (t, d) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let lead = &shape[..shape.len() - 1];
    let len: usize = shape.iter().product();
    let scale = 1.0 / (d.max(1) as f64).sqrt();
    let mut r = rng(seed);
    let mut draw = || quantise(dtype, &uniform(&mut r, len, -2.0, 2.0));
    let (q, k, v, dout) = (draw(), draw(), draw(), draw());
    let (out, lse) = reference(&q, &k, &v, t, d, scale);
    let [dq, dk, dv] = reference_bwd(&q, &k, &v, &dout, t, d, scale);
    if len <= 200 {
        let loss =
            |q: &[f64], k: &[f64], v: &[f64]| dotf(&reference(q, k, v, t, d, scale).0, &dout);
        assert_close(
            "dq vs finite differences",
            &dq,
            &fd(|x| loss(x, &k, &v), &q, 1e-5),
            FD_TOL,
        );
        assert_close(
            "dk vs finite differences",
            &dk,
            &fd(|x| loss(&q, x, &v), &k, 1e-5),
            FD_TOL,
        );
        assert_close(
            "dv vs finite differences",
            &dv,
            &fd(|x| loss(&q, &k, x), &v, 1e-5),
            FD_TOL,
        );
    }
    let big = scale_of(&[&dq, &dk, &dv]);
    for (name, kern) in kernels() {
        let what = format!("{name} {dtype:?} {shape:?}");
        let (qb, kb, vb) = (
            Buf::floats(dtype, shape, &q),
            Buf::floats(dtype, shape, &k),
            Buf::floats(dtype, shape, &v),
        );
        let mut outs = [Buf::zeros(dtype, shape), Buf::zeros(DType::F32, lead)];
        run(
            &kern,
            "causal_attention.fwd",
            &[&qb, &kb, &vb],
            &[scale],
            &mut outs,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(
            &format!("{what} out"),
            &outs[0].values(),
            &out,
            tol(dtype, 2.0),
        );
        assert_close(
            &format!("{what} lse"),
            &outs[1].values(),
            &lse,
            tol(DType::F32, 4.0),
        );
        // The backward pass gets the reference `out` so that its error is its own.
        let ob = Buf::floats(dtype, shape, &out);
        let lb = Buf::floats(DType::F32, lead, &lse);
        let ins = [&qb, &kb, &vb, &ob, &lb, &Buf::floats(dtype, shape, &dout)];
        let mut grads = [
            Buf::zeros(dtype, shape),
            Buf::zeros(dtype, shape),
            Buf::zeros(dtype, shape),
        ];
        run(&kern, "causal_attention.bwd", &ins, &[scale], &mut grads)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        for (g, (n, w)) in grads.iter().zip([("dq", &dq), ("dk", &dk), ("dv", &dv)]) {
            let dtol = match dtype {
                DType::BF16 => (3e-2 * big, 3e-2),
                _ => tol(dtype, big),
            };
            assert_close(&format!("{what} {n}"), &g.values(), w, dtol);
        }
    }
}

fn scale_of(v: &[&Vec<f64>]) -> f64 {
    v.iter().fold(1.0, |m, x| m.max(scale(x)))
}

#[test]
fn attention_matches_naive_attention() {
    let shapes: &[&[usize]] = &[
        &[1, 1, 1, 1],
        &[1, 1, 1, 5],
        &[1, 2, 3, 5],
        &[2, 1, 17, 5],
        &[1, 1, 33, 32],
        &[2, 2, 70, 64],
        &[1, 1, 37, 3],
        &[3, 40, 8],
    ];
    for (i, s) in shapes.iter().enumerate() {
        check(s, DType::F32, i as u64);
        check(s, DType::BF16, 30 + i as u64);
    }
}

#[test]
fn attention_handles_long_sequences_and_large_scores() {
    // t above several blocks, scores large enough that an unshifted exp would overflow.
    let shape = [1, 1, 200, 16];
    let len = 200 * 16;
    let mut r = rng(77);
    let mut draw = || uniform(&mut r, len, -6.0, 6.0);
    let (q, k, v) = (draw(), draw(), draw());
    let (out, lse) = reference(&q, &k, &v, 200, 16, 3.0);
    for (name, kern) in kernels() {
        let ins = [
            &Buf::floats(DType::F32, &shape, &q),
            &Buf::floats(DType::F32, &shape, &k),
            &Buf::floats(DType::F32, &shape, &v),
        ];
        let mut outs = [
            Buf::zeros(DType::F32, &shape),
            Buf::zeros(DType::F32, &[1, 1, 200]),
        ];
        run(&kern, "causal_attention.fwd", &ins, &[3.0], &mut outs)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_close(
            &format!("{name} out"),
            &outs[0].values(),
            &out,
            (1e-3, 1e-3),
        );
        assert_close(&format!("{name} lse"), &outs[1].values(), &lse, (0.0, 1e-5));
    }
}
