//! Hugging Face model directories: the built-in models compute what transformers computes on
//! the committed fixtures (`tests/fixtures/hf/`, made by `tests/interop/make_hf_fixtures.py`,
//! whose versions it pins), and bad directories are refused before anything is trained.
//!
//! Each fixture holds a tiny random model saved by `save_pretrained`, and the logits, loss and
//! greedy continuation transformers computed with it on fixed ids.

use std::path::{Path, PathBuf};

use codex_engine::candle::Device;
use codex_engine::ParamStore;
use codex_host::hf::ModelDir;
use codex_host::inference::sampling::Sampling;
use codex_host::inference::{generate_ids, GenerateOptions};
use codex_plugin_api::abi_stable::std_types::{RResult, RStr};
use codex_plugin_api::model::{ModelBox, ModelEnv};
use codex_plugin_api::{ComponentKind, Factory, ForwardCtx, Tensor};
use serde_json::Value;

use crate::model::builtin;

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("hf")
        .join(name)
}

/// The model a directory describes, with its weights loaded.
pub(crate) fn load(dir: &Path) -> Result<(ParamStore, ModelBox), String> {
    codex_engine::install();
    let dir = ModelDir::open(dir).map_err(|e| e.to_string())?;
    let (name, params) = dir.model(None).map_err(|e| e.to_string())?;
    let vocab = params
        .get("vocab_size")
        .and_then(Value::as_u64)
        .expect("fixture configs give vocab_size") as usize;
    let Factory::Model(factory) = builtin(&name, ComponentKind::Model).factory else {
        panic!("{name} is not registered as a model");
    };
    let mut store = ParamStore::new(Device::Cpu, 7);
    let env = ModelEnv {
        vocab_size: vocab,
        store: store.as_tensor_store(),
    };
    let params = Value::Object(params).to_string();
    let model = match factory(RStr::from(params.as_str()), env) {
        RResult::ROk(model) => model,
        RResult::RErr(e) => return Err(e.message.into_string()),
    };
    dir.load_weights(&mut store).map_err(|e| e.to_string())?;
    Ok((store, model))
}

struct Expected {
    ids: Vec<u32>,
    shape: Vec<usize>,
    logits: Vec<f32>,
    loss: f64,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
}

/// Little-endian f32 values.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn expected(dir: &Path) -> Expected {
    let bytes = std::fs::read(dir.join("expected.safetensors")).expect("expected.safetensors");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let ids = file.tensor("ids").expect("ids");
    let logits = file.tensor("logits").expect("logits");
    let ints = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect()
    };
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let list = |k: &str| -> Vec<u32> {
        json[k]
            .as_array()
            .expect(k)
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    };
    Expected {
        ids: ints(ids.data()),
        shape: logits.shape().to_vec(),
        logits: f32s(logits.data()),
        loss: json["loss"].as_f64().expect("loss"),
        prompt: list("prompt"),
        greedy: list("greedy"),
    }
}

fn forward(store: &ParamStore, model: &ModelBox, ids: &[u32], b: usize, t: usize) -> Tensor {
    let like = Tensor::retain(store.param_infos()[0].id);
    let input = Tensor::from_u32(ids, &[b, t], &like).expect("ids");
    let ctx = ForwardCtx {
        train: false,
        seed: 0,
    };
    match model.forward(input.id(), ctx) {
        RResult::ROk(id) => Tensor::from_id(id),
        RResult::RErr(e) => panic!("forward: {e}"),
    }
}

/// Logits within 1e-4 of transformers' relative to the largest logit.
fn assert_close_logits(name: &str, logits: &Tensor, want: &[f32]) {
    let got = logits.to_vec_f32().expect("logits");
    assert_eq!(got.len(), want.len(), "{name}: logits shape");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, e)| (a - e).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "{name}: logits differ from transformers' by up to {worst} (largest logit {scale})"
    );
}

