//! Supervised fine-tuning with several examples packed into each row: rows filled by
//! best-fit decreasing, each example's positions from 0, attention confined to each example —
//! so that a packed batch computes exactly what its examples would alone.
//!
//! The decisive checks compare packed with unpacked: attention over packed rows against each
//! example attended alone (values and gradients, with the `cpu` kernel and without, on heads
//! and on heads split off projections), and whole runs of built-in and plugin models whose
//! every step sees all the examples, packed or one per row, which must log the same losses.

use std::fs;
use std::path::{Path, PathBuf};

use codex_engine::candle::{DType as CD, Device, Tensor as CT, Var};
use codex_engine::{self as engine};
use codex_host::data::{pack_best_fit, BatchShape, DataCursor, TrainBatches, IGNORE_INDEX};
use codex_nn::Positions;
use codex_plugin_api::Tensor;
use serde_json::{json, Value};

use crate::kernels::{assert_close, cpu_kernel, flat, input, values};
use crate::tokenizers::fixtures;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

// ---- rows ----

#[test]
fn best_fit_decreasing_puts_the_longest_first_where_they_fill_best() {
    // 6 opens row 0 (2 left), 5 row 1 (3 left), 4 row 2 (4 left); 3 fits row 1 best (exactly),
    // 2 fits row 0 exactly.
    assert_eq!(
        pack_best_fit(&[5, 3, 4, 2, 6], 8),
        vec![vec![4, 3], vec![0, 1], vec![2]]
    );
    // Equal lengths keep their order; a full row takes nothing more.
    assert_eq!(pack_best_fit(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
    assert_eq!(pack_best_fit(&[], 8), Vec::<Vec<usize>>::new());

    let lens: Vec<usize> = (0..200).map(|i| 1 + (i * 37 + i * i) % 61).collect();
    let rows = pack_best_fit(&lens, 64);
    let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..200).collect::<Vec<_>>(), "every example once");
    for row in &rows {
        assert!(row.iter().map(|&i| lens[i]).sum::<usize>() <= 64);
    }
    // As with any fit that opens a row only when nothing else has room, at most one row is
    // half empty or worse.
    let sparse = rows
        .iter()
        .filter(|row| row.iter().map(|&i| lens[i]).sum::<usize>() <= 32)
        .count();
    assert!(sparse <= 1, "{sparse} rows at most half full");
}

/// A stream of `lens.len()` examples of those lengths (ids `100·e + i`), each with the loss on
/// its second half, as `sft::fit_examples` leaves them: the stream and (start, length) pairs.
fn stream(lens: &[usize]) -> (Vec<u32>, Vec<(usize, usize)>) {
    let mut tokens = Vec::new();
    let mut examples = Vec::new();
    for (e, &len) in lens.iter().enumerate() {
        tokens.push(len as u32);
        examples.push((tokens.len(), len));
        for i in 0..len {
            let id = (100 * e + i) as u32;
            let learn = if i >= len / 2 {
                codex_host::data::sft::LEARN
            } else {
                0
            };
            tokens.push(id | learn);
        }
    }
    (tokens, examples)
}

