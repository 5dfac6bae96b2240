//! The built-in tokenizers, created through their registered factories exactly as the host
//! creates them: round trips on non-ASCII code, bpe determinism and its reload with `hf`,
//! options, and the errors a user meets.

use std::path::{Path, PathBuf};

use codex_plugin_api::abi_stable::std_types::{RSlice, RStr, RString};
use codex_plugin_api::tokenizer::{TokenizerBox, TokenizerEnv};
use codex_plugin_api::Factory;
// Links the host, and with it every built-in component crate it names.
use codex_host as _;

/// Texts every tokenizer must reproduce exactly.
const SNIPPETS: &[&str] = &[
    "",
    "fn main() {\n    println!(\"naïve — 日本語 🚀\");\n}\n",
    "def naïve(x):\n\treturn f\"{x} — 日本語 🚀\"  # comment\r\n",
    "  leading spaces, trailing spaces  ",
    "a document that spells <|endoftext|> and <|pad|> as plain text",
    "émojis 👩‍💻🦀 and combining e\u{301}",
];

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Create the built-in tokenizer `name` through its registered factory.
pub(crate) fn tokenizer(
    name: &str,
    params: &str,
    base_dir: &Path,
    corpus: &[&str],
) -> Result<TokenizerBox, String> {
    build(name, params, base_dir, corpus, None)
}

/// Restore the built-in tokenizer `name` from the form a run saved, as `eval` does.
fn restored(name: &str, params: &str, saved: &str) -> Result<TokenizerBox, String> {
    build(name, params, Path::new(""), &[], Some(saved))
}

fn build(
    name: &str,
    params: &str,
    base_dir: &Path,
    corpus: &[&str],
    saved: Option<&str>,
) -> Result<TokenizerBox, String> {
    let factory = codex_plugin_api::component::builtins()
        .map(|b| (b.declare)())
        .find_map(|d| match d.factory {
            Factory::Tokenizer(f) if d.name.as_str() == name => Some(f),
            _ => None,
        })
        .ok_or_else(|| format!("no built-in tokenizer named {name}"))?;
    let corpus: Vec<RString> = corpus.iter().map(|s| RString::from(*s)).collect();
    let base = base_dir.to_string_lossy();
    factory(
        RStr::from(params),
        TokenizerEnv {
            base_dir: RStr::from(base.as_ref()),
            corpus: RSlice::from_slice(&corpus),
            saved: saved.map(RStr::from).into(),
        },
    )
    .into_result()
    .map_err(|e| e.message.into_string())
}

pub(crate) fn encode(t: &TokenizerBox, text: &str) -> Vec<u32> {
    match t.encode(RStr::from(text)).into_result() {
        Ok(ids) => ids.into_vec(),
        Err(e) => panic!("encode {text:?}: {e}"),
    }
}

fn decode(t: &TokenizerBox, ids: &[u32]) -> Result<String, String> {
    t.decode(RSlice::from_slice(ids))
        .into_result()
        .map(RString::into_string)
        .map_err(|e| e.message.into_string())
}

fn to_json(t: &TokenizerBox) -> Option<String> {
    match t.to_json().into_result() {
        Ok(j) => j.into_option().map(RString::into_string),
        Err(e) => panic!("to_json: {e}"),
    }
}

