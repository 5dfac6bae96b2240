//! Supervised fine-tuning data: chat templates rendered as transformers renders them (the
//! fixtures in tests/fixtures/sft/, made by tests/interop/make_sft_fixtures.py), the tokens
//! that carry the loss, batches padded per batch in a resumable order, and the errors on bad
//! examples and settings.

use std::fs;
use std::path::{Path, PathBuf};

use codex_host::data::chat::ChatTemplate;
use codex_host::data::{
    self, BatchShape, DataConfig, DataCursor, DataError, Document, Overlong, Preprocess,
    ReadSettings, Sft, SftEncoder, Source, TokenCache, TokenizerFingerprint, TrainBatches,
    Undecodable, ValBatches, IGNORE_INDEX,
};
use codex_plugin_api::tokenizer::TokenizerBox;
use serde_json::{json, Value};

use crate::tokenizers::{fixtures, tokenizer};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn dir() -> PathBuf {
    fixtures().join("sft")
}

fn expected() -> Value {
    ok(serde_json::from_str(&ok(fs::read_to_string(
        dir().join("expected.json"),
    ))))
}

fn chat_tokenizer() -> TokenizerBox {
    let path = dir().join("chatml").join("tokenizer.json");
    let params = json!({"path": path, "eot_token": "<|im_end|>"}).to_string();
    ok(tokenizer("hf", &params, Path::new(""), &[]))
}

fn config(train: Vec<Source>, sft: Sft) -> DataConfig {
    DataConfig {
        train,
        val: Vec::new(),
        val_fraction: 0.0,
        cache_dir: None,
        gitignore: true,
        undecodable: Undecodable::Skip,
        preprocess: Preprocess::default(),
        sft,
    }
}

fn chat_source() -> Source {
    Source::Chat {
        path: "train.jsonl".into(),
        field: "messages".into(),
    }
}

fn pc_source() -> Source {
    Source::PromptCompletion {
        path: "train.jsonl".into(),
        prompt: "prompt".into(),
        completion: "completion".into(),
    }
}

/// The encoder of `sources` with the fixture's tokenizer (its directory holds the ChatML
/// template).
fn encoder(sources: Vec<Source>, sft: Sft) -> Result<SftEncoder, DataError> {
    let tok = chat_tokenizer();
    SftEncoder::new(&config(sources, sft), &tok, Some(&dir().join("chatml")))
}