#[test]
fn packed_batches_hold_every_example_once_from_position_zero() {
    let lens = [9, 3, 5, 12, 2, 7, 4, 6, 3, 8];
    let (tokens, examples) = stream(&lens);
    let shape = BatchShape {
        batch_size: 2,
        seq_len: 12,
    };
    let pad = 99_999;
    let unpacked = ok(TrainBatches::examples(
        tokens.clone().into(),
        examples.clone(),
        shape,
        1,
        pad,
        false,
    ));
    let mut packed = ok(TrainBatches::examples(
        tokens.into(),
        examples,
        shape,
        1,
        pad,
        true,
    ));
    let (n, rows, fill) = packed.packing().expect("packed");
    assert_eq!(n, lens.len());
    assert!(rows < lens.len(), "{rows} rows");
    assert!(fill > 0.5 && fill <= 1.0, "{fill}");
    assert_eq!(unpacked.packing(), None);
    assert_eq!(packed.windows(), rows, "the cursor counts rows");
    assert_eq!(packed.tokens_per_epoch(), unpacked.tokens_per_epoch());

    // Over an epoch, the pieces that start at position 0 are the examples' inputs, each once,
    // with their targets; padding is ignored and continues the row's last example.
    let mut pieces = Vec::new();
    let mut counted = 0;
    let mut batches = Vec::new();
    for _ in 0..packed.batches_per_epoch() {
        let b = packed.next_batch();
        let positions = b.positions.clone().expect("positions");
        assert_eq!(positions.len(), b.rows * b.seq_len);
        for r in 0..b.rows {
            let at = |i: usize| r * b.seq_len + i;
            assert_eq!(positions[at(0)], 0, "a row starts an example");
            let mut i = 0;
            while i < b.seq_len {
                let mut j = i + 1;
                while j < b.seq_len && positions[at(j)] == positions[at(j - 1)] + 1 {
                    j += 1;
                }
                let inputs = &b.inputs[at(i)..at(j)];
                let targets = &b.targets[at(i)..at(j)];
                if inputs[0] == pad {
                    assert!(targets.iter().all(|&t| t == IGNORE_INDEX));
                } else {
                    // Padding after the last example continues its positions.
                    let real = inputs.iter().take_while(|&&id| id != pad).count();
                    pieces.push(inputs[..real].to_vec());
                    assert!(targets[real..].iter().all(|&t| t == IGNORE_INDEX));
                }
                i = j;
            }
        }
        counted += b.tokens;
        batches.push(b);
    }
    assert_eq!(counted, packed.tokens_per_epoch());
    pieces.sort();
    let mut want: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(e, &len)| (0..len - 1).map(|i| (100 * e + i) as u32).collect())
        .collect();
    want.sort();
    assert_eq!(pieces, want);

    // A resumed epoch gives the same packed batches.
    let (tokens, examples) = stream(&lens);
    let mut resumed = ok(TrainBatches::examples(
        tokens.into(),
        examples,
        shape,
        1,
        pad,
        true,
    ));
    ok(resumed.seek(DataCursor {
        epoch: 0,
        position: 2,
    }));
    assert_eq!(resumed.next_batch(), batches[1]);
}

// ---- the engine ----

const B: usize = 2;
const T: usize = 7;
const H: usize = 3;
const D: usize = 5;
/// Row 0 packs examples of 3, 1 and 3 tokens; row 1 one of 4 and one of 3.
const POSITIONS: [u32; B * T] = [0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2];

/// (row, first, length) of every example in [`POSITIONS`].
fn segments() -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for r in 0..B {
        let row = &POSITIONS[r * T..(r + 1) * T];
        let mut i = 0;
        while i < T {
            let mut j = i + 1;
            while j < T && row[j] != 0 {
                j += 1;
            }
            out.push((r, i, j - i));
            i = j;
        }
    }
    out
}

/// Values and input gradients of `Σ y·w`.
struct Run {
    y: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

fn backward(y: &CT, inputs: &[&Var]) -> Run {
    let w = CT::from_vec(values(y.elem_count(), 99), y.shape(), &Device::Cpu).expect("w");
    let loss = y
        .to_dtype(CD::F32)
        .and_then(|y| y.mul(&w))
        .and_then(|p| p.sum_all())
        .expect("loss");
    let grads = loss.backward().expect("backward");
    Run {
        y: flat(y),
        grads: inputs
            .iter()
            .map(|v| flat(grads.get(v.as_tensor()).expect("gradient")))
            .collect(),
    }
}

/// q, k and v as `[b, h, t, d]` heads of the inputs: the inputs themselves, or heads split
/// off `[b·t, h·d]` projections (the pattern the engine fuses attention on).
fn heads(x: &Tensor, split: bool) -> Tensor {
    match split {
        true => ok(ok(x.reshape(&[B, T, H, D])).transpose(1, 2)),
        false => x.clone(),
    }
}

/// Causal attention over the packed rows, with the kernel or without.
fn packed(kernel: bool, split: bool, inputs: &[&Var]) -> Run {
    engine::install();
    let _scope = ok(engine::scoped_kernel(&Device::Cpu, kernel.then(cpu_kernel)));
    let x: Vec<Tensor> = inputs
        .iter()
        .map(|v| Tensor::from_id(engine::insert(v.as_tensor().clone())))
        .collect();
    let ids = Tensor::from_id(ok(engine::upload_packed(
        vec![0; B * T],
        POSITIONS.to_vec(),
        &[B, T],
        &Device::Cpu,
    )));
    let (y, pass) = ok(engine::forward_pass(ids.id(), || {
        let (q, k, v) = (
            heads(&x[0], split),
            heads(&x[1], split),
            heads(&x[2], split),
        );
        ok(q.attention(&k, &v, true, 0.45))
    }));
    assert!(pass.packed && !pass.positions_read);
    backward(&ok(engine::get(y.id())), inputs)
}

/// Each example attended alone, the results put back in place.
fn alone(split: bool, inputs: &[&Var]) -> Run {
    engine::install();
    let x: Vec<Tensor> = inputs
        .iter()
        .map(|v| Tensor::from_id(engine::insert(v.as_tensor().clone())))
        .collect();
    let (q, k, v) = (
        heads(&x[0], split),
        heads(&x[1], split),
        heads(&x[2], split),
    );
    let mut rows = Vec::new();
    for r in 0..B {
        let mut parts = Vec::new();
        for (_, first, len) in segments().into_iter().filter(|s| s.0 == r) {
            let cut = |t: &Tensor| ok(ok(t.narrow(0, r, 1)).narrow(2, first, len));
            parts.push(ok(cut(&q).attention(&cut(&k), &cut(&v), true, 0.45)));
        }
        rows.push(ok(Tensor::cat(&parts.iter().collect::<Vec<_>>(), 2)));
    }
    let y = ok(Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0));
    backward(&ok(engine::get(y.id())), inputs)
}

