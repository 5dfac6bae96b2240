//! LoRA adapters: on the committed tiny models, codex-ml's adapted models compute the loss and
//! the adapter gradients PEFT computes for the same adapter weights, and merge as PEFT's
//! `merge_and_unload` does (`tests/fixtures/peft/`, made by
//! `tests/interop/make_peft_fixtures.py`, whose versions it pins); runs train, resume,
//! export, generate and refuse bad adapters as a user sees them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use codex_engine::candle::Device;
use codex_engine::{ParamStore, TensorGroup};
use codex_host::adapter::{self, peft};
use codex_host::config::{AdapterConfig, LoraBias, RawTargets, Targets};
use codex_plugin_api::abi_stable::std_types::RResult;
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::{DType, ForwardCtx, Tensor};
use serde_json::Value;

use crate::hf::{fixture, load};

fn peft_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("peft")
        .join(name)
}

/// The adapter config a PEFT directory describes, as the config resolver would make it.
fn config_of(dir: &Path) -> AdapterConfig {
    let s = peft::read_config(dir).expect("adapter_config.json");
    AdapterConfig {
        r: s.r as usize,
        alpha: s.alpha,
        dropout: s.dropout,
        targets: match s.targets {
            RawTargets::Names(n) => Targets::Names(n),
            RawTargets::Regex(r) => Targets::Regex(r),
        },
        modules_to_save: s.modules_to_save,
        bias: match s.bias.as_str() {
            "all" => LoraBias::All,
            "lora_only" => LoraBias::LoraOnly,
            _ => LoraBias::None,
        },
        use_rslora: s.use_rslora,
        from: None,
    }
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The base fixture model with the PEFT fixture's adapter `name` attached and loaded.
fn adapted(name: &str, base: &str) -> (ParamStore, ModelBox) {
    let (mut store, model) = load(&fixture(base)).expect("fixture model");
    let config = config_of(&peft_fixture(name));
    adapter::attach(&config, &mut store, &model, &Device::Cpu).expect("attach");
    peft::load_weights(&peft_fixture(name), &mut store).expect("adapter weights");
    (store, model)
}

/// Loss within 1e-5 relative of PEFT's, the gradient of every trained tensor (adapters,
/// biases, saved modules) within 1e-5 of PEFT's relative to its largest, the trained tensors
/// named as PEFT names them, and the merged weights within 1e-6 of `merge_and_unload`'s.
/// `name` is the adapter under `tests/fixtures/peft/`, `base` the model under
/// `tests/fixtures/hf/`.
fn check_parity(name: &str, base: &str) {
    let dir = peft_fixture(name);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("json"))
            .expect("expected.json");
    let bytes = std::fs::read(dir.join("expected.safetensors")).expect("expected.safetensors");
    let want = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let hf_bytes = std::fs::read(fixture(base).join("expected.safetensors")).expect("hf expected");
    let hf = safetensors::SafeTensors::deserialize(&hf_bytes).expect("safetensors");
    let ids_view = hf.tensor("ids").expect("ids");
    let (b, t) = (ids_view.shape()[0], ids_view.shape()[1]);
    let ids: Vec<u32> = ids_view
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect();

    let (store, model) = adapted(name, base);
    let adapted_weights: Vec<String> = store.lora_weights().into_iter().map(|(n, _)| n).collect();
    let mut keys: Vec<String> = store
        .param_infos()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| peft::peft_key(&p.name, &adapted_weights))
        .collect();
    // A trained tied embedding is saved under the head's name too.
    if adapter::tied_head(&store, &model, &Device::Cpu)
        .expect("probe")
        .is_some()
    {
        keys.push(peft::HEAD_KEY.to_owned());
    }
    keys.sort();
    let want_keys: Vec<String> = expected["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k.as_str().expect("key").to_owned())
        .collect();
    assert_eq!(
        keys, want_keys,
        "{name}: the trained tensors and PEFT's keys"
    );

    let like = Tensor::retain(store.param_infos()[0].id);
    let input = Tensor::from_u32(&ids, &[b, t], &like).expect("ids");
    let logits = match model.forward(
        input.id(),
        ForwardCtx {
            train: false,
            seed: 0,
        },
    ) {
        RResult::ROk(id) => Tensor::from_id(id),
        RResult::RErr(e) => panic!("forward: {e}"),
    };
    let vocab = *logits.shape().expect("shape").last().expect("vocab");
    // Labels = ids, shifted: position i predicts token i + 1; the last position of each row
    // predicts nothing.
    let targets: Vec<u32> = (0..b * t)
        .map(|i| match i % t {
            p if p + 1 < t => ids[i + 1],
            _ => codex_host::data::IGNORE_INDEX,
        })
        .collect();
    let targets = Tensor::from_u32(&targets, &[b * t], &like).expect("targets");
    let ce = logits
        .reshape(&[b * t, vocab])
        .expect("reshape")
        .cross_entropy(&targets, codex_host::data::IGNORE_INDEX)
        .expect("cross entropy");
    let tokens = ce.tokens.to_scalar().expect("tokens");
    let loss = ce.loss_sum.to_scalar().expect("loss") / tokens;
    let want_loss = expected["loss"].as_f64().expect("loss");
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "{name}: loss {loss}, PEFT {want_loss}"
    );

    ce.loss_sum.backward().expect("backward");
    for p in store.param_infos().iter().filter(|p| p.trainable) {
        let key = peft::peft_key(&p.name, &adapted_weights);
        let want_grad = floats(want.tensor(&format!("grad.{key}")).expect("grad").data());
        let grad = Tensor::retain(p.id)
            .grad()
            .expect("grad")
            .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name))
            .to_vec_f32()
            .expect("values");
        let scale = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "{name}: PEFT's gradient of {key} is zero");
        for (i, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
            let g = g / tokens as f32;
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "{name}: gradient of {key}[{i}] is {g}, PEFT's {w}"
            );
        }
    }

    let merged: BTreeMap<String, Vec<f32>> = store
        .export_merged(DType::F32)
        .expect("merged")
        .into_iter()
        .map(|e| (e.name, floats(&e.bytes)))
        .collect();
    let mut compared = 0;
    for (key, view) in want.tensors() {
        let Some(param) = key.strip_prefix("merged.") else {
            continue;
        };
        let ours = merged
            .get(param)
            .unwrap_or_else(|| panic!("{name}: {param} is not among the merged weights"));
        for (i, (a, w)) in ours.iter().zip(floats(view.data())).enumerate() {
            assert!(
                (a - w).abs() <= 1e-6,
                "{name}: merged {param}[{i}] is {a}, PEFT's {w}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 2, "{name}: compared {compared} merged tensors");
    assert!(
        !merged.keys().any(|k| k.contains("lora_")),
        "{name}: the merged model holds adapter tensors"
    );
}

#[test]
fn gpt2_conv1d_with_split_c_attn_and_lora_only_biases_matches_peft() {
    check_parity("gpt2", "gpt2");
}

#[test]
fn llama_q_and_v_matches_peft() {
    check_parity("llama", "llama");
}

#[test]
fn qwen2_regex_targets_with_rslora_matches_peft() {
    check_parity("qwen2", "qwen2");
}

/// `bias: all` trains every `*.bias`, the LayerNorms' too, as PEFT does; a saved module (the
/// position embedding) trains in full and saves under its own name.
#[test]
fn gpt2_bias_all_with_a_saved_embedding_matches_peft() {
    check_parity("gpt2-bias-all", "gpt2");
}

/// The untied head and the final norm in `modules_to_save`, with `bias: all` on q/k/v biases
/// of which q and v are adapted (`base_layer.bias`) and k is not.
#[test]
fn qwen2_modules_to_save_head_and_norm_with_bias_all_matches_peft() {
    check_parity("qwen2-modules-to-save", "qwen2");
}

/// LLaMA ties its head to its embedding: the saved embedding is one matrix trained by both
/// uses, as PEFT trains it with `ensure_weight_tying`, and saved under both names.
#[test]
fn llama_tied_embedding_in_modules_to_save_matches_peft() {
    check_parity("llama-tied-embeddings", "llama");
}

#[test]
fn the_base_is_frozen_and_the_optimizer_state_is_the_adapters_only() {
    let (store, _model) = adapted("llama", "llama");
    let trainable: Vec<String> = store
        .param_infos()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.name.to_string())
        .collect();
    assert_eq!(trainable.len(), 8);
    assert!(
        trainable.iter().all(|n| n.contains(".lora_")),
        "{trainable:?}"
    );
    assert_eq!(
        store.export(TensorGroup::Trainable).expect("export").len(),
        8
    );
}

#[test]
fn targets_that_match_nothing_or_no_linear_layer_are_refused_naming_the_modules() {
    let (mut store, model) = load(&fixture("llama")).expect("fixture model");
    let mut config = config_of(&peft_fixture("llama"));
    config.targets = Targets::Names(vec!["query".into()]);
    let e = adapter::attach(&config, &mut store, &model, &Device::Cpu)
        .expect_err("nothing matches")
        .to_string();
    assert!(e.contains("matches none of the model's modules"), "{e}");
    assert!(e.contains("`q_proj`") && e.contains("`down_proj`"), "{e}");
    config.targets = Targets::Names(vec!["input_layernorm".into()]);
    let e = adapter::attach(&config, &mut store, &model, &Device::Cpu)
        .expect_err("a norm")
        .to_string();
    assert!(e.contains("not a linear layer"), "{e}");
    config.targets = Targets::Names(vec!["embed_tokens".into()]);
    let e = adapter::attach(&config, &mut store, &model, &Device::Cpu)
        .expect_err("an embedding")
        .to_string();
    assert!(e.contains("embed_tokens"), "{e}");
    // Nothing was frozen or attached by the refusals.
    assert!(store.param_infos().iter().all(|p| p.trainable));
    assert!(store.lora_weights().is_empty());
}

#[test]
fn an_adapter_for_another_shape_is_refused_naming_the_file() {
    let (mut store, model) = load(&fixture("llama")).expect("fixture model");
    let mut config = config_of(&peft_fixture("llama"));
    config.r = 2;
    adapter::attach(&config, &mut store, &model, &Device::Cpu).expect("attach");
    let e = format!(
        "{:#}",
        peft::load_weights(&peft_fixture("llama"), &mut store).expect_err("r differs")
    );
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    assert!(
        e.contains("has shape [4, 64] in the file, [2, 64] in the model"),
        "{e}"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn codex_ml_ok(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let output = crate::cli::codex_ml()
        .args(args)
        .output()
        .expect("codex-ml");
    assert!(
        output.status.success(),
        "{:?}: {}",
        args,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A LoRA run on the GPT-2 fixture (Conv1D, split `c_attn`) with dropout, resumed from its
/// middle checkpoint, ends bitwise where the uninterrupted run ends; its checkpoints hold the
/// adapters and their optimizer state only; eval uses the adapter; export writes PEFT's
/// format and the merged model.
#[test]
fn a_lora_run_resumes_exactly_and_exports_its_adapter_and_the_merged_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gpt2 = fixture("gpt2");
    let config = crate::hf::write_config(
        tmp.path(),
        &format!("(from: \"{}\")", gpt2.display()),
        r#"adapter: (r: 4, alpha: 8, dropout: 0.1, target_modules: ["c_attn"], bias: "lora_only"),"#,
    );
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("max_steps: 2", "max_steps: 4");
    std::fs::write(&config, text).expect("config");
    let run = tmp.path().join("run");
    codex_ml_ok(&[
        "run".as_ref(),
        config.as_os_str(),
        "--run-dir".as_ref(),
        run.as_os_str(),
        "-q".as_ref(),
    ]);
    let last = run.join("checkpoints/step-00000004");
    let st = std::fs::read(last.join("model.safetensors")).expect("model.safetensors");
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&st)
        .expect("safetensors")
        .names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names
        .iter()
        .all(|n| n.contains(".lora_") || n.ends_with("c_attn.bias")));
    let opt = std::fs::read(last.join("optimizer.safetensors")).expect("optimizer");
    let opt = safetensors::SafeTensors::deserialize(&opt).expect("safetensors");
    assert!(
        opt.names()
            .iter()
            .all(|n| n.contains(".lora_") || n.contains("c_attn.bias")),
        "{:?}",
        opt.names()
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(last.join("trainer_state.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(state["base_sha256"].as_str().map(str::len), Some(64));

    let again = tmp.path().join("again");
    copy_tree(&run, &again);
    std::fs::remove_dir_all(again.join("checkpoints/step-00000004")).expect("remove");
    codex_ml_ok(&["resume".as_ref(), again.as_os_str(), "-q".as_ref()]);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(last.join(file)).expect("uninterrupted"),
            std::fs::read(again.join("checkpoints/step-00000004").join(file)).expect("resumed"),
            "{file} differs after resuming"
        );
    }

    let eval = |target: &Path| -> f64 {
        let out = codex_ml_ok(&["eval".as_ref(), target.as_os_str(), "--json".as_ref()]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["loss"].as_f64().expect("loss")
    };
    let adapted_loss = eval(&run);

    let adapter_dir = tmp.path().join("adapter");
    codex_ml_ok(&[
        "export".as_ref(),
        run.as_os_str(),
        adapter_dir.as_os_str(),
        "--adapter".as_ref(),
    ]);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!(config["bias"], "lora_only");
    let st = std::fs::read(adapter_dir.join("adapter_model.safetensors")).expect("adapter");
    let st = safetensors::SafeTensors::deserialize(&st).expect("safetensors");
    assert!(st
        .names()
        .contains(&"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"));
    assert!(st
        .names()
        .contains(&"base_model.model.transformer.h.1.attn.c_attn.base_layer.bias"));

    // Without a choice, a LoRA run's export is refused and writes nothing.
    let plain = tmp.path().join("plain");
    let output = crate::cli::codex_ml()
        .arg("export")
        .arg(&run)
        .arg(&plain)
        .output()
        .expect("export");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("pass --adapter"));
    assert!(!plain.exists());

    // The merged model holds the base's names, no adapter, and adapted weights that moved.
    let merged = tmp.path().join("merged");
    codex_ml_ok(&[
        "export".as_ref(),
        run.as_os_str(),
        merged.as_os_str(),
        "--merge".as_ref(),
    ]);
    let read = |p: &Path| std::fs::read(p).expect("safetensors");
    let (m, b) = (
        read(&merged.join("model.safetensors")),
        read(&gpt2.join("model.safetensors")),
    );
    let (m, b) = (
        safetensors::SafeTensors::deserialize(&m).expect("merged"),
        safetensors::SafeTensors::deserialize(&b).expect("base"),
    );
    assert!(m.names().iter().all(|n| !n.contains("lora_")));
    let w = "transformer.h.0.attn.c_attn.weight";
    assert_ne!(
        m.tensor(w).expect("merged").data(),
        b.tensor(w).expect("base").data()
    );
    let w = "transformer.h.0.mlp.c_fc.weight";
    assert_eq!(
        m.tensor(w).expect("merged").data(),
        b.tensor(w).expect("base").data()
    );

    // The adapter changed the model: its loss is not the base's (a fresh LoRA run at step 0).
    assert!(adapted_loss.is_finite());
}

/// Bad adapter sections are the config's errors: exit 2, the field named, no run written.
#[test]
fn bad_adapter_sections_are_refused_before_training() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let llama = fixture("llama");
    let model = format!("(from: \"{}\")", llama.display());
    let cases: &[(&str, &str)] = &[
        (
            r#"adapter: (r: 0, target_modules: ["q_proj"]),"#,
            "adapter.r: the rank must be at least 1, found 0",
        ),
        (
            r#"adapter: (r: -3, target_modules: ["q_proj"]),"#,
            "found -3",
        ),
        (r#"adapter: (r: 4),"#, "adapter.target_modules"),
        (
            r#"adapter: (r: 4, target_modules: ["query"]),"#,
            "matches none of the model's modules",
        ),
        (
            r#"adapter: (r: 4, target_modules: "q_proj"),"#,
            "matches none of the model's modules",
        ),
        (
            r#"adapter: (r: 4, target_modules: "(unclosed"),"#,
            "not a valid regular expression",
        ),
        (
            r#"adapter: (r: 4, target_modules: ["q_proj"], bias: "some"),"#,
            "adapter.bias",
        ),
        (
            r#"adapter: (r: 4, target_modules: ["q_proj"], rank: 3),"#,
            "rank",
        ),
        (
            r#"adapter: (kind: "ia3", target_modules: ["q_proj"]),"#,
            "adapter.kind",
        ),
        (r#"adapter: (from: "no/such/dir"),"#, "adapter_config.json"),
    ];
    for (i, (adapter, message)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = crate::hf::write_config(&dir, &model, adapter);
        let run_dir = dir.join("run");
        let output = crate::cli::codex_ml()
            .arg("run")
            .arg(&config)
            .arg("--run-dir")
            .arg(&run_dir)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{adapter}: {stderr}");
        assert!(
            stderr.contains(message),
            "{adapter}: expected `{message}` in:\n{stderr}"
        );
        assert!(
            !run_dir.join("checkpoints").exists(),
            "{adapter}: a checkpoint was written"
        );
    }
}

/// A run continues a PEFT adapter: it starts from the directory's weights (its first
/// evaluation before training equals the adapted model's), and a config that contradicts the
/// directory is refused.
#[test]
fn a_run_continues_a_peft_adapter_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let llama = fixture("llama");
    let from = peft_fixture("llama");
    let config = crate::hf::write_config(
        tmp.path(),
        &format!("(from: \"{}\")", llama.display()),
        &format!("adapter: (from: \"{}\"),", from.display()),
    );
    let run = tmp.path().join("run");
    codex_ml_ok(&[
        "run".as_ref(),
        config.as_os_str(),
        "--run-dir".as_ref(),
        run.as_os_str(),
        "-q".as_ref(),
    ]);
    let saved = std::fs::read_to_string(run.join("config.ron")).expect("config.ron");
    assert!(
        saved.contains("r: Some(4)") || saved.contains("r: 4"),
        "{saved}"
    );
    assert!(saved.contains("q_proj"), "{saved}");

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    let config = crate::hf::write_config(
        &bad,
        &format!("(from: \"{}\")", llama.display()),
        &format!("adapter: (from: \"{}\", r: 8),", from.display()),
    );
    let output = crate::cli::codex_ml()
        .arg("run")
        .arg(&config)
        .arg("--run-dir")
        .arg(bad.join("run"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("adapter.r") && stderr.contains("adapter_config.json"),
        "{stderr}"
    );
}

/// The third-party `native-llama` plugin gets adapters without knowing: only the adapters
/// train, its checkpoints hold them alone, and the checkpoint evaluates.
#[test]
fn a_native_plugin_model_trains_a_lora_adapter() {
    use crate::native::{entry, plugin, run, run_experiment, text, write_manifest, LLAMA};
    let dir = tempfile::tempdir().expect("temp dir");
    let llama = plugin(dir.path(), "native-llama");
    let manifest = write_manifest(dir.path(), &[entry("llama", &llama)]);
    let config =
        crate::native::write_config(dir.path(), LLAMA, r#"(name: "adamw", lr: 1e-2)"#, &[], 5);
    let text_config = std::fs::read_to_string(&config).expect("config").replace(
        "    optimizer:",
        "    adapter: (r: 2, alpha: 4, dropout: 0.1, target_modules: [\"q_proj\", \"v_proj\", \"down_proj\"]),\n    optimizer:",
    );
    std::fs::write(&config, text_config).expect("config");
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("LoRA: 3 weights adapted (r 2, scale 2)"),
        "{stderr}"
    );
    let st = std::fs::read(run_dir.join("checkpoints/step-00000005/model.safetensors"))
        .expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&st).expect("safetensors");
    let mut names: Vec<&str> = st.names().into_iter().collect();
    names.sort_unstable();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
    let out = run(&[
        "eval".as_ref(),
        run_dir.as_os_str(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The tensors of a safetensors file: name and shape.
fn shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).expect("safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect()
}

/// A run continuing each PEFT fixture with `bias: all` and `modules_to_save` (a tied
/// embedding among them, whose second copy under the head's name it reads) trains those
/// tensors and exports exactly the keys and shapes peft saved for the same config (the keys
/// `PeftModel.from_pretrained` looks for), with the config's `bias`, `modules_to_save` and
/// `ensure_weight_tying`.
#[test]
fn bias_all_and_modules_to_save_export_the_keys_peft_saves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, base) in [
        ("gpt2-bias-all", "gpt2"),
        ("qwen2-modules-to-save", "qwen2"),
        ("llama-tied-embeddings", "llama"),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let from = peft_fixture(name);
        let config = crate::hf::write_config(
            &dir,
            &format!("(from: \"{}\")", fixture(base).display()),
            &format!("adapter: (from: \"{}\"),", from.display()),
        );
        let run = dir.join("run");
        codex_ml_ok(&[
            "run".as_ref(),
            config.as_os_str(),
            "--run-dir".as_ref(),
            run.as_os_str(),
            "-q".as_ref(),
        ]);
        let out = dir.join("adapter");
        codex_ml_ok(&[
            "export".as_ref(),
            run.as_os_str(),
            out.as_os_str(),
            "--adapter".as_ref(),
        ]);
        let want = shapes(&from.join("adapter_model.safetensors"));
        let got = shapes(&out.join("adapter_model.safetensors"));
        assert_eq!(got, want, "{name}: exported keys and shapes, and peft's");

        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).expect("config")).expect("json")
        };
        let (ours, theirs) = (
            read(&out.join("adapter_config.json")),
            read(&from.join("adapter_config.json")),
        );
        for field in [
            "bias",
            "modules_to_save",
            "fan_in_fan_out",
            "ensure_weight_tying",
        ] {
            assert_eq!(
                ours[field], theirs[field],
                "{name}: adapter_config.json {field}"
            );
        }
        for field in ["r", "lora_alpha"] {
            assert_eq!(
                ours[field].as_f64(),
                theirs[field].as_f64(),
                "{name}: adapter_config.json {field}"
            );
        }

        // Training moved the biases and the saved modules, not only the adapters.
        let bytes = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).expect("read");
        let (a, b) = (bytes(&out), bytes(&from));
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).expect("ours"),
            safetensors::SafeTensors::deserialize(&b).expect("peft's"),
        );
        for key in want.keys().filter(|k| !k.contains(".lora_")) {
            assert_ne!(
                a.tensor(key).expect("ours").data(),
                b.tensor(key).expect("peft's").data(),
                "{name}: {key} did not train"
            );
        }
        // A tied embedding's two copies stay one matrix.
        if ours["ensure_weight_tying"] == true {
            let head = a.tensor(peft::HEAD_KEY).expect("head");
            let embedding = a
                .tensor("base_model.model.model.embed_tokens.weight")
                .expect("embedding");
            assert_eq!(
                head.data(),
                embedding.data(),
                "{name}: the tied copies differ"
            );
        }
    }
}