fn doc(value: Value) -> Document {
    Document {
        origin: "train.jsonl:1".into(),
        text: value.to_string(),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Index of the first token that carries the loss.
fn first_learned(learn: &[bool]) -> usize {
    learn.iter().position(|&l| l).expect("a learned token")
}

// ---- parity with transformers ----

#[test]
fn chatml_renders_and_masks_as_transformers_does() {
    let e = expected();
    let conversation = &e["conversation"];
    let source = ok(fs::read_to_string(
        dir().join("chatml").join("chat_template.jinja"),
    ));
    let template = ok(ChatTemplate::new(
        &source,
        "chatml".into(),
        Default::default(),
    ));
    assert!(template.marks_generation());
    let whole = ok(template.render(conversation, false));
    assert_eq!(whole.text, e["chatml"]["text"].as_str().expect("text"));
    let turns = conversation.as_array().expect("list");
    let prompt = Value::Array(turns[..turns.len() - 1].to_vec());
    assert_eq!(
        ok(template.render(&prompt, true)).text,
        e["chatml"]["prompt_text"].as_str().expect("prompt text")
    );

    let enc = ok(encoder(vec![chat_source()], Sft::default()));
    let example = ok(enc.encode(&doc(json!({"messages": conversation}))));
    assert_eq!(example.ids, ids(&e["chatml"]["ids"]));
    let mask: Vec<bool> = ids(&e["chatml"]["assistant_masks"])
        .iter()
        .map(|&m| m == 1)
        .collect();
    assert_eq!(
        example.learn, mask,
        "the assistant tokens are transformers'"
    );
    let prompt_ids = ok(enc.text_ids(e["chatml"]["prompt_text"].as_str().expect("t"), false));
    assert_eq!(prompt_ids, ids(&e["chatml"]["prompt_ids"]));

    // Every token counts with assistant_only_loss off.
    let all = Sft {
        assistant_only_loss: false,
        ..Sft::default()
    };
    let enc = ok(encoder(vec![chat_source()], all));
    let example = ok(enc.encode(&doc(json!({"messages": conversation}))));
    assert!(example.learn.iter().all(|&l| l));
}

#[test]
fn a_llama3_template_renders_as_transformers_does() {
    let e = expected();
    let template = dir().join("llama3.jinja");
    let sft = Sft {
        chat_template: Some(template.to_string_lossy().into_owned()),
        assistant_only_loss: false,
        ..Sft::default()
    };
    let enc = ok(encoder(vec![chat_source()], sft));
    let t = enc.template().expect("a template");
    assert!(!t.marks_generation());
    // bos_token comes from the tokenizer's tokenizer_config.json.
    let conversation = &e["conversation"];
    let whole = ok(t.render(conversation, false));
    assert_eq!(whole.text, e["llama3"]["text"].as_str().expect("text"));
    let turns = conversation.as_array().expect("list");
    let prompt = ok(t.render(&Value::Array(turns[..turns.len() - 1].to_vec()), true));
    assert_eq!(
        prompt.text,
        e["llama3"]["prompt_text"].as_str().expect("text")
    );
    assert_eq!(
        ok(enc.text_ids(&whole.text, false)),
        ids(&e["llama3"]["ids"])
    );
    assert_eq!(
        ok(enc.text_ids(&prompt.text, false)),
        ids(&e["llama3"]["prompt_ids"])
    );
    let example = ok(enc.encode(&doc(json!({"messages": conversation}))));
    assert_eq!(example.ids, ids(&e["llama3"]["ids"]));
}

#[test]
fn prompt_completion_pairs_are_tokenized_as_trl_does() {
    let e = expected();
    let enc = ok(encoder(vec![pc_source()], Sft::default()));
    for case in ["prompt_completion", "conversational_prompt_completion"] {
        let c = &e[case];
        let example = ok(enc.encode(&doc(
            json!({"prompt": c["prompt"], "completion": c["completion"]}),
        )));
        assert_eq!(example.ids, ids(&c["ids"]), "{case}");
        let prompt_len = ids(&c["prompt_ids"]).len();
        assert_eq!(first_learned(&example.learn), prompt_len, "{case}");
        assert!(example.learn[prompt_len..].iter().all(|&l| l), "{case}");
    }
    // completion_only_loss off: the prompt counts too.
    let all = Sft {
        completion_only_loss: false,
        ..Sft::default()
    };
    let enc = ok(encoder(vec![pc_source()], all));
    let c = &e["prompt_completion"];
    let example = ok(enc.encode(&doc(
        json!({"prompt": c["prompt"], "completion": c["completion"]}),
    )));
    assert!(example.learn.iter().all(|&l| l));
}

// ---- batches ----

fn write(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    ok(fs::write(&path, text.join("\n") + "\n"));
    path
}

fn pairs(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"prompt": format!("def f{i}(x):\n"), "completion": format!("    return x * {i}\n{}", "#".repeat(i))})
        })
        .collect()
}

