//! `cross_entropy` against an f64 reference, with ignored rows.

use codex_plugin_api::DType;
use rand::Rng;

use super::*;

const IGNORE: u32 = 7;

/// `(loss_sum, tokens, correct, lse)`.
fn reference(x: &[f64], t: &[u32], v: usize, ignore: f64) -> (f64, f64, f64, Vec<f64>) {
    let (mut loss, mut tokens, mut correct, mut lse) = (0.0, 0.0, 0.0, Vec::new());
    for (xr, &tr) in x.chunks(v).zip(t) {
        let m = xr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = m + xr.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lse.push(l);
        if tr as f64 != ignore {
            let tr = tr as usize;
            loss += l - xr[tr];
            tokens += 1.0;
            let arg = xr.iter().position(|&x| x == m).unwrap_or(0);
            correct += f64::from(u8::from(arg == tr));
        }
    }
    (loss, tokens, correct, lse)
}

fn reference_bwd(x: &[f64], t: &[u32], v: usize, ignore: f64, g: f64) -> Vec<f64> {
    let (_, _, _, lse) = reference(x, t, v, ignore);
    let mut dx = Vec::new();
    for ((xr, &tr), l) in x.chunks(v).zip(t).zip(lse) {
        for (j, &xv) in xr.iter().enumerate() {
            dx.push(if tr as f64 == ignore {
                0.0
            } else {
                g * ((xv - l).exp() - f64::from(u8::from(j == tr as usize)))
            });
        }
    }
    dx
}

fn check(lead: &[usize], v: usize, dtype: DType, seed: u64) {
    let n: usize = lead.iter().product();
    let shape: Vec<usize> = lead.iter().copied().chain([v]).collect();
    let mut r = rng(seed);
    let mut x = quantise(dtype, &uniform(&mut r, n * v, -5.0, 5.0));
    // Ties for the arg-max in the first row: the first index wins.
    if v >= 3 {
        x[1] = 9.0;
        x[2] = 9.0;
    }
    let ignore = if v > IGNORE as usize {
        IGNORE as f64
    } else {
        -100.0
    };
    // Row 0 targets the tie; every third row is ignored when the ignore index is a class
    // index (with `-100` no u32 target can be ignored, as in PyTorch).
    let t: Vec<u32> = (0..n)
        .map(|i| match i {
            0 if v >= 3 => 1,
            _ if i % 3 == 1 && ignore >= 0.0 => IGNORE,
            _ => r.random_range(0..v as u32),
        })
        .collect();
    let (loss, tokens, correct, lse) = reference(&x, &t, v, ignore);
    let g = 0.37;
    let dx = reference_bwd(&x, &t, v, ignore, g);
    if n * v <= 300 {
        let grad = fd(|x| g * reference(x, &t, v, ignore).0, &x, 1e-5);
        assert_close("dlogits vs finite differences", &dx, &grad, FD_TOL);
    }
    for (name, k) in kernels() {
        let what = format!("{name} {dtype:?} {shape:?}");
        let (xb, tb) = (Buf::floats(dtype, &shape, &x), Buf::u32s(lead, &t));
        let scalar = || Buf::zeros(DType::F32, &[1]);
        let mut outs = [scalar(), scalar(), scalar(), Buf::zeros(DType::F32, lead)];
        run(&k, "cross_entropy.fwd", &[&xb, &tb], &[ignore], &mut outs)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(
            &format!("{what} loss_sum"),
            &outs[0].values(),
            &[loss],
            (1e-5 * n as f64, 1e-5),
        );
        assert_eq!(outs[1].values(), [tokens], "{what} tokens");
        assert_eq!(outs[2].values(), [correct], "{what} correct");
        assert_close(
            &format!("{what} lse"),
            &outs[3].values(),
            &lse,
            tol(DType::F32, 8.0),
        );
        let mut grads = [Buf::zeros(dtype, &shape)];
        run(
            &k,
            "cross_entropy.bwd",
            &[&xb, &tb, &outs[3]],
            &[ignore, g],
            &mut grads,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(
            &format!("{what} dlogits"),
            &grads[0].values(),
            &dx,
            tol(dtype, 1.0),
        );
    }
}

#[test]
fn cross_entropy_matches_reference() {
    let cases: &[(&[usize], usize)] = &[
        (&[1], 1),
        (&[1], 7),
        (&[3], 7),
        (&[4], 8),
        (&[2, 5], 33),
        (&[64], 1000),
        (&[3], 4099),
    ];
    for (i, (lead, v)) in cases.iter().enumerate() {
        check(lead, *v, DType::F32, i as u64);
        check(lead, *v, DType::BF16, 40 + i as u64);
    }
}

#[test]
fn cross_entropy_with_every_row_ignored_is_zero() {
    let k = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    let x = Buf::floats(DType::F32, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let t = Buf::u32s(&[2], &[5, 5]);
    let mut outs = [
        Buf::zeros(DType::F32, &[]),
        Buf::zeros(DType::F32, &[]),
        Buf::zeros(DType::F32, &[]),
        Buf::zeros(DType::F32, &[2]),
    ];
    run(&k, "cross_entropy.fwd", &[&x, &t], &[5.0], &mut outs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        [outs[0].values(), outs[1].values(), outs[2].values()],
        [[0.0], [0.0], [0.0]]
    );
    let mut grads = [Buf::floats(DType::F32, &[2, 3], &[1.0; 6])];
    run(
        &k,
        "cross_entropy.bwd",
        &[&x, &t, &outs[3]],
        &[5.0, 1.0],
        &mut grads,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(grads[0].values(), [0.0; 6]);
}

#[test]
fn nan_logits_give_a_nan_loss() {
    let k = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    let mut vals = vec![0.5; 2 * 40];
    vals[70] = f64::NAN;
    let x = Buf::floats(DType::F32, &[2, 40], &vals);
    let t = Buf::u32s(&[2], &[0, 0]);
    let mut outs = [
        Buf::zeros(DType::F32, &[1]),
        Buf::zeros(DType::F32, &[1]),
        Buf::zeros(DType::F32, &[1]),
        Buf::zeros(DType::F32, &[2]),
    ];
    run(&k, "cross_entropy.fwd", &[&x, &t], &[-100.0], &mut outs).unwrap_or_else(|e| panic!("{e}"));
    assert!(outs[0].values()[0].is_nan(), "loss {:?}", outs[0].values());
    assert!(outs[3].values()[0].is_finite() && outs[3].values()[1].is_nan());
}
