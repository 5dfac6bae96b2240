//! The built-in `gpt2` model, driven through the same ABI the host uses: its registered
//! declaration, the factory with a host `ParamStore`, and `forward` on tensor handles.
//!
//! The helpers here (building a model, a loss, a fixed batch) are shared with `optim.rs`.

use codex_engine::candle::Device;
use codex_engine::ParamStore;
use codex_plugin_api::abi_stable::std_types::{RResult, RStr};
use codex_plugin_api::component::builtins;
use codex_plugin_api::model::{ModelBox, ModelEnv};
use codex_plugin_api::{ComponentDecl, Factory, ForwardCtx, ParamInfo, ParamRole, Tensor};

/// The registered declaration of a built-in, by registry name and kind.
pub(crate) fn builtin(name: &str, kind: codex_plugin_api::ComponentKind) -> ComponentDecl {
    let decl = builtins()
        .map(|b| (b.declare)())
        .find(|d| d.name.as_str() == name && d.kind() == kind);
    match decl {
        Some(d) => d,
        None => panic!("no built-in {} named `{name}` is registered", kind.as_str()),
    }
}

/// A model together with the store that owns its parameters.
pub(crate) struct Built {
    pub(crate) store: ParamStore,
    pub(crate) model: ModelBox,
}

impl Built {
    pub(crate) fn params(&self) -> Vec<ParamInfo> {
        self.store.param_infos()
    }

    /// Any parameter, as the `like` argument of tensor constructors (device placement).
    pub(crate) fn like(&self) -> Tensor {
        Tensor::retain(self.params()[0].id)
    }

    pub(crate) fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        ctx: ForwardCtx,
    ) -> Result<Tensor, String> {
        let input = Tensor::from_u32(ids, &[b, t], &self.like()).map_err(|e| e.to_string())?;
        self.forward_tensor(&input, ctx)
    }

    pub(crate) fn forward_tensor(&self, input: &Tensor, ctx: ForwardCtx) -> Result<Tensor, String> {
        match self.model.forward(input.id(), ctx) {
            RResult::ROk(id) => Ok(Tensor::from_id(id)),
            RResult::RErr(e) => {
                assert!(
                    !e.panicked,
                    "forward panicked instead of returning an error: {e}"
                );
                Err(e.message.into_string())
            }
        }
    }

    /// Mean next-token cross-entropy of `batch`, differentiable.
    pub(crate) fn loss(&self, batch: &Batch, ctx: ForwardCtx) -> Tensor {
        let logits = self
            .forward(&batch.input, batch.b, batch.t, ctx)
            .expect("forward");
        let vocab = logits.shape().expect("shape")[2];
        let flat = logits
            .reshape(&[batch.b * batch.t, vocab])
            .expect("reshape");
        let targets =
            Tensor::from_u32(&batch.targets, &[batch.b * batch.t], &self.like()).expect("targets");
        let ce = flat
            .cross_entropy(&targets, u32::MAX)
            .expect("cross-entropy");
        ce.loss_sum.div(&ce.tokens).expect("mean")
    }
}

/// Build a `gpt2` through its registered factory on a fresh CPU store.
pub(crate) fn build_gpt2(params: &str, vocab_size: usize, seed: u64) -> Result<Built, String> {
    build_model("gpt2", params, vocab_size, seed)
}

/// The built-in model `name` with `params`, its parameters in a fresh store.
pub(crate) fn build_model(
    name: &str,
    params: &str,
    vocab_size: usize,
    seed: u64,
) -> Result<Built, String> {
    codex_engine::install();
    let Factory::Model(factory) = builtin(name, codex_plugin_api::ComponentKind::Model).factory
    else {
        panic!("{name} is registered with a factory of another kind");
    };
    let mut store = ParamStore::new(Device::Cpu, seed);
    let env = ModelEnv {
        vocab_size,
        store: store.as_tensor_store(),
    };
    match factory(RStr::from(params), env) {
        RResult::ROk(model) => Ok(Built { store, model }),
        RResult::RErr(e) => {
            assert!(
                !e.panicked,
                "create panicked instead of returning an error: {e}"
            );
            Err(e.message.into_string())
        }
    }
}

/// Token ids `[b, t]` and their next-token targets, from a fixed pseudo-random sequence.
pub(crate) struct Batch {
    pub(crate) input: Vec<u32>,
    pub(crate) targets: Vec<u32>,
    pub(crate) b: usize,
    pub(crate) t: usize,
}