#[test]
fn examples_are_rows_padded_per_batch_in_a_resumable_order() {
    let tmp = ok(tempfile::tempdir());
    let path = write(tmp.path(), "train.jsonl", &pairs(7));
    let source = Source::PromptCompletion {
        path: path.to_string_lossy().into_owned(),
        prompt: "prompt".into(),
        completion: "completion".into(),
    };
    let cfg = config(vec![source], Sft::default());
    let docs = ok(data::load_documents(&cfg, tmp.path()));
    assert_eq!(docs.train.len(), 7);
    let tok = chat_tokenizer();
    let enc = ok(SftEncoder::new(&cfg, &tok, None));
    let fp = ok(TokenizerFingerprint::of(&tok, "hf", "{}"));
    let cache = TokenCache::new(tmp.path().join("cache"));
    let rows = ok(data::sft_rows(
        "train",
        &docs.train,
        &enc,
        &fp,
        &cache,
        64,
        Overlong::Truncate,
    ));
    assert_eq!(rows.report.truncated, 0);
    let shape = BatchShape {
        batch_size: 3,
        seq_len: 64,
    };
    let pad = data::pad_id(&tok);
    let mut train = ok(TrainBatches::examples(
        rows.tokens,
        rows.rows.clone(),
        shape,
        5,
        pad,
        false,
    ));
    assert_eq!(train.windows(), 7);
    assert_eq!(train.batches_per_epoch(), 3);

    // Every example once per epoch; each row holds one example's tokens, prompt targets
    // ignored, padding to the batch's longest row.
    let mut seen_targets = 0;
    let mut batches = Vec::new();
    for _ in 0..3 {
        let b = train.next_batch();
        assert!(b.seq_len < 64, "padded to the longest row, not to seq_len");
        let counted = b.targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as u64;
        assert_eq!(counted, b.tokens);
        for r in 0..b.rows {
            let row = &b.targets[r * b.seq_len..(r + 1) * b.seq_len];
            let first = row
                .iter()
                .position(|&t| t != IGNORE_INDEX)
                .expect("targets");
            assert!(first > 0, "the prompt carries no loss");
        }
        seen_targets += b.tokens;
        batches.push(b);
    }
    assert_eq!(seen_targets, train.tokens_per_epoch());
    assert_eq!(
        train.cursor(),
        DataCursor {
            epoch: 0,
            position: 7
        }
    );

    // Resuming from a cursor gives the same batches.
    let cache_again = ok(data::sft_rows(
        "train",
        &docs.train,
        &enc,
        &fp,
        &cache,
        64,
        Overlong::Truncate,
    ));
    let mut resumed = ok(TrainBatches::examples(
        cache_again.tokens,
        cache_again.rows,
        shape,
        5,
        pad,
        false,
    ));
    ok(resumed.seek(DataCursor {
        epoch: 0,
        position: 3,
    }));
    assert_eq!(resumed.next_batch(), batches[1]);
    let next = train.next_batch();
    assert_eq!(next.epoch, 1);
    ok(resumed.seek(DataCursor {
        epoch: 1,
        position: 0,
    }));
    assert_eq!(resumed.next_batch(), next);

    // Validation counts the same tokens, in order.
    let val = ok(ValBatches::examples(
        ok(data::sft_rows(
            "val",
            &docs.train,
            &enc,
            &fp,
            &cache,
            64,
            Overlong::Truncate,
        ))
        .tokens,
        rows.rows,
        shape,
        pad,
        false,
    ));
    let total: u64 = (0..val.len())
        .map(|i| val.batch(i).expect("batch").tokens)
        .sum();
    assert_eq!(total, val.target_tokens());
    assert_eq!(total, train.tokens_per_epoch());
}

#[test]
fn long_examples_are_cut_and_counted_or_refused() {
    let tmp = ok(tempfile::tempdir());
    let path = write(tmp.path(), "train.jsonl", &pairs(6));
    let source = Source::PromptCompletion {
        path: path.to_string_lossy().into_owned(),
        prompt: "prompt".into(),
        completion: "completion".into(),
    };
    let cfg = config(vec![source], Sft::default());
    let docs = ok(data::load_documents(&cfg, tmp.path()));
    let tok = chat_tokenizer();
    let enc = ok(SftEncoder::new(&cfg, &tok, None));
    let fp = ok(TokenizerFingerprint::of(&tok, "hf", "{}"));
    let cache = TokenCache::new(tmp.path().join("cache"));
    let lens: Vec<usize> = docs
        .train
        .iter()
        .map(|d| ok(enc.encode(d)).ids.len())
        .collect();
    let seq_len = lens.iter().min().copied().expect("lens");
    let rows = ok(data::sft_rows(
        "train",
        &docs.train,
        &enc,
        &fp,
        &cache,
        seq_len,
        Overlong::Truncate,
    ));
    let longer = lens.iter().filter(|&&l| l > seq_len + 1).count();
    assert!(longer > 0);
    assert_eq!(rows.report.truncated, longer);
    let lost: usize = lens.iter().map(|&l| l.saturating_sub(seq_len + 1)).sum();
    assert_eq!(rows.report.truncated_tokens, lost as u64);
    assert!(rows.rows.iter().all(|&(_, len)| len <= seq_len + 1));

    let err = data::sft_rows(
        "train",
        &docs.train,
        &enc,
        &fp,
        &cache,
        seq_len,
        Overlong::Error,
    )
    .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("train.jsonl:"), "{text}");
    assert!(text.contains("data.sft.overlong"), "{text}");
    assert!(err.is_input());
}