#[test]
fn attention_over_packed_rows_equals_each_example_alone() {
    for split in [false, true] {
        let shape: &[usize] = match split {
            true => &[B * T, H * D],
            false => &[B, H, T, D],
        };
        for dtype in [CD::F32, CD::BF16] {
            let (q, k, v) = (
                input(shape, 1, dtype),
                input(shape, 2, dtype),
                input(shape, 3, dtype),
            );
            let inputs = [&q, &k, &v];
            let want = alone(split, &inputs);
            let tol = match dtype {
                CD::BF16 => 3e-2,
                _ => 2e-5,
            };
            for kernel in [false, true] {
                let what = format!("split {split}, {dtype:?}, kernel {kernel}");
                let got = packed(kernel, split, &inputs);
                assert_close(&format!("{what}: values"), &got.y, &want.y, tol);
                for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
                    assert_close(&format!("{what}: gradient of input {i}"), g, w, tol);
                }
            }
        }
    }
}

#[test]
fn packed_rows_carry_their_positions_and_refuse_what_does_not_fit() {
    engine::install();
    let ids = Tensor::from_id(ok(engine::upload_packed(
        vec![0; B * T],
        POSITIONS.to_vec(),
        &[B, T],
        &Device::Cpu,
    )));
    let got = ok(ids.packed_positions()).expect("positions");
    assert_eq!(ok(got.to_vec_u32()), POSITIONS);
    // A retained handle is the same input.
    let again = Tensor::retain(ids.id());
    assert!(ok(again.packed_positions()).is_some());
    let plain = Tensor::from_id(ok(engine::upload_ids(vec![0; 4], &[2, 2], &Device::Cpu)));
    assert!(ok(plain.packed_positions()).is_none());

    // The mask of a composed attention: query i at position p sees keys i − p ..= i.
    let positions = ok(Positions::of(&ids, 0, T));
    let mask = ok(ok(positions.causal_mask(&ids)).to_vec_u32());
    for (r, first, len) in segments() {
        for i in first..first + len {
            for j in 0..T {
                let hidden = mask[(r * T + i) * T + j] != 0;
                assert_eq!(hidden, j < first || j > i, "row {r}, query {i}, key {j}");
            }
        }
    }
    let (_, pass) = ok(engine::forward_pass(ids.id(), || ()));
    assert!(pass.packed && !pass.positions_read);
    let (_, pass) = ok(engine::forward_pass(ids.id(), || ids.packed_positions()));
    assert!(pass.positions_read);

    // Positions must start each row at 0 and count up within an example.
    for bad in [[1u32, 2, 3], [0, 2, 3], [0, 1, 1]] {
        let err = engine::upload_packed(vec![0; 3], bad.to_vec(), &[1, 3], &Device::Cpu)
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains("neither starts an example (0) nor follows"),
            "{err}"
        );
    }
    // Causal attention of another length than the packed rows' is refused, not left unmasked.
    let q = Tensor::from_id(engine::insert(
        CT::zeros((B, H, 3, D), CD::F32, &Device::Cpu).expect("q"),
    ));
    let (out, _) = ok(engine::forward_pass(ids.id(), || {
        q.attention(&q, &q, true, 1.0)
    }));
    let err = out.expect_err("refused");
    assert!(err.to_string().contains("over packed rows [2, 7]"), "{err}");
}

// ---- runs ----

/// A copy of the GPT-2 fixture without dropout (whose masks would differ between a packed
/// and an unpacked batch), in `dir`.
fn gpt2_without_dropout(dir: &Path) -> PathBuf {
    let src = fixtures().join("hf").join("gpt2");
    let dst = dir.join("gpt2");
    ok(fs::create_dir_all(&dst));
    for entry in ok(fs::read_dir(&src)) {
        let path = ok(entry).path();
        ok(fs::copy(&path, dst.join(path.file_name().expect("name"))));
    }
    let config = dst.join("config.json");
    let mut json: Value = ok(serde_json::from_str(&ok(fs::read_to_string(&config))));
    for key in ["attn_pdrop", "embd_pdrop", "resid_pdrop"] {
        json[key] = json!(0.0);
    }
    ok(fs::write(&config, json.to_string()));
    dst
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    ok(fs::write(path, text.join("\n") + "\n"));
}