pub(crate) fn batch(b: usize, t: usize, vocab: u32) -> Batch {
    let stream: Vec<u32> = (0..b * (t + 1))
        .map(|i| ((i as u32).wrapping_mul(7919) + 3) % vocab)
        .collect();
    let mut input = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for row in stream.chunks(t + 1) {
        input.extend_from_slice(&row[..t]);
        targets.extend_from_slice(&row[1..]);
    }
    Batch {
        input,
        targets,
        b,
        t,
    }
}

pub(crate) const TRAIN: ForwardCtx = ForwardCtx {
    train: true,
    seed: 1,
};
pub(crate) const EVAL: ForwardCtx = ForwardCtx {
    train: false,
    seed: 1,
};

/// A small configuration: 2 layers, 2 heads, width 16, 12 positions.
pub(crate) const SMALL: &str = r#"{"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 12}"#;
pub(crate) const VOCAB: usize = 23;

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().expect("read back")
}

#[test]
fn gpt2_parameters_have_hugging_face_names_shapes_and_roles() {
    let built = build_gpt2(SMALL, VOCAB, 0).expect("builds");
    let (c, p, v) = (16, 12, VOCAB);
    let mut expected: Vec<(String, Vec<usize>, ParamRole)> = vec![
        (
            "transformer.wte.weight".into(),
            vec![v, c],
            ParamRole::Embedding,
        ),
        (
            "transformer.wpe.weight".into(),
            vec![p, c],
            ParamRole::Embedding,
        ),
    ];
    for i in 0..2 {
        let h = format!("transformer.h.{i}");
        for (name, shape, role) in [
            ("ln_1.weight", vec![c], ParamRole::Norm),
            ("ln_1.bias", vec![c], ParamRole::Norm),
            ("attn.c_attn.weight", vec![c, 3 * c], ParamRole::Weight),
            ("attn.c_attn.bias", vec![3 * c], ParamRole::Bias),
            ("attn.c_proj.weight", vec![c, c], ParamRole::Weight),
            ("attn.c_proj.bias", vec![c], ParamRole::Bias),
            ("ln_2.weight", vec![c], ParamRole::Norm),
            ("ln_2.bias", vec![c], ParamRole::Norm),
            ("mlp.c_fc.weight", vec![c, 4 * c], ParamRole::Weight),
            ("mlp.c_fc.bias", vec![4 * c], ParamRole::Bias),
            ("mlp.c_proj.weight", vec![4 * c, c], ParamRole::Weight),
            ("mlp.c_proj.bias", vec![c], ParamRole::Bias),
        ] {
            expected.push((format!("{h}.{name}"), shape, role));
        }
    }
    expected.push(("transformer.ln_f.weight".into(), vec![c], ParamRole::Norm));
    expected.push(("transformer.ln_f.bias".into(), vec![c], ParamRole::Norm));

    let found: Vec<(String, Vec<usize>, ParamRole)> = built
        .params()
        .into_iter()
        .map(|i| (i.name, i.shape, i.role))
        .collect();
    assert_eq!(found, expected);
    assert!(built.params().iter().all(|i| i.trainable));
}

