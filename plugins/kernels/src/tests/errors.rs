//! Malformed calls are refused with an error naming what is wrong, never a panic.

use codex_plugin_api::{DType, Kernel};

use super::*;

fn f32s(shape: &[usize]) -> Buf {
    Buf::zeros(DType::F32, shape)
}

/// Run `op` and expect an error containing `needle`.
#[track_caller]
fn check(op: &str, ins: &[&Buf], attrs: &[f64], outs: &mut [Buf], needle: &str) {
    let k = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    match run(&k, op, ins, attrs, outs) {
        Ok(()) => panic!("{op}: accepted a call that should fail with `{needle}`"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "{op}: error `{e}` does not mention `{needle}`"
        ),
    }
}

#[test]
fn malformed_calls_are_errors() {
    let x = f32s(&[2, 3]);
    check(
        "nope.fwd",
        &[&x],
        &[],
        &mut [f32s(&[2, 3])],
        "unknown op `nope.fwd`",
    );
    check(
        "softmax_last_dim.fwd",
        &[],
        &[],
        &mut [f32s(&[2, 3])],
        "expected 1 inputs, found 0",
    );
    check(
        "softmax_last_dim.fwd",
        &[&x],
        &[],
        &mut [],
        "expected 1 outputs, found 0",
    );
    check(
        "softmax_last_dim.fwd",
        &[&x],
        &[1.0],
        &mut [f32s(&[2, 3])],
        "expected 0 attrs, found 1",
    );
    check(
        "softmax_last_dim.fwd",
        &[&x],
        &[],
        &mut [f32s(&[3, 2])],
        "`y` has shape [3, 2]",
    );
    check(
        "softmax_last_dim.fwd",
        &[&Buf::zeros(DType::F32, &[])],
        &[],
        &mut [f32s(&[])],
        "at least one dimension",
    );
    check(
        "softmax_last_dim.fwd",
        &[&Buf::raw(DType::F64, &[2, 3], 48)],
        &[],
        &mut [f32s(&[2, 3])],
        "dtype f64",
    );
    check(
        "softmax_last_dim.fwd",
        &[&Buf::raw(DType::F32, &[2, 3], 20)],
        &[],
        &mut [f32s(&[2, 3])],
        "holds 20 bytes",
    );
    check(
        "softmax_last_dim.fwd",
        &[&Buf::raw(DType::F32, &[usize::MAX, 3], 0)],
        &[],
        &mut [f32s(&[2, 3])],
        "holds 0 bytes",
    );
    check(
        "layer_norm.fwd",
        &[&x, &f32s(&[3]), &f32s(&[3])],
        &[-1.0],
        &mut [f32s(&[2, 3]), f32s(&[2]), f32s(&[2])],
        "`eps` is -1",
    );
    check(
        "layer_norm.fwd",
        &[&x, &f32s(&[4]), &f32s(&[3])],
        &[1e-5],
        &mut [f32s(&[2, 3]), f32s(&[2]), f32s(&[2])],
        "`w` has shape [4]",
    );
    check(
        "layer_norm.fwd",
        &[&x, &f32s(&[3]), &f32s(&[3])],
        &[1e-5],
        &mut [f32s(&[2, 3]), Buf::zeros(DType::BF16, &[2]), f32s(&[2])],
        "`mean` has dtype bf16, expected f32",
    );
    let t = Buf::u32s(&[2], &[0, 3]);
    let ce_outs = || [f32s(&[1]), f32s(&[1]), f32s(&[1]), f32s(&[2])];
    check(
        "cross_entropy.fwd",
        &[&x, &t],
        &[-100.0],
        &mut ce_outs(),
        "target 3 at row 1 is out of range for 3 classes",
    );
    check(
        "cross_entropy.fwd",
        &[&x, &x],
        &[-100.0],
        &mut ce_outs(),
        "`targets` has dtype f32, expected u32",
    );
    check(
        "cross_entropy.fwd",
        &[&x, &Buf::u32s(&[2], &[0, 1])],
        &[0.5],
        &mut ce_outs(),
        "`ignore_index` is 0.5",
    );
    check(
        "cross_entropy.fwd",
        &[&x, &Buf::u32s(&[2], &[0, 1])],
        &[-100.0],
        &mut [f32s(&[2]), f32s(&[1]), f32s(&[1]), f32s(&[2])],
        "`loss_sum` has shape [2]",
    );
    check(
        "cross_entropy.bwd",
        &[&x, &t, &f32s(&[2])],
        &[3.0, f64::NAN],
        &mut [f32s(&[2, 3])],
        "`grad_scale` is NaN",
    );
    let q = f32s(&[1, 2, 4, 3]);
    check(
        "causal_attention.fwd",
        &[&q, &q, &f32s(&[1, 2, 4, 2])],
        &[0.5],
        &mut [f32s(&[1, 2, 4, 3]), f32s(&[1, 2, 4])],
        "`v` has shape [1, 2, 4, 2]",
    );
    check(
        "causal_attention.fwd",
        &[&q, &q, &q],
        &[0.5],
        &mut [f32s(&[1, 2, 4, 3]), f32s(&[1, 2, 3])],
        "`lse` has shape [1, 2, 3]",
    );
    check(
        "causal_attention.fwd",
        &[&q, &f32s(&[1, 2, 3, 3]), &f32s(&[1, 2, 3, 3])],
        &[0.5],
        &mut [f32s(&[1, 2, 4, 3]), f32s(&[1, 2, 4])],
        "`k` has shape [1, 2, 3, 3], expected q's leading dimensions [1, 2], then s ≥ 4 keys of 3 dimensions",
    );
    check(
        "causal_attention.bwd",
        &[
            &q,
            &f32s(&[1, 2, 6, 3]),
            &f32s(&[1, 2, 6, 3]),
            &q,
            &f32s(&[1, 2, 4]),
            &q,
        ],
        &[0.5],
        &mut [
            f32s(&[1, 2, 4, 3]),
            f32s(&[1, 2, 4, 3]),
            f32s(&[1, 2, 6, 3]),
        ],
        "`dk` has shape [1, 2, 4, 3], expected [1, 2, 6, 3]",
    );
    // packed_attention: q [2, 3, 4, 3] is 6 heads of 4 queries; starts is [r, 4], r | 6.
    let q = f32s(&[2, 3, 4, 3]);
    let fwd_outs = || [f32s(&[2, 3, 4, 3]), f32s(&[2, 3, 4])];
    let zeros = |shape: &[usize]| Buf::u32s(shape, &vec![0; shape.iter().product()]);
    check(
        "packed_attention.fwd",
        &[&q, &q, &q],
        &[0.5],
        &mut fwd_outs(),
        "packed_attention.fwd: expected 4 inputs, found 3",
    );
    for (shape, found) in [
        (&[4, 4][..], "[4, 4]"),
        (&[2, 5], "[2, 5]"),
        (&[8], "[8]"),
        (&[2, 1, 4], "[2, 1, 4]"),
    ] {
        check(
            "packed_attention.fwd",
            &[&q, &q, &q, &zeros(shape)],
            &[0.5],
            &mut fwd_outs(),
            &format!("`starts` has shape {found}, expected [r, 4] with r dividing the 6 heads"),
        );
    }
    check(
        "packed_attention.fwd",
        &[&q, &q, &q, &f32s(&[2, 4])],
        &[0.5],
        &mut fwd_outs(),
        "`starts` has dtype f32, expected u32",
    );
    check(
        "packed_attention.fwd",
        &[&q, &q, &q, &Buf::raw(DType::U32, &[2, 4], 28)],
        &[0.5],
        &mut fwd_outs(),
        "`starts` holds 28 bytes but shape [2, 4] of u32 needs 32",
    );
    // With s = t = 4, query 2 sees keys up to 2: a start of 3 would leave it nothing.
    let late = Buf::u32s(&[2, 4], &[0, 1, 1, 0, 0, 0, 3, 3]);
    check(
        "packed_attention.fwd",
        &[&q, &q, &q, &late],
        &[0.5],
        &mut fwd_outs(),
        "packed_attention.fwd: `starts` row 1, position 2: start 3 is beyond key 2, \
         the query's own position",
    );
    // With s = 6 keys, query 2 is key 4; one row of starts for all six heads.
    let kv = f32s(&[2, 3, 6, 3]);
    let lse = f32s(&[2, 3, 4]);
    let bwd_outs = || {
        [
            f32s(&[2, 3, 4, 3]),
            f32s(&[2, 3, 6, 3]),
            f32s(&[2, 3, 6, 3]),
        ]
    };
    check(
        "packed_attention.bwd",
        &[
            &q,
            &kv,
            &kv,
            &q,
            &lse,
            &q,
            &Buf::u32s(&[1, 4], &[2, 3, 5, 5]),
        ],
        &[0.5],
        &mut bwd_outs(),
        "packed_attention.bwd: `starts` row 0, position 2: start 5 is beyond key 4",
    );
    check(
        "packed_attention.bwd",
        &[&q, &kv, &kv, &q, &lse, &q],
        &[0.5],
        &mut bwd_outs(),
        "packed_attention.bwd: expected 7 inputs, found 6",
    );
    check(
        "packed_attention.bwd",
        &[&q, &kv, &kv, &q, &lse, &q, &zeros(&[5, 4])],
        &[0.5],
        &mut bwd_outs(),
        "`starts` has shape [5, 4], expected [r, 4] with r dividing the 6 heads",
    );
    check(
        "sum_rows",
        &[&x],
        &[],
        &mut [f32s(&[2])],
        "trailing dimensions",
    );
    check(
        "adamw.step",
        &[&x],
        &[1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0],
        &mut [f32s(&[2, 3]), f32s(&[2, 3]), f32s(&[2, 3])],
        "`step` is 0",
    );
    check(
        "adamw.step",
        &[&x],
        &[1e-3, 1.0, 0.999, 1e-8, 0.0, 1.0],
        &mut [f32s(&[2, 3]), f32s(&[2, 3]), f32s(&[2, 3])],
        "`beta1` is 1",
    );
    check(
        "adamw.step",
        &[&x],
        &[1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0],
        &mut [
            Buf::zeros(DType::BF16, &[2, 3]),
            f32s(&[2, 3]),
            f32s(&[2, 3]),
        ],
        "`param` has dtype bf16",
    );
}

