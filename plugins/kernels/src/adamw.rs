//! One AdamW step, in place.
//!
//! The kernel interface separates inputs from outputs, so the buffers updated in place —
//! parameter and both moments — are passed as outputs, whose current contents the kernel
//! reads; the gradient is the one input. The arithmetic follows `torch.optim.AdamW`
//! (decoupled weight decay applied before the update, bias-corrected moments, `eps` added
//! after the square root) so that runs can be compared step for step.

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{
    expect_attrs, expect_shape, finite, floats, inputs, outputs, Floats, Out, Result,
};
use crate::error::KernelError;
use crate::par::rows_per_task;
use crate::simd::multiversion;
use crate::Ctx;

/// Per-step constants, computed in f64 once.
#[derive(Copy, Clone)]
struct Consts {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    step_size: f32,
}

multiversion! {
    fn update<M>(k: Consts, g: &[f32], p: &mut [f32], m: &mut [f32], v: &mut [f32]) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let mm = M::fma(k.one_minus_beta1, g - *m, *m);
            let vv = M::fma(k.beta2, *v, k.one_minus_beta2 * g * g);
            let denom = M::fma(vv.sqrt(), k.inv_sqrt_bc2, k.eps);
            *p = *p * k.decay - k.step_size * (mm / denom);
            *m = mm;
            *v = vv;
        }
    }
}

fn in_unit(op: &'static str, name: &'static str, x: f64) -> Result<f64> {
    if (0.0..1.0).contains(&x) {
        Ok(x)
    } else {
        Err(KernelError::Attr {
            op,
            name,
            found: x,
            expected: "in [0, 1)",
        })
    }
}

pub(crate) fn step(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "adamw.step";
    let [grad] = inputs::<1>(OP, ins)?;
    let [param, m, v] = outputs::<3>(OP, outs)?;
    expect_attrs(OP, attrs, 6)?;
    let lr = finite(OP, "lr", attrs[0])?;
    let beta1 = in_unit(OP, "beta1", attrs[1])?;
    let beta2 = in_unit(OP, "beta2", attrs[2])?;
    let eps = finite(OP, "eps", attrs[3])?;
    if eps < 0.0 {
        return Err(KernelError::Attr {
            op: OP,
            name: "eps",
            found: eps,
            expected: "a non-negative number",
        });
    }
    let wd = finite(OP, "weight_decay", attrs[4])?;
    let step = attrs[5];
    if !(step >= 1.0 && step.fract() == 0.0 && step.is_finite()) {
        return Err(KernelError::Attr {
            op: OP,
            name: "step",
            found: step,
            expected: "an integer ≥ 1 (the step being taken, counted from 1)",
        });
    }
    let grad = floats(OP, "grad", grad, Floats::F32OrBf16)?;
    let mut param = Out::open(OP, "param", param, Floats::F32, true)?;
    expect_shape(OP, "param", param.shape(), grad.shape)?;
    let mut m = Out::open(OP, "m", m, Floats::F32, true)?;
    expect_shape(OP, "m", m.shape(), grad.shape)?;
    let mut v = Out::open(OP, "v", v, Floats::F32, true)?;
    expect_shape(OP, "v", v.shape(), grad.shape)?;

    let bc1 = 1.0 - beta1.powf(step);
    let bc2 = 1.0 - beta2.powf(step);
    let k = Consts {
        decay: (1.0 - lr * wd) as f32,
        one_minus_beta1: (1.0 - beta1) as f32,
        beta2: beta2 as f32,
        one_minus_beta2: (1.0 - beta2) as f32,
        inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        eps: eps as f32,
        step_size: (lr / bc1) as f32,
    };
    let (level, chunk) = (ctx.level, rows_per_task(1));
    param
        .data()
        .par_chunks_mut(chunk)
        .zip(
            m.data()
                .par_chunks_mut(chunk)
                .zip(v.data().par_chunks_mut(chunk)),
        )
        .zip(grad.data.par_chunks(chunk))
        .for_each(|((pc, (mc, vc)), gc)| update(level, k, gc, pc, mc, vc));
    param.finish();
    m.finish();
    v.finish();
    Ok(())
}