#[test]
fn gpt2_initial_values_follow_hugging_face_init() {
    let built = build_gpt2(
        r#"{"n_layer": 4, "n_head": 4, "n_embd": 64, "n_positions": 32}"#,
        50,
        3,
    )
    .expect("builds");
    let std_of = |name: &str| {
        let id = built.store.handle(name).expect("declared");
        let v = values(&Tensor::retain(id));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    let close = |a: f64, b: f64| (a - b).abs() < 0.1 * b;
    assert!(close(std_of("transformer.wte.weight"), 0.02));
    assert!(close(std_of("transformer.h.1.mlp.c_fc.weight"), 0.02));
    // c_proj weights: 0.02 / sqrt(2 * n_layer).
    assert!(close(
        std_of("transformer.h.1.attn.c_proj.weight"),
        0.02 / 8f64.sqrt()
    ));
    assert!(close(
        std_of("transformer.h.3.mlp.c_proj.weight"),
        0.02 / 8f64.sqrt()
    ));
    let ones = values(&Tensor::retain(
        built
            .store
            .handle("transformer.ln_f.weight")
            .expect("declared"),
    ));
    assert!(ones.iter().all(|&x| x == 1.0));
    let zeros = values(&Tensor::retain(
        built
            .store
            .handle("transformer.h.0.attn.c_attn.bias")
            .expect("declared"),
    ));
    assert!(zeros.iter().all(|&x| x == 0.0));
}

#[test]
fn gpt2_parameter_count_follows_the_formula() {
    // vocab_size above the tokenizer's is allowed (padding rows, as HF's 50257 → 50304).
    let json = r#"{"n_layer": 3, "n_head": 3, "n_embd": 12, "n_positions": 10, "vocab_size": 40}"#;
    let built = build_gpt2(json, 37, 0).expect("builds");
    let count: usize = built
        .params()
        .iter()
        .map(|i| i.shape.iter().product::<usize>())
        .sum();
    let (l, c, p, v) = (3, 12, 10, 40);
    assert_eq!(count, v * c + p * c + l * (12 * c * c + 13 * c) + 2 * c);
}

#[test]
fn gpt2_forward_gives_logits_over_the_vocabulary() {
    let built = build_gpt2(SMALL, VOCAB, 0).expect("builds");
    let data = batch(3, 7, VOCAB as u32);
    let logits = built.forward(&data.input, 3, 7, EVAL).expect("forward");
    assert_eq!(logits.shape().expect("shape"), vec![3, 7, VOCAB]);
    assert!(values(&logits).iter().all(|x| x.is_finite()));
    assert_eq!(built.model.max_positions(), 12);
    // A full-length sequence is accepted.
    let full = batch(1, 12, VOCAB as u32);
    assert!(built.forward(&full.input, 1, 12, TRAIN).is_ok());
}

#[test]
fn gpt2_is_causal() {
    let built = build_gpt2(SMALL, VOCAB, 0).expect("builds");
    let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
    let mut b = a.clone();
    b[4] = 20;
    let la = values(&built.forward(&a, 1, 6, EVAL).expect("forward"));
    let lb = values(&built.forward(&b, 1, 6, EVAL).expect("forward"));
    let before = 4 * VOCAB;
    for (x, y) in la[..before].iter().zip(&lb[..before]) {
        assert!(
            (x - y).abs() < 1e-6,
            "a later token changed an earlier position's logits"
        );
    }
    assert!(la[before..]
        .iter()
        .zip(&lb[before..])
        .any(|(x, y)| (x - y).abs() > 1e-4));
}

#[test]
fn gpt2_initial_loss_is_near_uniform() {
    let built = build_gpt2(
        r#"{"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 16}"#,
        101,
        5,
    )
    .expect("builds");
    let data = batch(4, 16, 101);
    let loss = built.loss(&data, EVAL).to_scalar().expect("scalar");
    let uniform = (101f64).ln();
    assert!(
        (loss - uniform).abs() < 0.05,
        "initial loss {loss}, ln(vocab) {uniform}"
    );
}

/// Every parameter gets a gradient, and it is the right one: the directional derivative
/// along the gradient matches a central finite difference of the loss.
#[test]
fn gpt2_every_parameter_gets_its_true_gradient() {
    let built = build_gpt2(SMALL, VOCAB, 11).expect("builds");
    assert_true_gradients(&built, &batch(2, 8, VOCAB as u32));
}

/// Every parameter of `built` gets a non-zero gradient from the loss on `data`, and it is the
/// right one: the directional derivative along the gradient (its squared norm) matches a
/// central finite difference of the loss.
pub(crate) fn assert_true_gradients(built: &Built, data: &Batch) {
    built.loss(data, EVAL).backward().expect("backward");
    let mut grads = Vec::new();
    for info in built.params() {
        let param = Tensor::retain(info.id);
        let grad = param
            .grad()
            .expect("grad")
            .unwrap_or_else(|| panic!("{} has no gradient", info.name));
        let g = values(&grad);
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 1e-6, "{} has an all-zero gradient", info.name);
        grads.push((info, g, norm));
    }
    let eval = || built.loss(data, EVAL).to_scalar().expect("scalar");
    for (info, g, norm) in grads {
        let param = Tensor::retain(info.id);
        let original = values(&param);
        let set = |v: &[f32]| {
            let t = Tensor::from_f32(v, &info.shape, codex_plugin_api::DType::F32, &param)
                .expect("tensor");
            param.assign(&t).expect("assign");
        };
        let h = 1e-2 / norm;
        let shifted = |sign: f64| {
            let v: Vec<f32> = original
                .iter()
                .zip(&g)
                .map(|(&p, &d)| (p as f64 + sign * h * d as f64) as f32)
                .collect();
            set(&v);
            eval()
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * h);
        set(&original);
        let analytic = norm * norm;
        assert!(
            (numeric - analytic).abs() <= 0.05 * analytic + 1e-4,
            "{}: finite difference {numeric}, gradient says {analytic}",
            info.name
        );
    }
}

const DROPOUT: &str = r#"{"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 12,
    "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1}"#;

