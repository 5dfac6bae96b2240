//! Training end to end: the loss falls, accumulation is token-weighted, evaluation masks
//! padding, generation is reproducible, and bad input gets a clear error rather than a panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use codex_engine::candle::{Device, Tensor as CTensor};
use codex_host::config::Config;
use codex_host::data::{BatchShape, ValBatches};
use codex_host::inference;
use codex_host::plugins::registry::Registry;
use codex_host::run::{self as session, RunOptions, RunSummary};

use codex_plugin_api::{ForwardCtx, Tensor};
use predicates::prelude::*;

use crate::cli::codex_ml;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code")
}

/// A tiny experiment over the fixture sources; `extra` is spliced into the `train` section.
fn config_text(train: &str, optimizer: &str) -> String {
    format!(
        r#"(
    experiment: "tiny",
    seed: 7,
    data: (train: [Text(paths: ["{dir}/*"])], val_fraction: 0.34, cache_dir: "{cache}"),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: {optimizer},
    train: ({train}),
    sinks: [],
)"#,
        dir = fixtures().display(),
        cache = codex_tests::token_cache().display(),
    )
}

fn load(dir: &Path, text: &str, overrides: &[&str]) -> Config {
    let path = dir.join("exp.ron");
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<_> = overrides.iter().map(|o| o.parse().unwrap()).collect();
    Config::load(&path, &overrides).unwrap_or_else(|e| panic!("{e}"))
}

fn train(dir: &Path, config: &Config, name: &str) -> RunSummary {
    let registry = Registry::with_builtins().unwrap();
    let options = RunOptions {
        run_dir: Some(dir.join(name)),
        runs_root: dir.join("runs"),
        stop: Some(Arc::new(AtomicBool::new(false))),
        progress: false,
        allow_plugin_change: false,
        retune: false,
        skip_batches: 0,
    };
    session::run(config, &registry, &options).unwrap_or_else(|e| panic!("{e:#}"))
}

fn records(run: &Path, split: &str, name: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == split && r["name"] == name)
        .map(|r| (r["step"].as_u64().unwrap(), r["value"].as_f64().unwrap()))
        .collect()
}

#[test]
fn loss_falls_on_a_tiny_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let config = load(
        tmp.path(),
        &config_text(
            "max_steps: 40, seq_len: 32, batch_size: 8, eval_every: 10, log_every: 5",
            r#"(name: "adamw", lr: 3e-3)"#,
        ),
        &[],
    );
    let summary = train(tmp.path(), &config, "run");
    assert_eq!(summary.steps, 40);
    let val = records(&summary.run_dir, "val", "loss");
    assert_eq!(
        val.iter().map(|r| r.0).collect::<Vec<_>>(),
        [10, 20, 30, 40]
    );
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(last < first - 0.3, "validation loss did not fall: {val:?}");
    let train_loss = records(&summary.run_dir, "train", "loss");
    assert!(
        train_loss.last().unwrap().1 < (256.0f64 + 2.0).ln() - 1.0,
        "{train_loss:?}"
    );
    // perplexity is exp(loss) of the same sums
    let ppl = records(&summary.run_dir, "val", "perplexity");
    for ((_, l), (_, p)) in val.iter().zip(&ppl) {
        assert!((l.exp() - p).abs() < 1e-6 * p, "{l} {p}");
    }
    assert!(summary.last_checkpoint.unwrap().ends_with("step-00000040"));
}

