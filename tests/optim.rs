//! The built-in `adamw` and `sgd` optimizers against plain-Rust f64 references of
//! `torch.optim.AdamW` and `torch.optim.SGD`, driven through their registered factories and a
//! host `ParamStore`, and one short training run of `gpt2`.

use codex_engine::candle::Device;
use codex_engine::{ParamStore, TensorGroup};
use codex_plugin_api::abi_stable::std_types::{RResult, RSlice, RStr};
use codex_plugin_api::optimizer::{OptimizerBox, ParamGrad};
use codex_plugin_api::{
    ComponentKind, DType, Factory, Init, OptimStep, ParamRole, Tensor, TensorId,
};

use crate::model::{batch, build_gpt2, builtin, EVAL, SMALL, TRAIN, VOCAB};

fn build_optimizer(
    name: &str,
    params: &str,
    store: &mut ParamStore,
) -> Result<OptimizerBox, String> {
    codex_engine::install();
    let Factory::Optimizer(factory) = builtin(name, ComponentKind::Optimizer).factory else {
        panic!("{name} is registered with a factory of another kind");
    };
    match factory(RStr::from(params), store.as_tensor_store()) {
        RResult::ROk(o) => Ok(o),
        RResult::RErr(e) => {
            assert!(
                !e.panicked,
                "create panicked instead of returning an error: {e}"
            );
            Err(e.message.into_string())
        }
    }
}

fn step(opt: &mut OptimizerBox, grads: &[ParamGrad], lr: f64, step: u64) {
    if let RResult::RErr(e) = opt.step(RSlice::from_slice(grads), OptimStep { lr, step }) {
        panic!("optimizer step failed: {e}");
    }
}

fn values(id: TensorId) -> Vec<f64> {
    let t = Tensor::retain(id);
    t.to_vec_f32()
        .expect("read back")
        .into_iter()
        .map(f64::from)
        .collect()
}

fn assert_close(found: &[f64], expected: &[f64], what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}: length");
    for (i, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= 1e-6,
            "{what}[{i}]: found {f}, expected {e}"
        );
    }
}

/// A parameter declared in `store` with the given values.
fn param(
    store: &mut ParamStore,
    name: &str,
    shape: &[usize],
    role: ParamRole,
    v: &[f32],
) -> TensorId {
    // The returned handle is ours (released when `t` drops); the store keeps its own.
    let t = Tensor::from_id(
        store
            .declare_param(name, shape, role, Init::Zeros)
            .expect("declare"),
    );
    t.assign(&Tensor::from_f32(v, shape, DType::F32, &t).expect("tensor"))
        .expect("assign");
    store.handle(name).expect("declared")
}

fn grad_tensor(v: &[f64], like: TensorId) -> Tensor {
    let like = Tensor::retain(like);
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let shape = like.shape().expect("shape");
    Tensor::from_f32(&v, &shape, DType::F32, &like).expect("tensor")
}

/// `torch.optim.AdamW`'s update of one parameter, in f64.
struct AdamRef {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl AdamRef {
    fn new(p: &[f32]) -> Self {
        AdamRef {
            p: p.iter().map(|&x| f64::from(x)).collect(),
            m: vec![0.0; p.len()],
            v: vec![0.0; p.len()],
        }
    }

    /// One step at 1-based step `t`, with betas `(b1, b2)`, `eps` and weight decay `wd`.
    fn step(&mut self, g: &[f64], lr: f64, t: i32, (b1, b2, eps, wd): (f64, f64, f64, f64)) {
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let state = self
            .p
            .iter_mut()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut());
        for (((p, m), v), &g) in state.zip(g) {
            // f32 inputs, as the optimizer sees them.
            let g = f64::from(g as f32);
            *p *= 1.0 - lr * wd;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / bc2.sqrt() + eps;
            *p -= lr / bc1 * *m / denom;
        }
    }
}