#[test]
fn gpt2_dropout_replays_with_its_seed_and_changes_with_another() {
    let built = build_gpt2(DROPOUT, VOCAB, 2).expect("builds");
    let data = batch(2, 8, VOCAB as u32);
    let run = |ctx| values(&built.forward(&data.input, 2, 8, ctx).expect("forward"));
    let a = run(ForwardCtx {
        train: true,
        seed: 42,
    });
    let b = run(ForwardCtx {
        train: true,
        seed: 42,
    });
    let c = run(ForwardCtx {
        train: true,
        seed: 43,
    });
    assert_eq!(a, b, "the same seed must give bitwise the same logits");
    let differ = a
        .iter()
        .zip(&c)
        .filter(|(x, y)| (*x - *y).abs() > 1e-5)
        .count();
    assert!(
        differ > a.len() / 2,
        "another seed changed only {differ} of {} logits",
        a.len()
    );
}

#[test]
fn gpt2_dropout_is_off_in_eval_mode() {
    let with = build_gpt2(DROPOUT, VOCAB, 2).expect("builds");
    let without = build_gpt2(SMALL, VOCAB, 2).expect("builds");
    let data = batch(2, 8, VOCAB as u32);
    let eval_1 = values(
        &with
            .forward(
                &data.input,
                2,
                8,
                ForwardCtx {
                    train: false,
                    seed: 1,
                },
            )
            .expect("forward"),
    );
    let eval_2 = values(
        &with
            .forward(
                &data.input,
                2,
                8,
                ForwardCtx {
                    train: false,
                    seed: 2,
                },
            )
            .expect("forward"),
    );
    // Same seed, same names: the same initial weights, so eval must equal a model without dropout.
    let plain = values(&without.forward(&data.input, 2, 8, TRAIN).expect("forward"));
    assert_eq!(eval_1, eval_2);
    for (x, y) in eval_1.iter().zip(&plain) {
        assert!(
            (x - y).abs() < 1e-6,
            "eval-mode logits differ from a dropout-free model"
        );
    }
}

#[test]
fn gpt2_rejects_bad_input_with_errors() {
    let built = build_gpt2(SMALL, VOCAB, 0).expect("builds");
    let long = batch(1, 13, VOCAB as u32);
    let err = built
        .forward(&long.input, 1, 13, EVAL)
        .expect_err("13 > n_positions");
    assert!(
        err.contains("13 positions") && err.contains("n_positions = 12"),
        "{err}"
    );
    let flat = Tensor::from_u32(&[1, 2, 3], &[3], &built.like()).expect("tensor");
    let err = built.forward_tensor(&flat, EVAL).expect_err("1-D input");
    assert!(err.contains("[batch, time]"), "{err}");
    let err = built
        .forward(&[1, 2, VOCAB as u32], 1, 3, EVAL)
        .expect_err("id out of range");
    assert!(
        err.contains(&format!("id {VOCAB} is out of range")),
        "{err}"
    );
}

#[test]
fn gpt2_params_are_strict_and_errors_name_the_field() {
    let check = |json: &str, needle: &str| {
        let err = build_gpt2(json, VOCAB, 0)
            .err()
            .unwrap_or_else(|| panic!("{json} was accepted"));
        assert!(
            err.contains(needle),
            "error {err:?} should mention {needle:?}"
        );
        assert!(err.starts_with("gpt2: create: "), "{err}");
    };
    check(
        r#"{"n_layer": 2, "n_embed": 16}"#,
        "unknown field `n_embed`",
    );
    check(
        r#"{"n_layer": 2, "n_head": 3, "n_embd": 16}"#,
        "n_embd: must be divisible by n_head (3)",
    );
    check(r#"{"n_layer": "two"}"#, "n_layer: invalid type");
    check(
        r#"{"vocab_size": 10}"#,
        "vocab_size: must be at least the tokenizer's vocabulary size (23)",
    );
    check(
        r#"{"activation_function": "relu"}"#,
        "activation_function: unknown variant `relu`",
    );
    check(r#"{"resid_pdrop": 1.5}"#, "resid_pdrop");
    check(r#"{"n_head": 0}"#, "n_head: must be at least 1");
}

#[test]
fn gpt2_config_json_is_a_hugging_face_config() {
    let built = build_gpt2(
        r#"{"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 12, "activation_function": "gelu"}"#,
        VOCAB,
        0,
    )
    .expect("builds");
    let json: serde_json::Value =
        serde_json::from_str(built.model.config_json().as_str()).expect("json");
    assert_eq!(json["model_type"], "gpt2");
    assert_eq!(json["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(json["vocab_size"], VOCAB);
    assert_eq!(json["n_positions"], 12);
    assert_eq!(json["n_embd"], 16);
    assert_eq!(json["n_layer"], 2);
    assert_eq!(json["n_head"], 2);
    assert_eq!(json["activation_function"], "gelu");
    assert_eq!(json["tie_word_embeddings"], true);
    assert_eq!(json["layer_norm_epsilon"], 1e-5);
    assert_eq!(json["resid_pdrop"], 0.0);
}