/// The parameters after one SGD step, read back from the final checkpoint.
fn params_after_one_step(dir: &Path, batch: usize, accum: usize) -> Vec<(String, Vec<f32>)> {
    let config = load(
        dir,
        &config_text(
            &format!("max_steps: 1, seq_len: 16, batch_size: {batch}, grad_accum: {accum}, clip_norm: 0.0"),
            r#"(name: "sgd", lr: 0.5)"#,
        ),
        &[],
    );
    let summary = train(dir, &config, &format!("b{batch}a{accum}"));
    let file = summary.last_checkpoint.unwrap().join("model.safetensors");
    let tensors = codex_engine::candle::safetensors::load(&file, &Device::Cpu).unwrap();
    let mut out: Vec<_> = tensors
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The recorded training loss is Hugging Face Trainer's: the token-weighted mean over the
/// steps since the last record, not the last step's value; `tokens_seen` counts the targets.
#[test]
fn the_logged_loss_is_the_token_weighted_mean_of_its_window() {
    let tmp = tempfile::tempdir().unwrap();
    // The data's last batch of each epoch is short, so steps differ in tokens.
    let train_section = "max_steps: 12, seq_len: 32, batch_size: 5, eval_every: 0";
    let each = load(
        tmp.path(),
        &config_text(
            &format!("{train_section}, log_every: 1"),
            r#"(name: "adamw", lr: 3e-3)"#,
        ),
        &[],
    );
    let windowed = load(
        tmp.path(),
        &config_text(
            &format!("{train_section}, log_every: 4"),
            r#"(name: "adamw", lr: 3e-3)"#,
        ),
        &[],
    );
    train(tmp.path(), &each, "each");
    train(tmp.path(), &windowed, "windowed");
    let step_loss = records(&tmp.path().join("each"), "train", "loss");
    let seen = records(&tmp.path().join("each"), "train", "tokens_seen");
    assert_eq!(step_loss.len(), 12);
    let tokens: Vec<f64> = seen
        .iter()
        .scan(0.0, |before, &(_, total)| {
            let n = total - *before;
            *before = total;
            Some(n)
        })
        .collect();
    assert!(
        tokens.iter().any(|&n| n != tokens[0]),
        "every step has {} tokens: the test cannot tell a weighted mean",
        tokens[0]
    );
    let logged = records(&tmp.path().join("windowed"), "train", "loss");
    assert_eq!(logged.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 8, 12]);
    for (window, &(step, value)) in logged.iter().enumerate() {
        let range = window * 4..window * 4 + 4;
        let nll: f64 = range.clone().map(|i| step_loss[i].1 * tokens[i]).sum();
        let n: f64 = range.map(|i| tokens[i]).sum();
        let expected = nll / n;
        assert!(
            (value - expected).abs() <= 1e-9 * expected,
            "step {step}: logged {value}, the window's token-weighted mean is {expected}"
        );
        assert_ne!(
            value,
            step_loss[step as usize - 1].1,
            "step {step}: one step's value"
        );
    }
    assert_eq!(
        records(&tmp.path().join("windowed"), "train", "tokens_seen").last(),
        seen.last()
    );
}

#[test]
fn accumulation_is_token_weighted_batch_8_equals_2_times_4() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = params_after_one_step(tmp.path(), 8, 1);
    let split = params_after_one_step(tmp.path(), 2, 4);
    assert_eq!(whole.len(), split.len());
    for ((name, a), (other, b)) in whole.iter().zip(&split) {
        assert_eq!(name, other);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 + 1e-4 * x.abs(), "{name}: {x} vs {y}");
        }
    }
    // A different batch (the first two windows only) must give different parameters, or the
    // comparison above proves nothing.
    let fewer = params_after_one_step(tmp.path(), 2, 1);
    let differs = whole
        .iter()
        .zip(&fewer)
        .any(|((_, a), (_, b))| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-4));
    assert!(differs, "one SGD step did not depend on the batch");
}