/// Prompt/completion pairs of different lengths.
fn pairs() -> Vec<Value> {
    (0..12)
        .map(|i| {
            json!({
                "prompt": format!("# case {i}\n{}", "x = 1\n".repeat(i % 4)),
                "completion": format!("def f{i}(x):\n    return x * {i}\n"),
            })
        })
        .collect()
}

/// Conversations of different lengths.
fn chats() -> Vec<Value> {
    (0..10)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("Return {i}.{}", " Please.".repeat(i % 3))},
                {"role": "assistant", "content": format!("def f():\n    return {i}")},
            ]})
        })
        .collect()
}

/// A config in `dir` training `model` (`model: ...` RON) on `data` (a source) for 2 steps,
/// every step over all the training examples (batch 16), with a validation split.
fn write_config(dir: &Path, model: &str, data: &str, seq_len: usize) -> PathBuf {
    let text = format!(
        r#"(
    experiment: "packing",
    seed: 3,
    data: (train: [{data}], val_fraction: 0.25),
    {model},
    optimizer: (name: "adamw", lr: 3e-3),
    train: (max_steps: 2, seq_len: {seq_len}, batch_size: 16, eval_every: 2, checkpoint_every: 2, log_every: 1),
)"#
    );
    let path = dir.join("packing.ron");
    ok(fs::write(&path, text));
    path
}

/// The losses a run logged: (step, split, value).
fn losses(run: &Path) -> Vec<(u64, String, f64)> {
    ok(fs::read_to_string(run.join("metrics.ndjson")))
        .lines()
        .map(|l| ok(serde_json::from_str::<Value>(l)))
        .filter(|r| r["name"] == "loss")
        .map(|r| {
            (
                r["step"].as_u64().expect("step"),
                r["split"].as_str().expect("split").to_string(),
                r["value"].as_f64().expect("value"),
            )
        })
        .collect()
}

fn assert_same_losses(what: &str, packed: &[(u64, String, f64)], alone: &[(u64, String, f64)]) {
    assert_eq!(packed.len(), alone.len(), "{what}: {packed:?} vs {alone:?}");
    assert_eq!(packed.len(), 3, "{what}: two steps and a validation");
    for (p, a) in packed.iter().zip(alone) {
        assert_eq!((p.0, &p.1), (a.0, &a.1), "{what}");
        let rel = (p.2 - a.2).abs() / a.2.abs();
        assert!(
            rel < 1e-5,
            "{what}: step {} {} loss {} vs {}",
            p.0,
            p.1,
            p.2,
            a.2
        );
    }
}

/// Run `config` in `dir` with packing on and off (and `sets`); the two runs' losses.
fn packed_and_alone(
    dir: &Path,
    name: &str,
    config: &Path,
    extra: &[&str],
) -> (Vec<(u64, String, f64)>, Vec<(u64, String, f64)>) {
    let mut out = Vec::new();
    for packing in [true, false] {
        let run = dir.join(format!("{name}-packing-{packing}"));
        let result = crate::cli::codex_ml()
            .current_dir(dir)
            .arg("run")
            .arg(config)
            .args(["--run-dir".as_ref(), run.as_os_str()])
            .args(["--set", &format!("data.sft.packing={packing}"), "-q"])
            .args(extra)
            .output()
            .expect("codex-ml runs");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{stderr}");
        if packing {
            let log = ok(fs::read_to_string(run.join("log.txt")));
            assert!(log.contains("training examples packed into"), "{log}");
        }
        out.push(losses(&run));
    }
    let alone = out.pop().expect("alone");
    let packed = out.pop().expect("packed");
    (packed, alone)
}