// ---- bad input ----

fn read_err(source: Source) -> String {
    let err = data::read_sources(&[source], Path::new("/"), &ReadSettings::default())
        .expect_err("refused");
    assert!(err.is_input(), "{err}");
    err.to_string()
}

#[test]
fn bad_records_name_their_file_line_and_field() {
    let tmp = ok(tempfile::tempdir());
    let path = tmp.path().join("d.jsonl");
    let chat = |p: &Path| Source::Chat {
        path: p.to_string_lossy().into_owned(),
        field: "messages".into(),
    };
    let pc = |p: &Path| Source::PromptCompletion {
        path: p.to_string_lossy().into_owned(),
        prompt: "prompt".into(),
        completion: "completion".into(),
    };
    let good = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let cases: &[(&str, bool, &str)] = &[
        ("not json", true, ":2: invalid JSON"),
        (
            r#"{"text": "x"}"#,
            true,
            ":2: no field `messages`; the record's fields are: text",
        ),
        (
            r#"{"messages": "hi"}"#,
            true,
            ":2: field `messages` is a string, expected a list",
        ),
        (
            r#"{"messages": [{"content": "x"}]}"#,
            true,
            ":2: `messages[0]` has no `role`",
        ),
        (
            r#"{"messages": [{"role": "user"}]}"#,
            true,
            ":2: `messages[0]` has no `content`",
        ),
        (
            r#"{"messages": []}"#,
            true,
            ":2: `messages` is an empty list",
        ),
        (r#"{"prompt": "a"}"#, false, ":2: no field `completion`"),
        (
            r#"{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}"#,
            false,
            ":2: `prompt` is a string and `completion` is an array",
        ),
    ];
    for &(line, is_chat, expected) in cases {
        let first = if is_chat {
            good.clone()
        } else {
            json!({"prompt": "p", "completion": "c"}).to_string()
        };
        ok(fs::write(&path, format!("{first}\n{line}\n")));
        let source = if is_chat { chat(&path) } else { pc(&path) };
        let text = read_err(source);
        assert!(
            text.contains(&format!("d.jsonl{expected}")),
            "{line}: {text}"
        );
    }
}

/// Without generation marks, the assistant's tokens are found by rendering the conversation
/// before and through each assistant message: transformers' mask for the same template with
/// marks, plus the newline ChatML writes after each `<|im_end|>`.
#[test]
fn without_generation_marks_the_assistant_turns_are_found_by_rendering_prefixes() {
    let e = expected();
    let conversation = &e["conversation"];
    let marked = ok(fs::read_to_string(
        dir().join("chatml").join("chat_template.jinja"),
    ));
    let plain: String = marked
        .lines()
        .filter(|l| !l.contains("generation %}"))
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = ok(tempfile::tempdir());
    let path = tmp.path().join("plain.jinja");
    ok(fs::write(&path, plain));
    let sft = Sft {
        chat_template: Some(path.to_string_lossy().into_owned()),
        ..Sft::default()
    };
    let enc = ok(encoder(vec![chat_source()], sft));
    assert!(!enc.template().expect("a template").marks_generation());
    let example = ok(enc.encode(&doc(json!({"messages": conversation}))));
    assert_eq!(example.ids, ids(&e["chatml"]["ids"]), "same text, same ids");
    let marked_mask: Vec<bool> = ids(&e["chatml"]["assistant_masks"])
        .iter()
        .map(|&m| m == 1)
        .collect();
    let mut want = marked_mask.clone();
    for i in 1..want.len() {
        if marked_mask[i - 1] && !marked_mask[i] {
            want[i] = true;
        }
    }
    assert_eq!(example.learn, want);

    // LLaMA 3's template: each assistant message and its <|eot_id|>.
    let sft = Sft {
        chat_template: Some(dir().join("llama3.jinja").to_string_lossy().into_owned()),
        ..Sft::default()
    };
    let enc = ok(encoder(vec![chat_source()], sft));
    let example = ok(enc.encode(&doc(json!({"messages": conversation}))));
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (i, (&id, &learn)) in example.ids.iter().zip(&example.learn).enumerate() {
        if learn {
            if i == 0 || !example.learn[i - 1] {
                runs.push(Vec::new());
            }
            runs.last_mut().expect("a run").push(id);
        }
    }
    let turns: Vec<Vec<u32>> = conversation
        .as_array()
        .expect("list")
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| {
            let text = format!("{}<|eot_id|>", m["content"].as_str().expect("text").trim());
            ok(enc.text_ids(&text, false))
        })
        .collect();
    assert_eq!(runs, turns);

    // A template that rewrites earlier turns as the conversation grows is refused, naming
    // the message.
    let rewriting = tmp.path().join("rewriting.jinja");
    ok(fs::write(
        &rewriting,
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m.content }}\n{% endfor %}",
    ));
    let sft = Sft {
        chat_template: Some(rewriting.to_string_lossy().into_owned()),
        ..Sft::default()
    };
    let enc = ok(encoder(vec![chat_source()], sft));
    let err = enc
        .encode(&doc(json!({"messages": conversation})))
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.starts_with("train.jsonl:1: ") && text.contains("rewrites earlier turns"),
        "{text}"
    );
    assert!(text.contains("message 3"), "{text}");
    assert!(err.is_input());
}