#[test]
fn params_are_strict() {
    for (params, needle) in [
        (r#"{"threads": 0}"#, "`threads` is 0"),
        (r#"{"thread": 2}"#, "unknown field `thread`"),
        (r#"{"simd": "avx9"}"#, "`simd` is \"avx9\""),
        ("[1]", "cpu kernel params"),
    ] {
        match CpuKernel::new(params) {
            Ok(_) => panic!("accepted params {params}"),
            Err(e) => assert!(
                e.to_string().contains(needle),
                "{params}: `{e}` does not mention `{needle}`"
            ),
        }
    }
    for params in ["", "{}", r#"{"threads": 2, "simd": "portable"}"#] {
        if let Err(e) = CpuKernel::new(params) {
            panic!("rejected params {params}: {e}");
        }
    }
}

#[test]
fn every_listed_op_is_dispatched() {
    let k = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    let ops = Kernel::ops(&k);
    let bf16 = if k.bf16() { crate::BF16_OPS.len() } else { 0 };
    assert_eq!(ops.len(), crate::OPS.len() + bf16 + crate::F16_OPS.len());
    for op in ops {
        // No buffers: every implemented op refuses with a count error, not "unknown op".
        match k.call(&op, &[], &[], &mut []) {
            Ok(()) => panic!("{op}: accepted an empty call"),
            Err(e) => assert!(!e.to_string().contains("unknown op"), "{op}: {e}"),
        }
    }
}

#[test]
fn bf16_products_are_offered_only_where_they_run() {
    // A portable kernel never offers them, whatever the CPU, and refuses them as unknown.
    let portable = CpuKernel::new(r#"{"simd": "portable"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert!(!portable.bf16());
    for op in crate::BF16_OPS {
        assert!(
            !Kernel::ops(&portable).iter().any(|o| o == op),
            "{op} offered"
        );
        let e = portable.call(op, &[], &[], &mut []).unwrap_err();
        assert!(e.to_string().contains("unknown op"), "{op}: {e}");
    }
    let auto = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    let has = is_x86_feature_detected_bf16();
    assert_eq!(auto.bf16(), has);
}

#[test]
fn f16_products_are_offered_everywhere_on_the_path_simd_allows() {
    let portable = CpuKernel::new(r#"{"simd": "portable"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(portable.f16_path(), "portable");
    let auto = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    for k in [&portable, &auto] {
        for op in crate::F16_OPS {
            assert!(Kernel::ops(k).iter().any(|o| o == op), "{op} not offered");
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        let want = if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "avx512"
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            "avx2+f16c"
        } else {
            "portable"
        };
        assert_eq!(auto.f16_path(), want);
    }
}

fn is_x86_feature_detected_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