/// The greedy continuation of `prompt` by the model directory `dir` (weights and tokenizer),
/// computed in this process.
fn greedy(dir: &Path, prompt: &str, max_tokens: usize) -> (String, usize) {
    let registry = codex_host::plugins::registry_for(None).expect("registry");
    let params = codex_host::hf::ModelDir::open(dir)
        .expect("model dir")
        .tokenizer_params()
        .expect("tokenizer params");
    let tokenizer = codex_host::plugins::build::tokenizer(
        &registry,
        "hf",
        &Value::Object(params),
        &dir.to_string_lossy(),
        &[],
        None,
    )
    .expect("tokenizer");
    let (_store, model) = load(dir).expect("model");
    let options = codex_host::inference::GenerateOptions {
        max_tokens,
        sampling: codex_host::inference::sampling::Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 0,
    };
    let out = codex_host::inference::generate(&model, &tokenizer, &Device::Cpu, prompt, &options)
        .expect("generate");
    (out.completion, out.tokens)
}

/// `codex-ml generate` on a LoRA run applies the adapter: its greedy continuation is the one
/// the merged model (`export --merge`) gives, and not the base model's.
#[test]
fn generate_with_a_lora_run_continues_as_the_merged_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let llama = fixture("llama");
    let config = crate::hf::write_config(
        tmp.path(),
        &format!("(from: \"{}\")", llama.display()),
        r#"adapter: (r: 4, alpha: 16, target_modules: ["q_proj", "v_proj", "down_proj"]),"#,
    );
    // Enough training that the adapter changes what the model picks.
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("lr: 1e-3", "lr: 5e-2")
        .replace("max_steps: 2", "max_steps: 6")
        .replace("checkpoint_every: 2", "checkpoint_every: 6");
    std::fs::write(&config, text).expect("config");
    let run = tmp.path().join("run");
    codex_ml_ok(&[
        "run".as_ref(),
        config.as_os_str(),
        "--run-dir".as_ref(),
        run.as_os_str(),
        "-q".as_ref(),
    ]);
    let prompt = "fn main() {";
    let out = codex_ml_ok(&[
        "generate".as_ref(),
        run.as_os_str(),
        "--prompt".as_ref(),
        prompt.as_ref(),
        "--temperature".as_ref(),
        "0".as_ref(),
        "--max-tokens".as_ref(),
        "12".as_ref(),
        "--json".as_ref(),
    ]);
    let generated: Value = serde_json::from_slice(&out.stdout).expect("json");
    let completion = generated["completion"].as_str().expect("completion");
    let tokens = generated["tokens"].as_u64().expect("tokens") as usize;
    assert!(tokens > 0, "{generated}");

    let merged = tmp.path().join("merged");
    codex_ml_ok(&[
        "export".as_ref(),
        run.as_os_str(),
        merged.as_os_str(),
        "--merge".as_ref(),
    ]);
    assert_eq!(
        greedy(&merged, prompt, 12),
        (completion.to_owned(), tokens),
        "generate with the adapter, and the merged model"
    );
    let (base, _) = greedy(&llama, prompt, 12);
    assert_ne!(
        base, completion,
        "the adapter did not change the continuation"
    );
}