#[test]
fn evaluation_counts_only_real_targets_and_padding_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = load(
        tmp.path(),
        &config_text(
            "max_steps: 3, seq_len: 16, batch_size: 4",
            r#"(name: "adamw", lr: 1e-3)"#,
        ),
        &[],
    );
    let summary = train(tmp.path(), &config, "run");
    let registry = Registry::with_builtins().unwrap();
    let loaded = inference::load(&summary.run_dir, &registry).unwrap();

    // 50 tokens in windows of 16: three full windows and one of 1 target, padded to 16.
    let tokens: Vec<u32> = (0..51).map(|i| (i * 7 % 250) as u32).collect();
    let shape = BatchShape {
        batch_size: 3,
        seq_len: 16,
    };
    let val = ValBatches::new(tokens.clone().into(), shape, 0).unwrap();
    let totals = inference::evaluate(&loaded.model, &val, &loaded.device, None).unwrap();
    assert_eq!(totals.tokens, 50.0);

    // Reference: each window unpadded, one at a time.
    let (mut nll, mut correct) = (0.0, 0.0);
    for start in (0..50).step_by(16) {
        let end = (start + 16).min(50);
        let inputs = &tokens[start..end];
        let targets = &tokens[start + 1..end + 1];
        let t = inputs.len();
        let x = Tensor::from_id(codex_engine::insert(
            CTensor::from_vec(inputs.to_vec(), (1, t), &Device::Cpu).unwrap(),
        ));
        let y = Tensor::from_id(codex_engine::insert(
            CTensor::from_vec(targets.to_vec(), t, &Device::Cpu).unwrap(),
        ));
        let logits = Tensor::from_id(
            loaded
                .model
                .forward(
                    x.id(),
                    ForwardCtx {
                        train: false,
                        seed: 0,
                    },
                )
                .into_result()
                .unwrap(),
        );
        let v = logits.shape().unwrap()[2];
        let ce = logits
            .reshape(&[t, v])
            .unwrap()
            .cross_entropy(&y, u32::MAX)
            .unwrap();
        nll += ce.loss_sum.to_scalar().unwrap();
        correct += ce.correct.to_scalar().unwrap();
    }
    assert!(
        (totals.loss() - nll / 50.0).abs() < 1e-4,
        "{} vs {}",
        totals.loss(),
        nll / 50.0
    );
    assert!((totals.perplexity() - (nll / 50.0).exp()).abs() < 1e-3);
    assert_eq!(totals.correct, correct);
}