const W0: [f32; 6] = [0.5, -1.0, 0.25, 2.0, -0.75, 0.1];
const B0: [f32; 3] = [0.3, -0.2, 0.05];
const N0: [f32; 2] = [1.0, 1.5];
const GW: [[f64; 6]; 2] = [
    [0.1, -0.2, 0.3, -0.05, 0.0, 1.5],
    [-0.3, 0.25, 0.1, 0.2, -0.4, 0.01],
];
const GB: [[f64; 3]; 2] = [[0.5, -0.01, 0.2], [0.05, 0.3, -0.6]];
const LRS: [f64; 2] = [0.01, 0.02];

/// Two AdamW steps (bias correction at t = 1 and t = 2) with the learning rate changing
/// between them; `decay_bias` selects `no_decay: []` versus the default roles.
fn adamw_matches_torch(params: &str, decay_bias: bool) {
    let (b1, b2, eps, wd) = (0.8, 0.95, 1e-6, 0.1);
    let mut store = ParamStore::new(Device::Cpu, 0);
    codex_engine::install();
    let w = param(&mut store, "w", &[2, 3], ParamRole::Weight, &W0);
    let b = param(&mut store, "b", &[3], ParamRole::Bias, &B0);
    let n = param(&mut store, "n", &[2], ParamRole::Norm, &N0);
    store.set_trainable("n", false).expect("freeze");
    let mut opt = build_optimizer("adamw", params, &mut store).expect("adamw builds");
    assert!(
        store.handle("optimizer.n.exp_avg").is_none(),
        "a frozen parameter got state"
    );

    let mut rw = AdamRef::new(&W0);
    let mut rb = AdamRef::new(&B0);
    for s in 0..2 {
        let gw = grad_tensor(&GW[s], w);
        let gb = grad_tensor(&GB[s], b);
        let gn = grad_tensor(&[1.0, 1.0], n);
        let grads = [
            ParamGrad {
                index: 0,
                param: w,
                grad: gw.id(),
            },
            ParamGrad {
                index: 1,
                param: b,
                grad: gb.id(),
            },
            ParamGrad {
                index: 2,
                param: n,
                grad: gn.id(),
            },
        ];
        step(&mut opt, &grads, LRS[s], s as u64 + 1);
        let t = s as i32 + 1;
        rw.step(&GW[s], LRS[s], t, (b1, b2, eps, wd));
        let bias_wd = if decay_bias { wd } else { 0.0 };
        rb.step(&GB[s], LRS[s], t, (b1, b2, eps, bias_wd));
        let at = format!("after step {t}");
        assert_close(&values(w), &rw.p, &format!("w {at}"));
        assert_close(&values(b), &rb.p, &format!("b {at}"));
        let state = |name: &str| {
            values(
                store
                    .handle(name)
                    .unwrap_or_else(|| panic!("no state {name}")),
            )
        };
        assert_close(
            &state("optimizer.w.exp_avg"),
            &rw.m,
            &format!("w exp_avg {at}"),
        );
        assert_close(
            &state("optimizer.w.exp_avg_sq"),
            &rw.v,
            &format!("w exp_avg_sq {at}"),
        );
        assert_close(
            &state("optimizer.b.exp_avg"),
            &rb.m,
            &format!("b exp_avg {at}"),
        );
        assert_close(
            &state("optimizer.b.exp_avg_sq"),
            &rb.v,
            &format!("b exp_avg_sq {at}"),
        );
        assert_close(&values(n), &N0.map(f64::from), "the frozen parameter");
    }
}

#[test]
fn adamw_matches_torch_with_bias_correction_and_no_decay_roles() {
    adamw_matches_torch(
        r#"{"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}"#,
        false,
    );
}

#[test]
fn adamw_with_empty_no_decay_decays_every_role() {
    adamw_matches_torch(
        r#"{"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1, "no_decay": []}"#,
        true,
    );
}