/// The fixture code files, as a training corpus.
pub(crate) fn code_corpus() -> Vec<String> {
    let dir = fixtures().join("data/code");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

fn trained_bpe(vocab_size: usize) -> TokenizerBox {
    let corpus = code_corpus();
    let corpus: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let params = format!(r#"{{"vocab_size": {vocab_size}}}"#);
    tokenizer("bpe", &params, Path::new(""), &corpus).unwrap_or_else(|e| panic!("{e}"))
}

/// Save `bpe`'s json and reload it with `hf`.
fn reloaded(bpe: &TokenizerBox, dir: &Path) -> TokenizerBox {
    let json = to_json(bpe).unwrap_or_else(|| panic!("bpe has no json"));
    std::fs::write(dir.join("tokenizer.json"), &json).unwrap_or_else(|e| panic!("{e}"));
    tokenizer("hf", r#"{"path": "tokenizer.json"}"#, dir, &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn check_round_trips(label: &str, t: &TokenizerBox) {
    for text in SNIPPETS {
        let ids = encode(t, text);
        assert!(
            !ids.contains(&t.eot_id()),
            "{label}: {text:?} encoded to the eot id"
        );
        assert_eq!(
            decode(t, &ids).as_deref(),
            Ok(*text),
            "{label}: round trip of {text:?}"
        );
    }
}

#[test]
fn every_tokenizer_round_trips_non_ascii_code() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bpe = trained_bpe(320);
    let hf = reloaded(&bpe, dir.path());
    let bytes = tokenizer("bytes", "", Path::new(""), &[]).unwrap_or_else(|e| panic!("{e}"));
    for (label, t) in [("bytes", &bytes), ("bpe", &bpe), ("hf", &hf)] {
        check_round_trips(label, t);
    }
}

#[test]
fn bpe_training_is_deterministic_and_learns_merges() {
    let a = trained_bpe(300);
    let b = trained_bpe(300);
    assert_eq!(to_json(&a), to_json(&b));
    assert_eq!(a.vocab_size(), 300);
    let text = "fn greet(name: &str) -> String {";
    assert!(
        encode(&a, text).len() < text.len(),
        "merges shorten the encoding of text from the corpus"
    );
    assert_eq!(a.eot_id(), 0, "<|endoftext|> is the first special token");
    assert_eq!(a.pad_id().into_option(), Some(1));
}

#[test]
fn bpe_json_reloaded_with_hf_gives_identical_ids() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bpe = trained_bpe(320);
    let hf = reloaded(&bpe, dir.path());
    for text in SNIPPETS
        .iter()
        .copied()
        .chain(code_corpus().iter().map(String::as_str))
    {
        assert_eq!(encode(&bpe, text), encode(&hf, text), "ids of {text:?}");
    }
    assert_eq!(bpe.eot_id(), hf.eot_id());
    assert_eq!(
        bpe.pad_id(),
        hf.pad_id(),
        "the pad token travels in tokenizer.json"
    );
    assert_eq!(bpe.vocab_size(), hf.vocab_size());
    assert_eq!(
        to_json(&bpe),
        to_json(&hf),
        "a reloaded tokenizer serialises identically"
    );
}

/// `eval` and `generate` rebuild a run's tokenizer by its own name and parameters, restored
/// from the form it saved: the same ids, specials and serialisation as the one trained.
#[test]
fn a_trained_bpe_restores_from_its_saved_form() {
    let bpe = trained_bpe(320);
    let saved = to_json(&bpe).unwrap_or_else(|| panic!("bpe has no json"));
    let again = restored("bpe", r#"{"vocab_size": 320}"#, &saved).unwrap_or_else(|e| panic!("{e}"));
    for text in SNIPPETS
        .iter()
        .copied()
        .chain(code_corpus().iter().map(String::as_str))
    {
        assert_eq!(encode(&bpe, text), encode(&again, text), "ids of {text:?}");
    }
    assert_eq!(
        (bpe.eot_id(), bpe.pad_id(), bpe.vocab_size()),
        (again.eot_id(), again.pad_id(), again.vocab_size())
    );
    assert_eq!(to_json(&again).as_deref(), Some(saved.as_str()));
    let bytes = restored("bytes", "", "ignored").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        encode(&bytes, "ab"),
        [97, 98],
        "a tokenizer that learns nothing is rebuilt"
    );
    let e = restored("bpe", r#"{"vocab_size": 320}"#, "{not json")
        .err()
        .unwrap_or_default();
    assert!(
        e.contains("saved with the run") && e.contains("not a valid tokenizer.json"),
        "{e}"
    );
}

#[test]
fn bytes_ids_specials_and_lossy_decode() {
    let t = tokenizer("bytes", "{}", Path::new(""), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(encode(&t, "aé"), vec![0x61, 0xc3, 0xa9]);
    assert_eq!(
        (t.vocab_size(), t.eot_id(), t.pad_id().into_option()),
        (258, 256, Some(257))
    );
    assert_eq!(to_json(&t), None);
    let cases: &[(&[u32], Result<&str, &str>)] = &[
        (&[0x61, 256, 0x62, 257], Ok("ab")),
        (&[0xff, 0x41], Ok("\u{FFFD}A")),
        (&[0xe6, 0x97], Ok("\u{FFFD}")),
        (&[258], Err("id 258 is outside the bytes vocabulary")),
    ];
    for (ids, expected) in cases {
        match (decode(&t, ids), expected) {
            (Ok(text), Ok(want)) => assert_eq!(&text, want, "decode {ids:?}"),
            (Err(e), Err(want)) => assert!(e.contains(want), "decode {ids:?}: {e}"),
            (got, want) => panic!("decode {ids:?}: got {got:?}, expected {want:?}"),
        }
    }
}

#[test]
fn hf_options_on_a_wordlevel_file() {
    let base = fixtures().join("tokenizers");
    let make = |params: &str| {
        tokenizer("hf", params, &base, &[]).unwrap_or_else(|e| panic!("{params}: {e}"))
    };

    let plain = make(r#"{"path": "wordlevel.json", "eot_token": "</s>"}"#);
    assert_eq!((plain.eot_id(), plain.pad_id().into_option()), (2, None));
    assert_eq!(
        encode(&plain, "fn main () { return x }"),
        vec![4, 5, 10, 8, 11, 12, 9]
    );
    assert_eq!(
        encode(&plain, "fn </s> x"),
        vec![4, 0, 0, 0, 12],
        "special text is not the eot id"
    );
    assert_eq!(
        decode(&plain, &[1, 4, 5, 2]).as_deref(),
        Ok("fn main"),
        "specials are skipped"
    );
    assert!(decode(&plain, &[99]).is_err_and(|e| e.contains("id 99 is not in the vocabulary")));

    let padded = make(r#"{"path": "wordlevel.json", "eot_token": "</s>", "pad_token": "<pad>"}"#);
    assert_eq!(padded.pad_id().into_option(), Some(3));
    let json = to_json(&padded).unwrap_or_default();
    assert!(
        json.contains(r#""pad_token": "<pad>""#),
        "padding token saved: {json}"
    );

    // transformers' default: special-token text is the special token.
    let markup =
        make(r#"{"path": "wordlevel.json", "eot_token": "</s>", "split_special_tokens": false}"#);
    assert_eq!(encode(&markup, "fn </s> x"), vec![4, 2, 12]);

    // tokenizer_config.json's add_bos_token / add_eos_token, as transformers applies them.
    let bos = make(
        r#"{"path": "wordlevel.json", "eot_token": "</s>", "bos_token": "<s>",
            "add_bos_token": true}"#,
    );
    assert_eq!(encode(&bos, "fn main"), vec![1, 4, 5]);
    let both = make(
        r#"{"path": "wordlevel.json", "eot_token": "</s>", "bos_token": "<s>",
            "add_bos_token": true, "add_eos_token": true}"#,
    );
    assert_eq!(encode(&both, "fn main"), vec![1, 4, 5, 2]);
    let json = to_json(&both).unwrap_or_default();
    assert!(
        json.contains("TemplateProcessing"),
        "template saved: {json}"
    );
    let off = make(r#"{"path": "wordlevel.json", "eot_token": "</s>", "add_bos_token": false}"#);
    assert_eq!(encode(&off, "fn main"), vec![4, 5]);

    let added = make(r#"{"path": "wordlevel.json", "add_special_tokens": ["<|endoftext|>"]}"#);
    assert_eq!(added.eot_id(), 13, "an added token takes the next id");
    assert_eq!(added.vocab_size(), 14);
}

/// `tokenizer(name, params)` must fail with a message containing every `expected` part.
fn check_error(name: &str, params: &str, base_dir: &Path, corpus: &[&str], expected: &[&str]) {
    match tokenizer(name, params, base_dir, corpus) {
        Ok(_) => panic!("{name} {params}: expected an error"),
        Err(e) => {
            for part in expected {
                assert!(e.contains(part), "{name} {params}: {e:?} lacks {part:?}");
            }
        }
    }
}

#[test]
fn creation_errors_say_what_and_where() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("broken.json"), "{\"model\": ")
        .unwrap_or_else(|e| panic!("{e}"));
    let words = fixtures().join("tokenizers");
    let tmp = dir.path();
    let corpus = ["fn main() {}"];
    let cases: &[(&str, &str, &Path, &[&str], &[&str])] = &[
        (
            "hf",
            r#"{"path": "absent.json"}"#,
            tmp,
            &[],
            &["absent.json", "not found", "set `path`"],
        ),
        (
            "hf",
            r#"{"path": "broken.json"}"#,
            tmp,
            &[],
            &["broken.json", "not a valid tokenizer.json"],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json"}"#,
            &words,
            &[],
            &[
                "eot_token \"<|endoftext|>\" is not in the vocabulary",
                "wordlevel.json",
                "\"</s>\"",
                "add_special_tokens",
            ],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json", "eot_token": "</s>", "pad_token": "[PAD]"}"#,
            &words,
            &[],
            &["pad_token \"[PAD]\""],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json", "eot_token": "</s>", "padding_side": "left"}"#,
            &words,
            &[],
            &["padding_side has no effect", "padded on the right only"],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json", "eot_token": "</s>", "add_bos_token": true}"#,
            &words,
            &[],
            &["add_bos_token needs the token to add", "bos_token"],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json", "eot_token": "</s>", "add_bos_token": true,
                "bos_token": "<bos>"}"#,
            &words,
            &[],
            &["bos_token \"<bos>\" is not in the vocabulary"],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json", "eot": "</s>"}"#,
            &words,
            &[],
            &["tokenizer `hf`", "unknown field `eot`"],
        ),
        (
            "hf",
            r#"{"path": "wordlevel.json", "eot_token": "</s>", "truncation": {"max_length": 9}}"#,
            &words,
            &[],
            &["truncation is not applied", "split into windows"],
        ),
        ("hf", "{}", tmp, &[], &["missing field `path`"]),
        (
            "bpe",
            "{}",
            tmp,
            &corpus,
            &["tokenizer `bpe`", "missing field `vocab_size`"],
        ),
        (
            "bpe",
            r#"{"vocab_size": 100}"#,
            tmp,
            &corpus,
            &["vocab_size 100 is too small", "258"],
        ),
        (
            "bpe",
            r#"{"vocab_size": 300}"#,
            tmp,
            &[],
            &["no training text", "hf"],
        ),
        (
            "bpe",
            r#"{"vocab_size": 300}"#,
            tmp,
            &["", ""],
            &["2 documents, all empty"],
        ),
        (
            "bytes",
            r#"{"size": 3}"#,
            tmp,
            &[],
            &["tokenizer `bytes`", "unknown field `size`"],
        ),
    ];
    for (name, params, base, corpus, expected) in cases {
        check_error(name, params, base, corpus, expected);
    }
}