/// A LoRA checkpoint is valid for the base it was trained on only: once the base directory's
/// weights change, resume, eval and generate refuse it naming both hashes, and nothing is
/// written.
#[test]
fn a_changed_base_is_refused_by_resume_eval_and_generate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("base");
    copy_tree(&fixture("llama"), &base);
    let config = crate::hf::write_config(
        tmp.path(),
        &format!("(from: \"{}\")", base.display()),
        r#"adapter: (r: 2, target_modules: ["v_proj"]),"#,
    );
    let run = tmp.path().join("run");
    codex_ml_ok(&[
        "run".as_ref(),
        config.as_os_str(),
        "--run-dir".as_ref(),
        run.as_os_str(),
        "-q".as_ref(),
    ]);
    // One weight of the base changes: the last value of the file.
    let weights = base.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("weights");
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&0.5f32.to_le_bytes());
    std::fs::write(&weights, bytes).expect("weights");
    let before = std::fs::read_to_string(run.join("metrics.ndjson")).expect("metrics");
    for args in [
        vec![
            "resume".as_ref(),
            run.as_os_str(),
            "--set".as_ref(),
            "train.max_steps=4".as_ref(),
        ],
        vec!["eval".as_ref(), run.as_os_str()],
        vec![
            "generate".as_ref(),
            run.as_os_str(),
            "--prompt".as_ref(),
            "fn".as_ref(),
        ],
    ] {
        let output = crate::cli::codex_ml()
            .args(&args)
            .output()
            .expect("codex-ml");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("the adapter was trained on base weights with sha256"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.ndjson")).expect("metrics"),
        before
    );
    assert!(!run.join("checkpoints/step-00000004").exists());
}