#[test]
fn adamw_config_json_is_resolved() {
    let mut store = ParamStore::new(Device::Cpu, 0);
    let opt = build_optimizer("adamw", "{}", &mut store).expect("builds");
    let json: serde_json::Value = serde_json::from_str(opt.config_json().as_str()).expect("json");
    assert!(
        json.get("lr").is_none(),
        "the learning rate comes with each step, not with the optimizer: {json}"
    );
    assert_eq!(json["betas"], serde_json::json!([0.9, 0.999]));
    assert_eq!(json["eps"], 1e-8);
    assert_eq!(json["weight_decay"], 0.01);
    assert_eq!(
        json["no_decay"],
        serde_json::json!(["bias", "norm", "embedding"])
    );
}

/// `torch.optim.SGD` for one parameter, in f64; the buffer is `None` before the first step.
fn sgd_reference(
    p0: &[f32],
    grads: &[&[f64]],
    lrs: &[f64],
    momentum: f64,
    dampening: f64,
    nesterov: bool,
    wd: f64,
) -> Vec<Vec<f64>> {
    let mut p: Vec<f64> = p0.iter().map(|&x| f64::from(x)).collect();
    let mut buf: Option<Vec<f64>> = None;
    let mut out = Vec::new();
    for (g, &lr) in grads.iter().zip(lrs) {
        let mut d: Vec<f64> = g
            .iter()
            .zip(&p)
            .map(|(&g, &p)| f64::from(g as f32) + wd * p)
            .collect();
        if momentum != 0.0 {
            let b = match buf.take() {
                None => d.clone(),
                Some(b) => b
                    .iter()
                    .zip(&d)
                    .map(|(b, d)| momentum * b + (1.0 - dampening) * d)
                    .collect(),
            };
            d = if nesterov {
                d.iter().zip(&b).map(|(d, b)| d + momentum * b).collect()
            } else {
                b.clone()
            };
            buf = Some(b);
        }
        for (p, d) in p.iter_mut().zip(&d) {
            *p -= lr * d;
        }
        out.push(p.clone());
    }
    out
}

fn sgd_matches_torch(params: &str, momentum: f64, dampening: f64, nesterov: bool, wd: f64) {
    let grads: [&[f64]; 3] = [&GW[0], &GW[1], &[0.2, 0.2, -0.1, 0.0, 0.3, -0.7]];
    let lrs = [0.1, 0.05, 0.1];
    let mut store = ParamStore::new(Device::Cpu, 0);
    codex_engine::install();
    let w = param(&mut store, "w", &[2, 3], ParamRole::Weight, &W0);
    let mut opt = build_optimizer("sgd", params, &mut store).expect("sgd builds");
    let expected = sgd_reference(&W0, &grads, &lrs, momentum, dampening, nesterov, wd);
    for s in 0..3 {
        let g = grad_tensor(grads[s], w);
        step(
            &mut opt,
            &[ParamGrad {
                index: 0,
                param: w,
                grad: g.id(),
            }],
            lrs[s],
            s as u64 + 1,
        );
        assert_close(
            &values(w),
            &expected[s],
            &format!("{params} w after step {}", s + 1),
        );
    }
    assert_eq!(
        store.handle("optimizer.w.momentum_buffer").is_some(),
        momentum != 0.0,
        "a momentum buffer exists exactly when momentum is on"
    );
}