/// Logits within 1e-4 of transformers' relative to the largest logit, the loss within 1e-4
/// relative, and the greedy continuation identical.
fn check_parity(name: &str) {
    let dir = fixture(name);
    let want = expected(&dir);
    let (store, model) = load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (b, t, vocab) = (want.shape[0], want.shape[1], want.shape[2]);
    let logits = forward(&store, &model, &want.ids, b, t);
    assert_close_logits(name, &logits, &want.logits);

    // transformers' loss: labels = ids, shifted inside the model, mean over the predictions.
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for row in want.ids.chunks(t) {
        inputs.extend_from_slice(&row[..t - 1]);
        targets.extend_from_slice(&row[1..]);
    }
    let logits = forward(&store, &model, &inputs, b, t - 1)
        .reshape(&[b * (t - 1), vocab])
        .expect("reshape");
    let like = Tensor::retain(store.param_infos()[0].id);
    let targets = Tensor::from_u32(&targets, &[b * (t - 1)], &like).expect("targets");
    let ce = logits.cross_entropy(&targets, u32::MAX).expect("loss");
    let loss = ce
        .loss_sum
        .div(&ce.tokens)
        .expect("mean")
        .to_scalar()
        .expect("scalar");
    assert!(
        (loss - want.loss).abs() <= 1e-4 * want.loss.abs(),
        "{name}: loss {loss}, transformers {}",
        want.loss
    );

    let options = GenerateOptions {
        max_tokens: want.greedy.len(),
        sampling: Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 0,
    };
    // No end-of-text stop: transformers generated a fixed number of tokens.
    let greedy =
        generate_ids(&model, &Device::Cpu, &want.prompt, u32::MAX, &options).expect("generate");
    assert_eq!(greedy, want.greedy, "{name}: greedy tokens differ");
}

#[test]
fn gpt2_matches_transformers() {
    check_parity("gpt2");
}

#[test]
fn llama_with_gqa_tied_embeddings_and_llama3_rope_matches_transformers() {
    check_parity("llama");
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers() {
    check_parity("qwen2");
}

#[test]
fn import_then_export_reproduces_the_fixture_tensors_bitwise() {
    for name in ["gpt2", "llama", "qwen2"] {
        let dir = fixture(name);
        let (store, _model) = load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
        let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let exported = store
            .export_as(
                codex_engine::TensorGroup::Params,
                codex_plugin_api::DType::F32,
            )
            .expect("export");
        let mut names: Vec<String> = exported.iter().map(|t| t.name.clone()).collect();
        names.sort();
        let mut in_file: Vec<String> = file.names().into_iter().map(str::to_owned).collect();
        in_file.sort();
        assert_eq!(names, in_file, "{name}: tensor names");
        for t in &exported {
            let original = file.tensor(&t.name).expect("tensor");
            assert_eq!(t.shape, original.shape(), "{name}: {}", t.name);
            assert!(t.bytes == original.data(), "{name}: {} changed", t.name);
        }
    }
}

/// Fine-tune the fixture `name` for 5 steps as `make_hf_fixtures.py` did with torch (its
/// settings are in `finetune/settings.json`), export the run, and check the loss of every step
/// and the exported model's logits against what torch recorded.
fn check_finetune(name: &str) {
    let dir = fixture(name);
    let data = fixture("finetune");
    let settings: Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("settings.json")).expect("settings.json"),
    )
    .expect("settings");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("expected.json");
    let recorded = &json["finetune"];
    let losses: Vec<f64> = recorded["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().expect("loss"))
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    // One batch holds every window, so the order codex-ml draws them in cannot matter.
    let config = format!(
        r#"(
    experiment: "finetune",
    data: (train: [Text(paths: ["{train}"])], val: [Text(paths: ["{val}"])]),
    model: (from: "{model}"),
    optimizer: (name: "adamw", lr: {lr},
                params: (betas: {betas}, eps: {eps}, weight_decay: {wd}, no_decay: [])),
    train: (max_steps: {steps}, seq_len: {seq}, batch_size: {windows}, clip_norm: {clip},
            eval_every: {steps}, eval_batches: 1, checkpoint_every: {steps}, log_every: 1),
)"#,
        train = data.join("train.txt").display(),
        val = data.join("val.txt").display(),
        model = dir.display(),
        lr = settings["lr"],
        betas = settings["betas"],
        eps = settings["eps"],
        wd = settings["weight_decay"],
        steps = settings["steps"],
        seq = settings["seq_len"],
        windows = recorded["windows"],
        clip = settings["clip_norm"],
    );
    let config_path = tmp.path().join("config.ron");
    std::fs::write(&config_path, config).expect("config");
    let run_dir = tmp.path().join("run");
    crate::cli::codex_ml()
        .arg("run")
        .arg(&config_path)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("-q")
        .assert()
        .success();

    let metrics = std::fs::read_to_string(run_dir.join("metrics.ndjson")).expect("metrics");
    let got: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("record"))
        .filter(|r| r["split"] == "train" && r["name"] == "loss")
        .map(|r| r["value"].as_f64().expect("value"))
        .collect();
    assert_eq!(
        got.len(),
        losses.len(),
        "{name}: one loss per step: {got:?}"
    );
    for (step, (g, w)) in got.iter().zip(&losses).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs(),
            "{name}: step {} loss {g}, torch {w}",
            step + 1
        );
    }

    let out = tmp.path().join("exported");
    crate::cli::codex_ml()
        .arg("export")
        .arg(&run_dir)
        .arg(&out)
        .assert()
        .success();
    let want = expected(&dir);
    let bytes = std::fs::read(dir.join("expected.safetensors")).expect("expected.safetensors");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let tuned = f32s(
        file.tensor("finetuned_logits")
            .expect("finetuned_logits")
            .data(),
    );
    let (store, model) = load(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
    let logits = forward(&store, &model, &want.ids, want.shape[0], want.shape[1]);
    assert_close_logits(name, &logits, &tuned);
}