#[test]
fn generate_and_eval_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("exp.ron");
    std::fs::write(
        &path,
        config_text(
            "max_steps: 4, seq_len: 16, batch_size: 4",
            r#"(name: "adamw", lr: 1e-3)"#,
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    codex_ml()
        .args([
            "run",
            path.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .assert()
        .success()
        .stderr(predicate::str::contains("finished 4 steps"));
    let generate = |seed: &str| {
        let out = codex_ml()
            .args([
                "generate",
                run.to_str().unwrap(),
                "--prompt",
                "fn main",
                "--max-tokens",
                "24",
                "--seed",
                seed,
            ])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        String::from_utf8_lossy(&out).into_owned()
    };
    let a = generate("1");
    assert!(a.starts_with("fn main"), "{a}");
    assert_eq!(a, generate("1"), "same seed, same text");
    assert_ne!(a, generate("2"), "another seed, another text");

    codex_ml()
        .args(["eval", run.to_str().unwrap()])
        .assert()
        .success()
        .stdout(
            predicate::str::is_match(r"loss \d+\.\d+  perplexity \d+\.\d+  accuracy 0\.\d+")
                .unwrap(),
        );
}

/// `eval` and `generate` run in the run's kernel and precision: `eval` on a bf16 or f16 run
/// reports, bit for bit, the validation loss the run recorded at its last step (in another
/// precision it would not), and `generate` continues the prompt as the run's own sample did.
#[test]
fn eval_and_generate_run_in_the_runs_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    for precision in ["f32", "bf16", "f16"] {
        if precision == "bf16" && !crate::precision::bf16_here() {
            eprintln!(
                "this CPU has no AVX512-BF16: a bf16 run multiplies in f32, nothing to compare"
            );
            continue;
        }
        let path = tmp.path().join(format!("{precision}.ron"));
        let text = config_text(
            "max_steps: 6, seq_len: 16, batch_size: 4, eval_batches: 0",
            r#"(name: "adamw", lr: 3e-3)"#,
        )
        .replace(
            "sinks: [],",
            &format!(
                r#"kernel: "cpu", precision: "{precision}",
    generate: (prompt: "fn main", max_tokens: 16),
    sinks: [],"#
            ),
        );
        std::fs::write(&path, text).unwrap();
        let run = tmp.path().join(precision);
        let out = codex_ml()
            .args([
                "run",
                path.to_str().unwrap(),
                "--run-dir",
                run.to_str().unwrap(),
                "--json",
            ])
            .assert()
            .success()
            .get_output()
            .clone();
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let recorded = records(&run, "val", "loss").last().unwrap().1;
        let out_eval = codex_ml()
            .args(["eval", run.to_str().unwrap(), "--json"])
            .assert()
            .success()
            .get_output()
            .clone();
        let report: serde_json::Value = serde_json::from_slice(&out_eval.stdout).unwrap();
        assert_eq!(
            report["loss"].as_f64(),
            Some(recorded),
            "{precision}: eval's loss is not the run's validation loss"
        );
        losses.push((precision, recorded));
        // `generate` with the run's seed makes the run's own sample again.
        let generated = codex_ml()
            .args(["generate", run.to_str().unwrap(), "--prompt", "fn main"])
            .args(["--max-tokens", "16", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let generated: serde_json::Value = serde_json::from_slice(&generated).unwrap();
        assert!(summary["sample"].is_string(), "{summary}");
        assert_eq!(
            generated["text"], summary["sample"],
            "{precision}: generate differs from the run's sample"
        );
    }
    // The half precisions are not f32 in disguise.
    for (precision, loss) in &losses[1..] {
        assert_ne!(
            *loss, losses[0].1,
            "{precision} recorded the f32 run's loss"
        );
    }
}

/// `codex-ml run` on `text` (with `--set` overrides) fails with exit `code` and a
/// message containing every one of `expect`, never a panic.
fn check_run_error(dir: &Path, text: &str, overrides: &[&str], code: i32, expect: &[&str]) {
    let path = dir.join("bad.ron");
    std::fs::write(&path, text).unwrap();
    let mut cmd = codex_ml();
    cmd.current_dir(dir).args(["run", path.to_str().unwrap()]);
    for o in overrides {
        cmd.args(["--set", o]);
    }
    let out = cmd.assert().code(code).get_output().clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected `{e}` in:\n{stderr}");
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ok = config_text(
        "max_steps: 2, seq_len: 16, batch_size: 2",
        r#"(name: "adamw", lr: 1e-3)"#,
    );

    // A missing data file: the user's input, like a config error.
    let missing = ok.replace(
        &format!("{}/*", fixtures().display()),
        "/nonexistent/data.rs",
    );
    check_run_error(dir, &missing, &[], 2, &["/nonexistent/data.rs"]);

    // An empty corpus, likewise.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("a.txt"), "").unwrap();
    let text = ok.replace(
        &format!("{}/*", fixtures().display()),
        &format!("{}/*", empty.display()),
    );
    check_run_error(dir, &text, &[], 2, &["empty"]);

    // seq_len beyond the model's context: the config's to fix, so exit code 2.
    check_run_error(dir, &ok, &["train.seq_len=64"], 2, &["seq_len", "64", "32"]);

    // An unknown component lists the known ones.
    check_run_error(
        dir,
        &ok,
        &["optimizer.name=adamx"],
        2,
        &["adamx", "adamw", "sgd"],
    );

    // A malformed config names file, line, column and field.
    let malformed = ok.replace("batch_size: 2", "batch_size: \"two\"");
    check_run_error(dir, &malformed, &[], 2, &["bad.ron:", "batch_size"]);
}

/// `metrics.ndjson` is the run's complete record whatever the config says: an `ndjson` sink
/// sent to another file writes an extra copy beside it.
#[test]
fn metrics_ndjson_is_written_even_when_the_ndjson_sink_names_another_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config = load(
        tmp.path(),
        &config_text(
            "max_steps: 3, seq_len: 16, batch_size: 2, log_every: 1",
            r#"(name: "adamw", lr: 1e-3)"#,
        ),
        &[r#"sinks=[(name: "ndjson", params: (file: "copy.ndjson"))]"#],
    );
    let summary = train(tmp.path(), &config, "run");
    let main = std::fs::read_to_string(summary.run_dir.join("metrics.ndjson")).unwrap();
    let copy = std::fs::read_to_string(summary.run_dir.join("copy.ndjson")).unwrap();
    assert_eq!(records(&summary.run_dir, "train", "loss").len(), 3);
    assert_eq!(main, copy);
}

/// f16 with a loss scale far too large: the first steps' gradients overflow, so their
/// optimizer steps are skipped, the scale halves each time and the log says so; then the
/// run trains (and skips again now and then, as gradients grow). Skipped steps count towards
/// `max_steps`, as the Trainer's `global_step` does, while the schedule moves only with
/// applied steps, as the Trainer steps its scheduler only after them.
#[test]
fn f16_with_an_overflowing_loss_scale_skips_steps_backs_off_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("exp.ron");
    let init = 1073741824.0; // 2³⁰
    let text = config_text(
        "max_steps: 40, seq_len: 32, batch_size: 8, eval_every: 10, log_every: 1, \
         schedule: (kind: constant, warmup_steps: 4)",
        r#"(name: "adamw", lr: 3e-3)"#,
    )
    .replace(
        "sinks: [],",
        &format!(
            r#"kernel: "cpu", precision: "f16", loss_scale: (init_scale: {init:?}, growth_interval: 1000), sinks: [],"#
        ),
    );
    std::fs::write(&path, text).unwrap();
    let run = tmp.path().join("run");
    let out = codex_ml()
        .args([
            "run",
            path.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("precision f16: matrix products in f16"),
        "{stderr}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("the optimizer step is skipped"))
        .collect();
    assert!(
        warnings[0].contains("step 1: a gradient is not finite at loss scale 1073741824;")
            && warnings[0].contains("backs off to 536870912"),
        "{stderr}"
    );

    let scales = records(&run, "train", "loss_scale");
    let skipped = records(&run, "train", "skipped_steps");
    let lr = records(&run, "train", "lr");
    assert_eq!((scales.len(), skipped.len(), lr.len()), (40, 40, 40));
    // The first steps overflow one after another, halving the scale.
    assert!(
        skipped[..3].iter().map(|r| r.1).eq([1.0, 2.0, 3.0]),
        "{skipped:?}"
    );
    // Step by step: a skip halves the scale (the growth interval is longer than the run),
    // each is logged, and the learning rate is warmup's at the count of applied steps.
    let (mut scale, mut before) = (init, 0.0);
    for i in 0..40 {
        let step = i as u64 + 1;
        assert_eq!((scales[i].0, skipped[i].0, lr[i].0), (step, step, step));
        let now = skipped[i].1;
        assert!(now == before || now == before + 1.0, "{skipped:?}");
        if now > before {
            scale /= 2.0;
        }
        assert_eq!(scales[i].1, scale, "scale at step {step}");
        let applied = step as f64 - before;
        assert_eq!(lr[i].1, 3e-3 * applied.min(4.0) / 4.0, "lr at step {step}");
        before = now;
    }
    assert_eq!(
        warnings.len() as f64,
        before,
        "one warning per skipped step"
    );
    // And it trains.
    let val = records(&run, "val", "loss");
    assert_eq!(val.len(), 4, "{val:?}");
    assert!(
        val[3].1 < val[0].1 - 0.3,
        "validation loss did not fall: {val:?}"
    );
    // The scaler's state is in the checkpoint.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-00000040/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["trainer"]["skipped_steps"].as_f64(),
        Some(before),
        "{state}"
    );
    assert_eq!(
        state["trainer"]["loss_scale"].as_f64(),
        Some(scale),
        "{state}"
    );
}

#[test]
fn loss_scaling_settings_are_checked_with_their_place_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = config_text(
        "max_steps: 2, seq_len: 16, batch_size: 2",
        r#"(name: "adamw", lr: 1e-3)"#,
    );
    let bad = ok.replace(
        "sinks: [],",
        "kernel: \"cpu\", precision: \"f16\",\n    loss_scale: (init_scale: 0.0),\n    sinks: [],",
    );
    check_run_error(
        tmp.path(),
        &bad,
        &[],
        2,
        &["bad.ron:", "loss_scale.init_scale", "positive"],
    );
    let without_f16 = ok.replace(
        "sinks: [],",
        "loss_scale: (growth_interval: 10),\n    sinks: [],",
    );
    check_run_error(
        tmp.path(),
        &without_f16,
        &[],
        2,
        &["bad.ron:", "loss_scale", "f16"],
    );
}