#[test]
fn templates_that_cannot_serve_are_refused_with_what_to_do() {
    // A tokenizer directory without a chat template, for chat data.
    let tok = chat_tokenizer();
    let bare = fixtures().join("hf").join("qwen2");
    let err = SftEncoder::new(
        &config(vec![chat_source()], Sft::default()),
        &tok,
        Some(&bare),
    )
    .expect_err("no template");
    let text = err.to_string();
    assert!(text.starts_with("data.sft.chat_template: "), "{text}");
    assert!(text.contains("has no `chat_template`"), "{text}");

    // Without a template, a conversational prompt/completion names its example.
    let enc = ok(SftEncoder::new(
        &config(vec![pc_source()], Sft::default()),
        &tok,
        Some(&bare),
    ));
    let err = enc
        .encode(&doc(json!({"prompt": [{"role": "user", "content": "a"}],
                            "completion": [{"role": "assistant", "content": "b"}]})))
        .expect_err("no template");
    assert!(err.to_string().starts_with("train.jsonl:1: "), "{err}");

    // A template that refuses a conversation: the example's line and the template's words.
    let enc = ok(encoder(vec![chat_source()], Sft::default()));
    let err = enc
        .encode(&doc(
            json!({"messages": [{"role": "tool", "content": "x"}]}),
        ))
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.starts_with("train.jsonl:1: the chat template cannot render"),
        "{text}"
    );
    assert!(text.contains("unknown role: tool"), "{text}");
    assert!(err.is_input());

    // A template that does not compile.
    let tmp = ok(tempfile::tempdir());
    let broken = tmp.path().join("broken.jinja");
    ok(fs::write(&broken, "{% for m in messages %}"));
    let sft = Sft {
        chat_template: Some(broken.to_string_lossy().into_owned()),
        ..Sft::default()
    };
    let err = encoder(vec![chat_source()], sft).expect_err("broken");
    assert!(err.to_string().contains("does not compile"), "{err}");
}

#[test]
fn the_cache_key_follows_the_template_and_the_loss_settings() {
    let tok = chat_tokenizer();
    let fp = ok(TokenizerFingerprint::of(&tok, "hf", "{}"));
    let docs = vec![doc(json!({"prompt": "a", "completion": "b"}))];
    let key = |sft: Sft| {
        let enc = ok(encoder(vec![pc_source()], sft));
        data::CacheKey::sft(&docs, &fp, &enc.settings_key())
    };
    let base = key(Sft::default());
    assert_eq!(base, key(Sft::default()));
    assert_ne!(
        base,
        key(Sft {
            completion_only_loss: false,
            ..Sft::default()
        })
    );
    assert_ne!(
        base,
        key(Sft {
            chat_template: Some(dir().join("llama3.jinja").to_string_lossy().into_owned()),
            ..Sft::default()
        })
    );
}