#[test]
fn llama_fine_tuned_and_exported_matches_torch() {
    check_finetune("llama");
}

#[test]
fn qwen2_fine_tuned_and_exported_matches_torch() {
    check_finetune("qwen2");
}

/// A config training `model` (a config value) for two steps on the committed code files.
pub(crate) fn write_config(dir: &Path, model: &str, extra: &str) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code/*");
    let text = format!(
        r#"(
    experiment: "hf",
    data: (train: [Text(paths: ["{}"])], val_fraction: 0.3),
    model: {model},
    {extra}
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: 2, seq_len: 16, batch_size: 2, eval_every: 2, eval_batches: 1,
            checkpoint_every: 2, log_every: 1),
)"#,
        data.display()
    );
    let path = dir.join("config.ron");
    std::fs::write(&path, text).expect("config");
    path
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn a_run_starts_from_a_directory_and_exports_back_with_its_fields() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let llama = fixture("llama");
    let config = write_config(tmp.path(), &format!("(from: \"{}\")", llama.display()), "");
    let run_dir = tmp.path().join("run");
    crate::cli::codex_ml()
        .arg("run")
        .arg(&config)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("-q")
        .assert()
        .success();
    // The saved config names the model and its parameters: eval needs no directory.
    let saved = std::fs::read_to_string(run_dir.join("config.ron")).expect("config.ron");
    assert!(saved.contains("name: \"llama\""), "{saved}");
    assert!(saved.contains("num_key_value_heads: 2"), "{saved}");

    let out = tmp.path().join("exported");
    let output = crate::cli::codex_ml()
        .args(["export", "--json", "--dtype", "bf16"])
        .arg(&run_dir)
        .arg(&out)
        .output()
        .expect("export");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["dtype"], "bf16");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config"))
            .expect("config.json");
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(
        (
            config["bos_token_id"].clone(),
            config["eos_token_id"].clone()
        ),
        (0.into(), 0.into())
    );
    // Fields codex-ml does not use survive, as written.
    assert_eq!(config["pretraining_tp"], 1);
    assert_eq!(config["rope_parameters"]["rope_type"], "llama3");
    let tokenizer_config: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("tokenizer_config.json")).expect("tokenizer_config"),
    )
    .expect("json");
    assert_eq!(tokenizer_config["eos_token"], "<|endoftext|>");
    assert!(out.join("tokenizer.json").is_file() && out.join("README.md").is_file());
    let generation: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("generation_config.json")).expect("generation"),
    )
    .expect("json");
    // The imported model's generation settings survive, with the run's ids.
    assert_eq!(generation["use_cache"], true);
    assert_eq!(generation["output_attentions"], false);
    assert_eq!(
        (
            generation["bos_token_id"].clone(),
            generation["eos_token_id"].clone()
        ),
        (0.into(), 0.into())
    );
    // The weights: the fixture's names and shapes, in bf16, the tied head absent.
    let bytes = std::fs::read(out.join("model.safetensors")).expect("weights");
    let exported = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let original_bytes = std::fs::read(llama.join("model.safetensors")).expect("fixture");
    let original = safetensors::SafeTensors::deserialize(&original_bytes).expect("fixture");
    assert_eq!(exported.len(), original.len());
    for (name, view) in original.tensors() {
        let t = exported.tensor(&name).expect("exported tensor");
        assert_eq!(t.shape(), view.shape(), "{name}");
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
    }
    assert!(exported.tensor("lm_head.weight").is_err());

    // An existing export is never overwritten.
    crate::cli::codex_ml()
        .arg("export")
        .arg(&run_dir)
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "already exists and is not an empty directory",
        ));

    // Past the shard size: shards and an index naming every tensor.
    let sharded = tmp.path().join("sharded");
    crate::cli::codex_ml()
        .args(["export", "-q", "--max-shard-size", "100KB"])
        .arg(&run_dir)
        .arg(&sharded)
        .assert()
        .success();
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("index json");
    let map = index["weight_map"].as_object().expect("weight_map");
    assert_eq!(map.len(), original.len());
    assert!(!sharded.join("model.safetensors").exists());
    let files: std::collections::BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
    assert!(files.len() > 1, "{files:?}");
    for f in files {
        assert!(sharded.join(f).is_file(), "{f}");
    }

    // Both exports start runs again: shards through their index, bf16 converted to f32.
    for (dir, name) in [(&sharded, "from-shards"), (&out, "from-bf16")] {
        let config = write_config(tmp.path(), &format!("(from: \"{}\")", dir.display()), "");
        crate::cli::codex_ml()
            .arg("run")
            .arg(&config)
            .arg("--run-dir")
            .arg(tmp.path().join(name))
            .arg("-q")
            .assert()
            .success();
    }
}

/// Run `config` expecting a refusal: exit 2, `message` on stderr, and no run directory.
fn refused(tmp: &Path, config: &Path, message: &str) {
    let run_dir = tmp.join("run");
    let output = crate::cli::codex_ml()
        .arg("run")
        .arg(config)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(message),
        "expected `{message}` in:\n{stderr}"
    );
}

#[test]
fn bad_directories_are_refused_naming_the_file_and_the_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("model");
    let from = format!("(from: \"{}\")", model.display());
    let config = write_config(tmp.path(), &from, "");

    // No config.json.
    std::fs::create_dir_all(&model).expect("mkdir");
    refused(tmp.path(), &config, "config.json: is missing");
    assert!(!tmp.path().join("run").exists());

    // An unknown model_type, with the list of known ones.
    copy_dir(&fixture("qwen2"), &model);
    let qwen_config = std::fs::read_to_string(model.join("config.json")).expect("config");
    std::fs::write(
        model.join("config.json"),
        qwen_config.replace("\"qwen2\"", "\"gpt_neox\""),
    )
    .expect("write");
    refused(
        tmp.path(),
        &config,
        "model_type: `gpt_neox` is not an architecture codex-ml knows; the built-in models take \
         gpt2, llama, mistral, qwen2",
    );
    assert!(!tmp.path().join("run").exists());

    // An unsupported rope_scaling, named by the model.
    let mut value: Value = serde_json::from_str(&qwen_config).expect("json");
    value["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(model.join("config.json"), value.to_string()).expect("write");
    refused(
        tmp.path(),
        &config,
        "rope_scaling.rope_type: `yarn` is not supported",
    );
    assert!(!tmp.path().join("run").exists());

    // A truncated weight file.
    std::fs::write(model.join("config.json"), &qwen_config).expect("write");
    let weights = std::fs::read(fixture("qwen2").join("model.safetensors")).expect("weights");
    std::fs::write(
        model.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .expect("cut");
    refused(tmp.path(), &config, "model.safetensors: is truncated");
    assert!(!tmp.path().join("run").exists());

    // An index naming a shard that is not there.
    std::fs::remove_file(model.join("model.safetensors")).expect("rm");
    std::fs::write(
        model.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .expect("index");
    refused(
        tmp.path(),
        &config,
        "weight_map.model.norm.weight: names model-00001-of-00002.safetensors, which is not in",
    );
    assert!(!tmp.path().join("run").exists());

    // Shapes that contradict config.json: refused before any training step.
    std::fs::remove_file(model.join("model.safetensors.index.json")).expect("rm");
    std::fs::write(model.join("model.safetensors"), &weights).expect("weights");
    value = serde_json::from_str(&qwen_config).expect("json");
    value["intermediate_size"] = serde_json::json!(128);
    std::fs::write(model.join("config.json"), value.to_string()).expect("write");
    refused(
        tmp.path(),
        &config,
        "`model.layers.0.mlp.gate_proj.weight` has shape [96, 64] in",
    );
    let run = tmp.path().join("run");
    assert!(
        !run.join("checkpoints").exists()
            || std::fs::read_dir(run.join("checkpoints"))
                .expect("dir")
                .next()
                .is_none(),
        "no checkpoint may be written"
    );
}

#[test]
fn a_model_id_is_found_in_the_hugging_face_cache_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = tmp.path().join("hub");
    let snapshot = hub.join("models--tiny-org--tiny-gpt2/snapshots/0123abcd");
    copy_dir(&fixture("gpt2"), &snapshot);
    std::fs::create_dir_all(hub.join("models--tiny-org--tiny-gpt2/refs")).expect("refs");
    std::fs::write(
        hub.join("models--tiny-org--tiny-gpt2/refs/main"),
        "0123abcd",
    )
    .expect("main");
    let config = write_config(tmp.path(), "(from: \"tiny-org/tiny-gpt2\")", "");
    crate::cli::codex_ml()
        .arg("run")
        .arg(&config)
        .arg("--run-dir")
        .arg(tmp.path().join("run"))
        .arg("-q")
        .env("HF_HUB_CACHE", &hub)
        .assert()
        .success();
    let config = write_config(tmp.path(), "(from: \"tiny-org/absent\")", "");
    let output = crate::cli::codex_ml()
        .arg("run")
        .arg(&config)
        .arg("--run-dir")
        .arg(tmp.path().join("run2"))
        .env("HF_HUB_CACHE", &hub)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("model `tiny-org/absent` is not in the Hugging Face cache"),
        "{stderr}"
    );
}

#[test]
fn tokenize_prints_the_ids_python_gives_with_special_token_text_kept_as_text() {
    let gpt2 = fixture("gpt2");
    // `Tokenizer.from_file(...).encode(text, add_special_tokens=False).ids` in Python
    // tokenizers 0.23.3, and AutoTokenizer gives the same for plain text.
    crate::cli::codex_ml()
        .arg("tokenize")
        .arg(&gpt2)
        .arg("def add(a, b):\n    return a + b")
        .assert()
        .success()
        .stdout("279 292 313 8 65 12 274 261 260 282 292 289 274\n");
    // transformers makes `<|endoftext|>` in a text the special token (id 0); training data
    // keeps it as text, as Python does with `encode_special_tokens = True`.
    let output = crate::cli::codex_ml()
        .args(["tokenize", "--json"])
        .arg(&gpt2)
        .arg("x<|endoftext|>y")
        .output()
        .expect("tokenize");
    assert!(output.status.success());
    let json: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        json["ids"],
        serde_json::json!([88, 28, 92, 69, 78, 68, 79, 70, 84, 69, 88, 84, 92, 30, 89])
    );
    assert_eq!(
        (json["eot_id"].clone(), json["tokens"].clone()),
        (0.into(), 15.into())
    );
    crate::cli::codex_ml()
        .arg("tokenize")
        .arg(&gpt2)
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "give the text to encode, or --file FILE",
        ));
}

/// A `tokenizer.json` whose post-processor adds a bos token (as LLaMA 3's does) adds it to
/// every text, as transformers' `tokenizer(text)` does; `tokenizer_config.json`'s
/// `add_bos_token` is not what decides (transformers 5 ignores it beside a tokenizer.json).
#[test]
fn the_tokenizer_template_adds_bos_as_transformers_does() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("bos");
    copy_dir(&fixture("gpt2"), &dir);
    let path = dir.join("tokenizer.json");
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let bos = |type_id: u32| serde_json::json!({"SpecialToken": {"id": "<|endoftext|>", "type_id": type_id}});
    let seq =
        |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [bos(0), seq("A", 0)],
        "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    });
    std::fs::write(&path, json.to_string()).expect("write");
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    config["add_bos_token"] = false.into();
    std::fs::write(&config_path, config.to_string()).expect("write");
    // AutoTokenizer.from_pretrained(dir)(text).input_ids with transformers 5.25.0.
    crate::cli::codex_ml()
        .arg("tokenize")
        .arg(&dir)
        .arg("def add(a, b):\n    return a + b")
        .assert()
        .success()
        .stdout("0 279 292 313 8 65 12 274 261 260 282 292 289 274\n");
}
