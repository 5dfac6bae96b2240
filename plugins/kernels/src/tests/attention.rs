//! `causal_attention` against naive masked-softmax attention in f64, with as many keys as
//! queries and with more (the mask aligned to the last key).

use codex_plugin_api::DType;

use super::*;

/// One head's sizes: `t` queries, `s` keys, `d` dimensions; query `i` sees keys
/// `0..=s - t + i`.
#[derive(Copy, Clone)]
struct Sizes {
    t: usize,
    s: usize,
    d: usize,
}

/// `(out, lse)` of every head.
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    Sizes { t, s, d }: Sizes,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; q.len()], Vec::new());
    for h in 0..q.len() / (t * d).max(1) {
        let (qb, kb) = (h * t * d, h * s * d);
        for i in 0..t {
            let scores: Vec<f64> = (0..=s - t + i)
                .map(|j| {
                    scale
                        * dotf(
                            &q[qb + i * d..qb + (i + 1) * d],
                            &k[kb + j * d..kb + (j + 1) * d],
                        )
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = scores.iter().map(|x| (x - m).exp()).sum();
            for (j, sj) in scores.iter().enumerate() {
                let p = (sj - m).exp() / l;
                for c in 0..d {
                    out[qb + i * d + c] += p * v[kb + j * d + c];
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
    sizes: Sizes,
    scale: f64,
) -> [Vec<f64>; 3] {
    let Sizes { t, s, d } = sizes;
    let (out, lse) = reference(q, k, v, sizes, scale);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for h in 0..q.len() / (t * d).max(1) {
        let (qb, kb) = (h * t * d, h * s * d);
        let qrow = |x: &[f64], i: usize| x[qb + i * d..qb + (i + 1) * d].to_vec();
        let krow = |x: &[f64], j: usize| x[kb + j * d..kb + (j + 1) * d].to_vec();
        for i in 0..t {
            let delta = dotf(&qrow(dout, i), &qrow(&out, i));
            for j in 0..=s - t + i {
                let p = (scale * dotf(&qrow(q, i), &krow(k, j)) - lse[h * t + i]).exp();
                let dp = dotf(&qrow(dout, i), &krow(v, j));
                let ds = p * (dp - delta) * scale;
                for c in 0..d {
                    dv[kb + j * d + c] += p * dout[qb + i * d + c];
                    dq[qb + i * d + c] += ds * k[kb + j * d + c];
                    dk[kb + j * d + c] += ds * q[qb + i * d + c];
                }
            }
        }
    }
    [dq, dk, dv]
}

/// Queries of `shape` (`[.., t, d]`) over `s` keys.
fn check(shape: &[usize], s: usize, dtype: DType, seed: u64) {
    let r = shape.len();
    let (t, d) = (shape[r - 2], shape[r - 1]);
    let sizes = Sizes { t, s, d };
    let lead = &shape[..r - 1];
    let mut kshape = shape.to_vec();
    kshape[r - 2] = s;
    let kshape = kshape.as_slice();
    let len: usize = shape.iter().product();
    let klen: usize = kshape.iter().product();
    let scale = 1.0 / (d.max(1) as f64).sqrt();
    let mut rn = rng(seed);
    let mut draw = |n: usize| quantise(dtype, &uniform(&mut rn, n, -2.0, 2.0));
    let (q, k, v, dout) = (draw(len), draw(klen), draw(klen), draw(len));
    let (out, lse) = reference(&q, &k, &v, sizes, scale);
    let [dq, dk, dv] = reference_bwd(&q, &k, &v, &dout, sizes, scale);
    if len + 2 * klen <= 600 {
        let loss =
            |q: &[f64], k: &[f64], v: &[f64]| dotf(&reference(q, k, v, sizes, scale).0, &dout);
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
        let what = format!("{name} {dtype:?} {shape:?} over {s} keys");
        let (qb, kb, vb) = (
            Buf::floats(dtype, shape, &q),
            Buf::floats(dtype, kshape, &k),
            Buf::floats(dtype, kshape, &v),
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
            Buf::zeros(dtype, kshape),
            Buf::zeros(dtype, kshape),
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
    for (i, shape) in shapes.iter().enumerate() {
        let t = shape[shape.len() - 2];
        check(shape, t, DType::F32, i as u64);
        check(shape, t, DType::BF16, 30 + i as u64);
    }
}

/// New positions attending over a key/value cache and themselves: query `i` sees keys
/// `0..=s − t + i`. One query (a decoding step), several, and blocks of queries over many keys.
#[test]
fn attention_over_more_keys_aligns_the_mask_to_the_last_key() {
    let cases: &[(&[usize], usize)] = &[
        (&[1, 1, 1, 1], 4),
        (&[1, 2, 1, 5], 9),
        (&[2, 1, 3, 5], 7),
        (&[1, 1, 33, 16], 40),
        (&[2, 2, 5, 64], 70),
        (&[3, 1, 8], 41),
    ];
    for (i, (shape, s)) in cases.iter().enumerate() {
        check(shape, *s, DType::F32, 60 + i as u64);
        check(shape, *s, DType::BF16, 90 + i as u64);
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
    let sizes = Sizes {
        t: 200,
        s: 200,
        d: 16,
    };
    let (out, lse) = reference(&q, &k, &v, sizes, 3.0);
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