// ---- the command line ----

/// A config training the chatml fixture on `data` (written to `train.jsonl`) in `dir`.
fn cli_config(dir: &Path, data: &[Value]) -> PathBuf {
    write(dir, "train.jsonl", data);
    let model = fixtures().join("sft").join("chatml");
    let config = dir.join("sft.ron");
    let text = format!(
        r#"(
    experiment: "sft",
    seed: 3,
    data: (train: [Chat(path: "train.jsonl")], val_fraction: 0.3),
    model: (from: {model:?}),
    optimizer: (name: "adamw", lr: 3e-3),
    train: (max_steps: 4, seq_len: 128, batch_size: 2, eval_every: 4, checkpoint_every: 4, log_every: 2),
)"#
    );
    ok(fs::write(&config, text));
    config
}

fn conversations(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("Return {i}.")},
                {"role": "assistant", "content": format!("def f():\n    return {i}")},
            ]})
        })
        .collect()
}

#[test]
fn a_chat_run_trains_and_evaluates_on_assistant_tokens() {
    let tmp = ok(tempfile::tempdir());
    let config = cli_config(tmp.path(), &conversations(8));
    crate::cli::codex_ml()
        .current_dir(tmp.path())
        .args(["run", "sft.ron"])
        .assert()
        .success();
    let out = crate::cli::codex_ml()
        .current_dir(tmp.path())
        .args(["eval", "latest", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let eval: Value = ok(serde_json::from_slice(&out));
    // The validation examples' assistant tokens: what the template's generation block holds.
    let cfg = config_of(&config);
    let docs = ok(data::load_documents(&cfg, tmp.path()));
    let tok = chat_tokenizer();
    let enc = ok(SftEncoder::new(&cfg, &tok, Some(&dir().join("chatml"))));
    let counted: usize = docs
        .val
        .iter()
        .map(|d| {
            let e = ok(enc.encode(d));
            e.learn.iter().skip(1).filter(|&&l| l).count()
        })
        .sum();
    assert!(counted > 0);
    assert_eq!(eval["tokens"], counted as u64, "{eval}");
    assert!(eval["accuracy"].as_f64().is_some(), "{eval}");
}

/// The data section of the test config, as the run reads it.
fn config_of(config: &Path) -> DataConfig {
    let dir = config.parent().expect("dir");
    let mut cfg = config_of_sources(vec![Source::Chat {
        path: dir.join("train.jsonl").to_string_lossy().into_owned(),
        field: "messages".into(),
    }]);
    cfg.val_fraction = 0.3;
    cfg
}

fn config_of_sources(train: Vec<Source>) -> DataConfig {
    config(train, Sft::default())
}

#[test]
fn bad_sft_input_exits_2_naming_what_to_fix() {
    let tmp = ok(tempfile::tempdir());
    cli_config(tmp.path(), &conversations(4));
    let run = |sets: &[&str]| {
        let mut cmd = crate::cli::codex_ml();
        cmd.current_dir(tmp.path()).args(["run", "sft.ron"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.assert().code(2).get_output().stderr.clone();
        String::from_utf8_lossy(&out).into_owned()
    };
    let text = run(&[
        "data.train=[{\"Text\": (paths: [\"train.jsonl\"])}, {\"Chat\": (path: \"train.jsonl\")}]",
    ]);
    assert!(text.contains("data.train[1]"), "{text}");
    let text = run(&["train.seq_len=8", "data.sft.overlong=error"]);
    assert!(text.contains("train.jsonl:"), "{text}");
    assert!(text.contains("data.sft.overlong: truncate"), "{text}");

    let mut bad = conversations(3);
    bad.push(json!({"messages": [{"role": "tool", "content": "x"}]}));
    write(tmp.path(), "train.jsonl", &bad);
    let text = run(&["data.val_fraction=0"]);
    assert!(
        text.contains("train.jsonl:4: the chat template cannot render"),
        "{text}"
    );
    assert!(text.contains("unknown role: tool"), "{text}");
}

#[test]
fn a_chat_run_stopped_halfway_resumes_bitwise() {
    let tmp = ok(tempfile::tempdir());
    cli_config(tmp.path(), &conversations(9));
    // Batches of 2 over 6 training examples: the halves cross an epoch boundary.
    let common = [
        "--set",
        "train.schedule=(kind: constant, warmup_steps: 2, min_lr: 1e-3)",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.eval_every=5",
        "-q",
    ];
    let run = |args: &[&str]| {
        crate::cli::codex_ml()
            .current_dir(tmp.path())
            .args(["run", "sft.ron"])
            .args(common)
            .args(args)
            .assert()
            .success();
    };
    run(&["--run-dir", "straight", "--set", "train.max_steps=10"]);
    run(&["--run-dir", "halves", "--set", "train.max_steps=5"]);
    run(&[
        "--run-dir",
        "halves",
        "--resume",
        "latest",
        "--set",
        "train.max_steps=10",
    ]);
    let weights = |run: &str| {
        ok(fs::read(
            tmp.path()
                .join(run)
                .join("checkpoints/step-00000010/model.safetensors"),
        ))
    };
    assert!(
        weights("straight") == weights("halves"),
        "the resumed run differs"
    );
}

#[test]
fn resume_and_eval_render_with_the_template_the_run_trained_with() {
    let tmp = ok(tempfile::tempdir());
    // The model and its template in a directory of the test's own, to change afterwards.
    let model = tmp.path().join("chatml");
    ok(fs::create_dir_all(&model));
    for entry in ok(fs::read_dir(dir().join("chatml"))) {
        let path = ok(entry).path();
        ok(fs::copy(&path, model.join(path.file_name().expect("name"))));
    }
    let config = cli_config(tmp.path(), &conversations(8));
    let text = ok(fs::read_to_string(&config)).replace(
        &format!("{:?}", fixtures().join("sft").join("chatml")),
        &format!("{model:?}"),
    );
    ok(fs::write(&config, text));
    crate::cli::codex_ml()
        .current_dir(tmp.path())
        .args(["run", "sft.ron", "--run-dir", "run", "-q"])
        .assert()
        .success();
    let checkpoint = tmp.path().join("run/checkpoints/step-00000004");
    let saved: Value = ok(serde_json::from_str(&ok(fs::read_to_string(
        checkpoint.join("chat_template.json"),
    ))));
    assert_eq!(
        saved["chat_template"].as_str(),
        Some(ok(fs::read_to_string(model.join("chat_template.jinja"))).as_str())
    );
    let recorded = ok(fs::read_to_string(tmp.path().join("run/metrics.ndjson")))
        .lines()
        .map(|l| ok(serde_json::from_str::<Value>(l)))
        .find(|r| r["split"] == "val" && r["name"] == "loss")
        .expect("a validation loss");

    // The tokenizer's directory now has a template that refuses every conversation.
    ok(fs::write(
        model.join("chat_template.jinja"),
        "{{ raise_exception('changed after the run') }}",
    ));
    crate::cli::codex_ml()
        .args(["verify".as_ref(), checkpoint.as_os_str()])
        .assert()
        .success();
    let out = crate::cli::codex_ml()
        .current_dir(tmp.path())
        .args(["eval", "run", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let eval: Value = ok(serde_json::from_slice(&out));
    let (a, b) = (
        eval["loss"].as_f64().expect("loss"),
        recorded["value"].as_f64().expect("value"),
    );
    assert!((a - b).abs() <= 1e-6 * b, "eval {a}, recorded {b}");
    crate::cli::codex_ml()
        .current_dir(tmp.path())
        .args([
            "run",
            "sft.ron",
            "--run-dir",
            "run",
            "--resume",
            "latest",
            "-q",
        ])
        .args(["--set", "train.max_steps=6"])
        .assert()
        .success();
    // A fresh run reads the directory again, and is refused by the new template.
    let out = crate::cli::codex_ml()
        .current_dir(tmp.path())
        .args(["run", "sft.ron", "--run-dir", "fresh"])
        .assert()
        .code(2)
        .get_output()
        .stderr
        .clone();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("changed after the run"), "{text}");
}