#[test]
fn packed_runs_log_the_losses_of_unpacked_ones() {
    let tmp = ok(tempfile::tempdir());
    let dir = tmp.path();
    write_lines(&dir.join("pairs.jsonl"), &pairs());
    write_lines(&dir.join("chat.jsonl"), &chats());
    let gpt2 = gpt2_without_dropout(dir);
    let chatml = fixtures().join("sft").join("chatml");
    let cases = [
        // Learned positions (GPT-2) and rotary ones with grouped-query attention (Qwen2).
        (
            "gpt2",
            format!("model: (from: {gpt2:?})"),
            r#"PromptCompletion(path: "pairs.jsonl")"#,
            128,
        ),
        (
            "qwen2",
            format!("model: (from: {chatml:?})"),
            r#"Chat(path: "chat.jsonl")"#,
            256,
        ),
    ];
    for (name, model, data, seq_len) in cases {
        let config = write_config(dir, &model, data, seq_len);
        for kernel in ["cpu", "none"] {
            let set = format!("kernel=\"{kernel}\"");
            let what = format!("{name}-kernel-{kernel}");
            let (packed, alone) = packed_and_alone(dir, &what, &config, &["--set", &set]);
            assert_same_losses(&what, &packed, &alone);
        }
    }
}

#[test]
fn a_packed_run_stopped_halfway_resumes_bitwise() {
    let tmp = ok(tempfile::tempdir());
    let dir = tmp.path();
    write_lines(&dir.join("chat.jsonl"), &chats());
    let chatml = fixtures().join("sft").join("chatml");
    let config = write_config(
        dir,
        &format!("model: (from: {chatml:?})"),
        r#"Chat(path: "chat.jsonl")"#,
        96,
    );
    let run = |args: &[&str]| {
        crate::cli::codex_ml()
            .current_dir(dir)
            .arg("run")
            .arg(&config)
            .args([
                "--set",
                "data.sft.packing=true",
                "--set",
                "train.batch_size=2",
                "--set",
                "train.checkpoint_every=3",
                "--set",
                "train.eval_every=3",
                "-q",
            ])
            .args(args)
            .assert()
            .success();
    };
    run(&["--run-dir", "straight", "--set", "train.max_steps=6"]);
    run(&["--run-dir", "halves", "--set", "train.max_steps=3"]);
    run(&[
        "--run-dir",
        "halves",
        "--resume",
        "latest",
        "--set",
        "train.max_steps=6",
    ]);
    let weights = |run: &str| {
        ok(fs::read(
            dir.join(run)
                .join("checkpoints/step-00000006/model.safetensors"),
        ))
    };
    assert!(
        weights("straight") == weights("halves"),
        "resumed weights differ"
    );
}

#[test]
fn plugin_models_pack_when_they_read_positions_and_are_refused_when_not() {
    use crate::native::{entry, plugin, write_manifest};
    let tmp = ok(tempfile::tempdir());
    let dir = tmp.path();
    write_lines(&dir.join("pairs.jsonl"), &pairs());
    let llama = plugin(dir, "native-llama");
    let faulty = plugin(dir, "fixture-faulty");
    let manifest = write_manifest(dir, &[entry("llama", &llama), entry("faulty", &faulty)]);
    let tokenizer = fixtures().join("sft").join("chatml").join("tokenizer.json");
    let tokenizer = format!(
        r#"tokenizer: (name: "hf", params: (path: {tokenizer:?}, eot_token: "<|im_end|>"))"#
    );
    let data = r#"PromptCompletion(path: "pairs.jsonl")"#;

    // The example plugin reads packed positions through codex-nn and masks with them.
    let model = format!(
        r#"model: (name: "llama/llama", params: (hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 128)), {tokenizer}"#
    );
    let config = write_config(dir, &model, data, 128);
    let manifest_arg = manifest.to_string_lossy().into_owned();
    let (packed, alone) =
        packed_and_alone(dir, "native-llama", &config, &["--manifest", &manifest_arg]);
    assert_same_losses("native-llama", &packed, &alone);

    // A model blind to packed positions is refused before it trains, naming what to do.
    let model = format!(
        r#"model: (name: "faulty/positionless", params: (dim: 16, max_positions: 128)), {tokenizer}"#
    );
    let config = write_config(dir, &model, data, 128);
    let run = dir.join("refused");
    let out = crate::cli::codex_ml()
        .current_dir(dir)
        .arg("run")
        .arg(&config)
        .args([
            "--manifest",
            &manifest_arg,
            "--set",
            "data.sft.packing=true",
        ])
        .args(["--run-dir".as_ref(), run.as_os_str()])
        .output()
        .expect("codex-ml runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("model `faulty/positionless` does not read the positions of packed rows"),
        "{stderr}"
    );
    assert!(stderr.contains("data.sft.packing: false"), "{stderr}");
    assert!(
        !run.join("checkpoints").exists()
            || ok(fs::read_dir(run.join("checkpoints"))).next().is_none()
    );
    // Unpacked, the same model trains.
    crate::cli::codex_ml()
        .current_dir(dir)
        .arg("run")
        .arg(&config)
        .args(["--manifest", &manifest_arg, "-q", "--run-dir", "unpacked"])
        .assert()
        .success();
}
