//! `causal_attention` and `packed_attention` against naive masked-softmax attention in f64,
//! with as many keys as queries and with more (the mask aligned to the last key), and packed
//! rows of random segment layouts.

use codex_plugin_api::DType;

use super::*;

/// One head's sizes: `t` queries, `s` keys, `d` dimensions; query `i` of head `h` sees keys
/// `first[h·t + i]..=s - t + i`.
#[derive(Copy, Clone)]
struct Sizes {
    t: usize,
    s: usize,
    d: usize,
}

/// `(out, lse)` of every head, query `i` of head `h` seeing keys `first[h·t + i]..=s − t + i`.
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    Sizes { t, s, d }: Sizes,
    first: &[usize],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; q.len()], Vec::new());
    for h in 0..q.len() / (t * d).max(1) {
        let (qb, kb) = (h * t * d, h * s * d);
        for i in 0..t {
            let f = first[h * t + i];
            let scores: Vec<f64> = (f..=s - t + i)
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
            for (j, sj) in (f..).zip(&scores) {
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
    first: &[usize],
    scale: f64,
) -> [Vec<f64>; 3] {
    let Sizes { t, s, d } = sizes;
    let (out, lse) = reference(q, k, v, sizes, first, scale);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for h in 0..q.len() / (t * d).max(1) {
        let (qb, kb) = (h * t * d, h * s * d);
        let qrow = |x: &[f64], i: usize| x[qb + i * d..qb + (i + 1) * d].to_vec();
        let krow = |x: &[f64], j: usize| x[kb + j * d..kb + (j + 1) * d].to_vec();
        for i in 0..t {
            let delta = dotf(&qrow(dout, i), &qrow(&out, i));
            for j in first[h * t + i]..=s - t + i {
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

/// The first keys of a packed call: u32 `[rows, t]`, row-major; head `g` of `H` uses row
/// `g / (H / rows)`.
struct Packing {
    rows: usize,
    starts: Vec<u32>,
}

impl Packing {
    /// The first key of every query of every head, `[H, t]`.
    fn first(&self, heads: usize, t: usize) -> Vec<usize> {
        let per = heads / self.rows;
        (0..heads * t)
            .map(|x| self.starts[(x / t / per) * t + x % t] as usize)
            .collect()
    }

    fn buf(&self, t: usize) -> Buf {
        Buf::u32s(&[self.rows, t], &self.starts)
    }
}

/// Queries of `shape` (`[.., t, d]`) over `s` keys: `packed_attention` with `packing`,
/// `causal_attention` without.
fn check(shape: &[usize], s: usize, packing: Option<&Packing>, dtype: DType, seed: u64) {
    let r = shape.len();
    let (t, d) = (shape[r - 2], shape[r - 1]);
    let heads: usize = shape[..r - 2].iter().product();
    let sizes = Sizes { t, s, d };
    let first = packing.map_or(vec![0; heads * t], |p| p.first(heads, t));
    let (fwd, bwd) = match packing {
        Some(_) => ("packed_attention.fwd", "packed_attention.bwd"),
        None => ("causal_attention.fwd", "causal_attention.bwd"),
    };
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
    let (out, lse) = reference(&q, &k, &v, sizes, &first, scale);
    let [dq, dk, dv] = reference_bwd(&q, &k, &v, &dout, sizes, &first, scale);
    if len + 2 * klen <= 600 {
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            dotf(&reference(q, k, v, sizes, &first, scale).0, &dout)
        };
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
    let starts = packing.map(|p| p.buf(t));
    for (name, kern) in kernels() {
        let what = format!("{name} {fwd} {dtype:?} {shape:?} over {s} keys");
        let (qb, kb, vb) = (
            Buf::floats(dtype, shape, &q),
            Buf::floats(dtype, kshape, &k),
            Buf::floats(dtype, kshape, &v),
        );
        let mut outs = [Buf::zeros(dtype, shape), Buf::zeros(DType::F32, lead)];
        let ins: Vec<&Buf> = [&qb, &kb, &vb].into_iter().chain(&starts).collect();
        run(&kern, fwd, &ins, &[scale], &mut outs).unwrap_or_else(|e| panic!("{what}: {e}"));
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
        let db = Buf::floats(dtype, shape, &dout);
        let ins: Vec<&Buf> = [&qb, &kb, &vb, &ob, &lb, &db]
            .into_iter()
            .chain(&starts)
            .collect();
        let mut grads = [
            Buf::zeros(dtype, shape),
            Buf::zeros(dtype, kshape),
            Buf::zeros(dtype, kshape),
        ];
        run(&kern, bwd, &ins, &[scale], &mut grads).unwrap_or_else(|e| panic!("{what}: {e}"));
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
        check(shape, t, None, DType::F32, i as u64);
        check(shape, t, None, DType::BF16, 30 + i as u64);
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
        check(shape, *s, None, DType::F32, 60 + i as u64);
        check(shape, *s, None, DType::BF16, 90 + i as u64);
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
    let (out, lse) = reference(&q, &k, &v, sizes, &[0; 200], 3.0);
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

/// How one row of a packed batch is cut into examples.
#[derive(Copy, Clone)]
enum Cut {
    /// Examples of random lengths from 1 to this.
    Random(usize),
    /// One example over the whole row.
    Whole,
    /// Examples of one token each: every query sees itself only.
    Singles,
    /// These lengths, in order.
    Lengths(&'static [usize]),
}

/// The first keys of `t` queries aligned to the last of `s` key positions, the positions cut
/// into consecutive examples as `cut` says: each query's first key is the first position of
/// its own example.
fn segment_starts(rn: &mut rand_chacha::ChaCha8Rng, s: usize, t: usize, cut: Cut) -> Vec<u32> {
    use rand::Rng;
    let mut lengths = match cut {
        Cut::Lengths(lens) => lens.iter(),
        _ => [].iter(),
    };
    let mut first = Vec::with_capacity(s);
    while first.len() < s {
        let at = first.len();
        let len = match cut {
            Cut::Random(max) => rn.random_range(1..=max),
            Cut::Whole => s,
            Cut::Singles => 1,
            Cut::Lengths(_) => lengths.next().map_or(s, |&l| l.max(1)),
        };
        first.extend(std::iter::repeat_n(at as u32, len.min(s - at)));
    }
    first.split_off(s - t)
}

/// Rows of `starts` cut as `cuts` says, one row per cut.
fn packing(seed: u64, s: usize, t: usize, cuts: &[Cut]) -> Packing {
    let mut rn = rng(seed);
    let starts = cuts
        .iter()
        .flat_map(|&c| segment_starts(&mut rn, s, t, c))
        .collect();
    Packing {
        rows: cuts.len(),
        starts,
    }
}

/// Several examples per row, examples of one token, a row that is one example, odd `t` and
/// `d`, fewer queries than keys, one row of starts per batch row, per head and for all heads.
#[test]
fn packed_attention_matches_naive_attention() {
    use Cut::*;
    let cases: &[(&[usize], usize, &[Cut])] = &[
        (&[1, 1, 1, 1], 1, &[Whole]),
        (&[1, 1, 6, 4], 6, &[Singles]),
        (&[2, 3, 17, 5], 17, &[Random(6), Random(3)]),
        (&[2, 2, 70, 64], 70, &[Random(20), Whole]),
        (&[1, 2, 37, 3], 37, &[Singles]),
        (&[2, 4, 33, 7], 33, &[Random(9), Singles, Whole, Random(2)]),
        (&[2, 2, 9, 5], 9, &[Random(4), Random(4), Whole, Singles]),
        (
            &[3, 40, 8],
            41,
            &[Random(12), Lengths(&[1, 30, 1, 9]), Whole],
        ),
        (&[2, 1, 5, 64], 70, &[Lengths(&[66, 1, 3]), Random(2)]),
        (&[1, 3, 45, 16], 60, &[Lengths(&[20, 1, 1, 31, 1, 6])]),
    ];
    for (i, (shape, s, cuts)) in cases.iter().enumerate() {
        let t = shape[shape.len() - 2];
        let p = packing(200 + i as u64, *s, t, cuts);
        check(shape, *s, Some(&p), DType::F32, 120 + i as u64);
        check(shape, *s, Some(&p), DType::BF16, 150 + i as u64);
    }
}

/// With every first key 0, packed attention is causal attention, to the bit.
#[test]
fn packed_attention_with_zero_starts_is_causal_attention_bitwise() {
    let cases: &[(&[usize], usize)] = &[
        (&[1, 1, 1, 1], 1),
        (&[2, 3, 37, 5], 37),
        (&[2, 2, 70, 64], 70),
        (&[1, 2, 33, 16], 50),
        (&[3, 40, 8], 41),
    ];
    for (ci, (shape, s)) in cases.iter().enumerate() {
        let r = shape.len();
        let (t, d) = (shape[r - 2], shape[r - 1]);
        let lead = &shape[..r - 1];
        let mut kshape = shape.to_vec();
        kshape[r - 2] = *s;
        let scale = 1.0 / (d as f64).sqrt();
        for dtype in [DType::F32, DType::BF16] {
            let mut rn = rng(300 + ci as u64);
            let mut draw = |shape: &[usize]| {
                let n = shape.iter().product();
                Buf::floats(dtype, shape, &uniform(&mut rn, n, -2.0, 2.0))
            };
            let (q, k, v, dout) = (draw(shape), draw(&kshape), draw(&kshape), draw(shape));
            for rows in [1, shape[0]] {
                let zeros = Buf::u32s(&[rows, t], &vec![0; rows * t]);
                for (name, kern) in kernels() {
                    let what = format!("{name} {dtype:?} {shape:?} over {s} keys, {rows} rows");
                    let fwd = |op: &str, extra: Option<&Buf>| {
                        let mut outs = [Buf::zeros(dtype, shape), Buf::zeros(DType::F32, lead)];
                        let ins: Vec<&Buf> = [&q, &k, &v].into_iter().chain(extra).collect();
                        run(&kern, op, &ins, &[scale], &mut outs)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        outs
                    };
                    let causal = fwd("causal_attention.fwd", None);
                    let packed = fwd("packed_attention.fwd", Some(&zeros));
                    assert_eq!(causal[0].bytes, packed[0].bytes, "{what}: out");
                    assert_eq!(causal[1].bytes, packed[1].bytes, "{what}: lse");
                    let [o, l] = &causal;
                    let bwd = |op: &str, extra: Option<&Buf>| {
                        let mut grads = [
                            Buf::zeros(dtype, shape),
                            Buf::zeros(dtype, &kshape),
                            Buf::zeros(dtype, &kshape),
                        ];
                        let ins: Vec<&Buf> =
                            [&q, &k, &v, o, l, &dout].into_iter().chain(extra).collect();
                        run(&kern, op, &ins, &[scale], &mut grads)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        grads
                    };
                    let causal = bwd("causal_attention.bwd", None);
                    let packed = bwd("packed_attention.bwd", Some(&zeros));
                    for (n, (c, p)) in ["dq", "dk", "dv"].iter().zip(causal.iter().zip(&packed)) {
                        assert_eq!(c.bytes, p.bytes, "{what}: {n}");
                    }
                }
            }
        }
    }
}

/// Keys before every query's first key (an earlier example's, over a key/value cache) are
/// never read: NaN there changes nothing, and their gradients are exactly 0.
#[test]
fn packed_attention_never_reads_keys_before_every_first_key() {
    let (shape, kshape, lead) = ([1, 2, 40, 8], [1, 2, 56, 8], [1, 2, 40]);
    let sizes = Sizes { t: 40, s: 56, d: 8 };
    let p = packing(9, 56, 40, &[Cut::Lengths(&[16, 10, 1, 29])]);
    assert!(p.starts.iter().all(|&s| s >= 16));
    let first = p.first(2, 40);
    let mut rn = rng(400);
    let mut draw = |n: usize| uniform(&mut rn, n, -2.0, 2.0);
    let (q, mut k, mut v, dout) = (draw(640), draw(896), draw(896), draw(640));
    for h in 0..2 {
        k[h * 448..h * 448 + 16 * 8].fill(f64::NAN);
        v[h * 448..h * 448 + 16 * 8].fill(f64::NAN);
    }
    let scale = 0.35;
    let (out, lse) = reference(&q, &k, &v, sizes, &first, scale);
    let [dq, dk, dv] = reference_bwd(&q, &k, &v, &dout, sizes, &first, scale);
    assert!(dk.iter().chain(&dv).all(|x| x.is_finite()));
    let starts = p.buf(40).misaligned();
    for (name, kern) in kernels() {
        let qb = Buf::floats(DType::F32, &shape, &q);
        let (kb, vb) = (
            Buf::floats(DType::F32, &kshape, &k),
            Buf::floats(DType::F32, &kshape, &v),
        );
        let mut outs = [
            Buf::zeros(DType::F32, &shape),
            Buf::zeros(DType::F32, &lead),
        ];
        let ins = [&qb, &kb, &vb, &starts];
        run(&kern, "packed_attention.fwd", &ins, &[scale], &mut outs)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_close(
            &format!("{name} out"),
            &outs[0].values(),
            &out,
            tol(DType::F32, 2.0),
        );
        assert_close(
            &format!("{name} lse"),
            &outs[1].values(),
            &lse,
            tol(DType::F32, 4.0),
        );
        let ob = Buf::floats(DType::F32, &shape, &out);
        let lb = Buf::floats(DType::F32, &lead, &lse);
        let db = Buf::floats(DType::F32, &shape, &dout);
        let mut grads = [
            Buf::zeros(DType::F32, &shape),
            Buf::zeros(DType::F32, &kshape),
            Buf::zeros(DType::F32, &kshape),
        ];
        let ins = [&qb, &kb, &vb, &ob, &lb, &db, &starts];
        run(&kern, "packed_attention.bwd", &ins, &[scale], &mut grads)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let big = scale_of(&[&dq, &dk, &dv]);
        for (g, (n, w)) in grads.iter().zip([("dq", &dq), ("dk", &dk), ("dv", &dv)]) {
            // Exact zeros where the reference has them: the unread keys.
            let zeros = g
                .values()
                .iter()
                .zip(w.iter())
                .all(|(g, w)| *w != 0.0 || *g == 0.0);
            assert!(zeros, "{name} {n}: nonzero gradient of an unread key");
            assert_close(&format!("{name} {n}"), &g.values(), w, tol(DType::F32, big));
        }
    }
}

#[test]
fn packed_attention_is_offered_on_every_instruction_set() {
    for (name, kern) in kernels() {
        let ops = codex_plugin_api::Kernel::ops(&kern);
        for op in ["packed_attention.fwd", "packed_attention.bwd"] {
            assert!(ops.iter().any(|o| o == op), "{name}: {op} not offered");
        }
    }
}