#[test]
fn sgd_plain_matches_torch() {
    sgd_matches_torch(r#"{"weight_decay": 0.01}"#, 0.0, 0.0, false, 0.01);
}

#[test]
fn sgd_momentum_with_dampening_matches_torch() {
    sgd_matches_torch(
        r#"{"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}"#,
        0.9,
        0.1,
        false,
        0.01,
    );
}

#[test]
fn sgd_nesterov_matches_torch() {
    sgd_matches_torch(
        r#"{"momentum": 0.9, "nesterov": true, "weight_decay": 0.01}"#,
        0.9,
        0.0,
        true,
        0.01,
    );
}

#[test]
fn optimizer_params_are_strict_and_errors_name_the_field() {
    let check = |name: &str, json: &str, needle: &str| {
        let mut store = ParamStore::new(Device::Cpu, 0);
        let err = build_optimizer(name, json, &mut store)
            .err()
            .unwrap_or_else(|| panic!("{json} was accepted"));
        assert!(
            err.starts_with(&format!("{name}: create: ")) && err.contains(needle),
            "{err:?} should mention {needle:?}"
        );
    };
    check(
        "sgd",
        r#"{"nesterov": true}"#,
        "nesterov: needs momentum > 0",
    );
    check(
        "sgd",
        r#"{"momentum": 0.9, "dampening": 0.5, "nesterov": true}"#,
        "nesterov",
    );
    check("sgd", r#"{"moment": 0.9}"#, "unknown field `moment`");
    check(
        "adamw",
        r#"{"betas": [0.9, 1.5]}"#,
        "betas[1]: must be in [0, 1)",
    );
    check(
        "adamw",
        r#"{"no_decay": ["biases"]}"#,
        "no_decay[0]: unknown variant `biases`",
    );
    check(
        "adamw",
        r#"{"weight_decay": "none"}"#,
        "weight_decay: invalid type",
    );
}

/// Parameters and optimizer state share one namespace; every built-in optimizer names the state
/// of parameter `p` `optimizer.<p>.<slot>` (the convention `codex_plugin_api::params`
/// documents), one slot name per kind of state, and keeps it in f32 for f32 parameters.
#[test]
fn optimizer_state_is_named_optimizer_param_slot() {
    let check = |name: &str, params: &str, slots: &[&str]| {
        let mut built = build_gpt2(SMALL, VOCAB, 4).expect("builds");
        let infos = built.params();
        assert!(infos.iter().all(|i| i.dtype == DType::F32), "{infos:?}");
        let _opt = build_optimizer(name, params, &mut built.store).expect("builds");
        let mut expected: Vec<String> = infos
            .iter()
            .flat_map(|i| {
                slots
                    .iter()
                    .map(move |s| format!("optimizer.{}.{s}", i.name))
            })
            .collect();
        let mut state: Vec<String> = built
            .store
            .named(TensorGroup::State)
            .into_iter()
            .map(|(n, t)| {
                assert_eq!(t.dtype(), codex_engine::candle::DType::F32, "{n}");
                n
            })
            .collect();
        expected.sort();
        state.sort();
        assert_eq!(state, expected, "{name}");
    };
    check("adamw", "{}", &["exp_avg", "exp_avg_sq"]);
    check("sgd", r#"{"momentum": 0.9}"#, &["momentum_buffer"]);
    check("sgd", "{}", &[]);
}

#[test]
fn adamw_steps_lower_the_gpt2_loss_on_a_fixed_batch() {
    let mut built = build_gpt2(SMALL, VOCAB, 4).expect("builds");
    let data = batch(2, 12, VOCAB as u32);
    let mut opt = build_optimizer("adamw", "{}", &mut built.store).expect("adamw builds");
    let infos = built.params();
    let initial = built.loss(&data, EVAL).to_scalar().expect("scalar");
    for s in 1..=8u64 {
        built.store.zero_grads();
        built.loss(&data, TRAIN).backward().expect("backward");
        let grads: Vec<Tensor> = infos
            .iter()
            .map(|i| {
                Tensor::retain(i.id)
                    .grad()
                    .expect("grad")
                    .expect("every parameter has a gradient")
            })
            .collect();
        let pg: Vec<ParamGrad> = infos
            .iter()
            .zip(&grads)
            .enumerate()
            .map(|(index, (i, g))| ParamGrad {
                index,
                param: i.id,
                grad: g.id(),
            })
            .collect();
        step(&mut opt, &pg, 1e-2, s);
    }
    let last = built.loss(&data, EVAL).to_scalar().expect("scalar");
    assert!(
        last < initial - 0.5,
        "loss went from {initial} to {last} in 8 steps"
    );
}
