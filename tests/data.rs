//! The data pipeline: reading sources (and their errors), the content-addressed token cache,
//! the content-based validation split, and batches whose order depends only on
//! (seed, epoch).

use std::fs;
use std::path::{Path, PathBuf};

use codex_host::data::{
    self, load_documents, BatchShape, CacheOutcome, DataConfig, DataCursor, DataError, Document,
    Preprocess, ReadSettings, Source, TokenCache, TokenizerFingerprint, Tokens, TrainBatches,
    Undecodable, ValBatches, IGNORE_INDEX,
};
use codex_plugin_api::tokenizer::TokenizerBox;

use crate::tokenizers::{code_corpus, fixtures, tokenizer};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn text(paths: &[&str]) -> Source {
    Source::Text {
        paths: paths.iter().map(|p| p.to_string()).collect(),
        exclude: Vec::new(),
    }
}

fn config(train: Vec<Source>) -> DataConfig {
    DataConfig {
        train,
        val: Vec::new(),
        val_fraction: 0.0,
        cache_dir: None,
        gitignore: true,
        undecodable: Undecodable::Skip,
        preprocess: Preprocess::default(),
        sft: Default::default(),
    }
}

fn bytes_tokenizer() -> TokenizerBox {
    ok(tokenizer("bytes", "", Path::new(""), &[]))
}

// ---- sources ----

#[test]
fn sources_read_one_document_per_file_line_and_row() {
    let base = fixtures().join("data");
    let read = |s: Source| ok(data::read_sources(&[s], &base, &ReadSettings::default())).documents;

    let code = read(text(&["code/*.rs", "code/stats.py", "code/greet.rs"]));
    let names: Vec<&str> = code
        .iter()
        .map(|d| d.origin.rsplit('/').next().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        ["greet.rs", "window.rs", "stats.py"],
        "glob order, duplicates once"
    );
    assert!(code[0].text.contains("こんにちは"));

    let jsonl = read(Source::Jsonl {
        path: "snippets.jsonl".into(),
        field: "text".into(),
    });
    let lines: Vec<&str> = jsonl
        .iter()
        .map(|d| d.origin.rsplit(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        lines,
        ["1", "2", "4"],
        "blank lines skipped, line numbers kept"
    );
    assert_eq!(jsonl[1].text, "let café = \"naïve — 日本語 🚀\";\n");

    let csv = read(Source::Csv {
        path: "snippets.csv".into(),
        column: "code".into(),
    });
    assert_eq!(csv.len(), 3);
    assert_eq!(csv[1].text, "print(\"héllo, wörld\")");
    assert!(
        csv[1].origin.ends_with("snippets.csv:3"),
        "{}",
        csv[1].origin
    );
}

/// A fresh directory, by its canonical path (files are reported by theirs).
fn scratch_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = ok(tempfile::tempdir());
    let path = ok(fs::canonicalize(dir.path()));
    (dir, path)
}

/// Write `files` (`name`, `content`) under `dir`, making directories as needed.
fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    for (name, content) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            ok(fs::create_dir_all(parent));
        }
        ok(fs::write(path, content));
    }
}

/// Write `files` into a fresh directory, read `source` there with `data.undecodable: error`,
/// and expect an error whose message contains every part of `expected` (`{dir}` stands for
/// the directory).
fn check_source_error(files: &[(&str, &[u8])], source: Source, expected: &[&str]) {
    let (_dir, base) = scratch_dir();
    write_files(&base, files);
    let shown = base.display().to_string();
    let settings = ReadSettings {
        undecodable: Undecodable::Error,
        ..ReadSettings::default()
    };
    match data::read_sources(std::slice::from_ref(&source), &base, &settings) {
        Ok(read) => panic!(
            "{source:?}: expected an error, read {} documents",
            read.documents.len()
        ),
        Err(e) => {
            let message = e.to_string();
            for part in expected {
                let part = part.replace("{dir}", &shown);
                assert!(
                    message.contains(&part),
                    "{source:?}: {message:?} lacks {part:?}"
                );
            }
        }
    }
}

#[test]
fn source_errors_name_the_file_and_line() {
    let jsonl = |field: &str| Source::Jsonl {
        path: "d.jsonl".into(),
        field: field.into(),
    };
    let csv = |column: &str| Source::Csv {
        path: "d.csv".into(),
        column: column.into(),
    };
    let cases: Vec<(Vec<(&str, &[u8])>, Source, Vec<&str>)> = vec![
        (
            vec![],
            text(&["absent.rs"]),
            vec!["{dir}/absent.rs: no such file"],
        ),
        (
            vec![("a.rs", b"x")],
            text(&["src/**/*.py"]),
            vec!["{dir}/src/**/*.py: the glob matches no file: check the pattern"],
        ),
        (
            vec![("a.rs", b"x")],
            text(&["src/*.py", "lib/*.py"]),
            vec!["{dir}/src/*.py, {dir}/lib/*.py: no glob matches a file"],
        ),
        (vec![], text(&["[a.rs"]), vec!["{dir}/[a.rs: invalid glob"]),
        (
            vec![("a.rs", b"x")],
            Source::Text {
                paths: vec!["*.rs".into()],
                exclude: vec!["{a,b".into()],
            },
            vec!["{dir}/{a,b: invalid glob"],
        ),
        (
            vec![("latin1.rs", b"caf\xe9")],
            text(&["latin1.rs"]),
            vec![
                "{dir}/latin1.rs: not valid UTF-8: first bad byte at byte 3",
                "set `data.undecodable: skip`",
            ],
        ),
        (
            vec![("src/a.rs", b"x"), ("src/blob.rs", b"ab\0cd")],
            text(&["src/*.rs"]),
            vec!["{dir}/src/blob.rs: binary: a NUL byte at byte 2"],
        ),
        (vec![], jsonl("text"), vec!["{dir}/d.jsonl: no such file"]),
        (
            vec![("d.jsonl", b"{\"text\": \"ok\"}\n\n{\"text\": oops}\n")],
            jsonl("text"),
            vec!["{dir}/d.jsonl:3: invalid JSON"],
        ),
        (
            vec![(
                "d.jsonl",
                b"{\"text\": \"ok\"}\n{\"body\": \"x\", \"id\": 2}\n",
            )],
            jsonl("text"),
            vec!["d.jsonl:2: no field `text`", "fields are: body, id"],
        ),
        (
            vec![("d.jsonl", b"{\"text\": 3}\n")],
            jsonl("text"),
            vec!["d.jsonl:1: field `text` is a number, expected a string"],
        ),
        (
            vec![("d.jsonl", b"[1, 2]\n")],
            jsonl("text"),
            vec!["d.jsonl:1: expected a JSON object, found an array"],
        ),
        (
            vec![("d.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n")],
            jsonl("text"),
            vec!["d.jsonl:2: not valid UTF-8"],
        ),
        (
            vec![("d.csv", b"lang,code\nrust,x\n")],
            csv("text"),
            vec!["d.csv: no column `text`; the columns are: lang, code"],
        ),
        (
            vec![("d.csv", b"lang,code\nrust,x\nc,y,z\n")],
            csv("code"),
            vec!["d.csv:3: 3 fields, but the header has 2"],
        ),
        (
            vec![("d.csv", b"lang,code\nrust,\"caf\xe9\"\n")],
            csv("code"),
            vec!["d.csv:2: not valid UTF-8"],
        ),
    ];
    for (files, source, expected) in cases {
        check_source_error(&files, source, &expected);
    }
}

/// A tree shaped like a repository: a git repository (`.git/`) with `.gitignore`, `.ignore`
/// and `.git/info/exclude` rules, hidden files, an ignored build directory and an excluded
/// test directory.
const REPO: &[(&str, &[u8])] = &[
    (".git/HEAD", b"ref: refs/heads/main\n"),
    (".git/info/exclude", b"local.rs\n"),
    (".gitignore", b"*.log\n/build/\n"),
    (".ignore", b"secret.rs\n"),
    (".github/ci.rs", b"hidden dir"),
    ("src/.hidden.rs", b"hidden file"),
    ("src/a.rs", b"a"),
    ("src/b.rs", b"b"),
    ("src/gen/g.rs", b"g"),
    ("src/notes.log", b"log"),
    ("src/tests/t.rs", b"t"),
    ("build/out.rs", b"out"),
    ("local.rs", b"local"),
    ("secret.rs", b"secret"),
];

/// Read `paths` less `exclude` in a fresh copy of [`REPO`] and expect exactly the files
/// `expected` (relative to it), in that order.
fn check_selection(paths: &[&str], exclude: &[&str], gitignore: bool, expected: &[&str]) {
    let (_dir, base) = scratch_dir();
    write_files(&base, REPO);
    let source = Source::Text {
        paths: paths.iter().map(|p| p.to_string()).collect(),
        exclude: exclude.iter().map(|p| p.to_string()).collect(),
    };
    let settings = ReadSettings {
        gitignore,
        ..ReadSettings::default()
    };
    let read = ok(data::read_sources(&[source], &base, &settings));
    let found: Vec<String> = read
        .documents
        .iter()
        .map(|d| {
            let path = Path::new(&d.origin);
            path.strip_prefix(&base)
                .unwrap_or(path)
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        found, expected,
        "paths {paths:?}, exclude {exclude:?}, gitignore {gitignore}"
    );
    assert_eq!(read.report.text_files, expected.len());
}

#[test]
fn text_sources_skip_ignored_hidden_and_excluded_files() {
    let all_visible = ["local.rs", "secret.rs", "build/out.rs"];
    // (paths, exclude, gitignore, expected files in order)
    let cases: &[(&[&str], &[&str], bool, &[&str])] = &[
        // .gitignore, .ignore and .git/info/exclude rules; hidden entries (.git/ too).
        (
            &["**/*.rs"],
            &[],
            true,
            &["src/a.rs", "src/b.rs", "src/gen/g.rs", "src/tests/t.rs"],
        ),
        (
            &["**/*.rs"],
            &[],
            false,
            &[
                "build/out.rs",
                "local.rs",
                "secret.rs",
                "src/a.rs",
                "src/b.rs",
                "src/gen/g.rs",
                "src/tests/t.rs",
            ],
        ),
        (&["src/*.{rs,log}"], &[], true, &["src/a.rs", "src/b.rs"]),
        (
            &["src/*.{rs,log}"],
            &[],
            false,
            &["src/a.rs", "src/b.rs", "src/notes.log"],
        ),
        // `*` stays within a directory.
        (&["*.rs"], &[], false, &all_visible[..2]),
        // Exclusions: a directory, a glob that names directories, a glob that names files.
        (
            &["src/**/*.rs"],
            &["src/gen"],
            true,
            &["src/a.rs", "src/b.rs", "src/tests/t.rs"],
        ),
        (
            &["**/*.rs"],
            &["**/tests"],
            true,
            &["src/a.rs", "src/b.rs", "src/gen/g.rs"],
        ),
        (&["src/**"], &["**/*.rs"], false, &["src/notes.log"]),
        // A glob whose literal part names a hidden or ignored directory reads it, as ripgrep
        // reads a directory it is given; a glob that names hidden files with a dot finds them.
        (&[".github/*.rs"], &[], true, &[".github/ci.rs"]),
        (&["build/*.rs"], &[], true, &["build/out.rs"]),
        (&["src/.*.rs"], &[], true, &["src/.hidden.rs"]),
        // Plain paths are read whatever ignores them, unless excluded.
        (
            &["secret.rs", "local.rs"],
            &[],
            true,
            &["secret.rs", "local.rs"],
        ),
        (
            &["secret.rs", "local.rs"],
            &["local.rs"],
            true,
            &["secret.rs"],
        ),
        // Entries keep their order, each glob's files sorted; a file named twice is read once.
        (
            &["src/b.rs", "src/*.rs", "src/gen/../a.rs"],
            &[],
            true,
            &["src/b.rs", "src/a.rs"],
        ),
    ];
    for (paths, exclude, gitignore, expected) in cases {
        check_selection(paths, exclude, *gitignore, expected);
    }
}

#[test]
fn gitignore_rules_apply_only_inside_a_git_repository() {
    // Without `.git/`, `.gitignore` is a file like any other (as for git and ripgrep), while
    // `.ignore` still applies.
    let (_dir, base) = scratch_dir();
    let outside: Vec<(&str, &[u8])> = REPO
        .iter()
        .filter(|(name, _)| !name.starts_with(".git/"))
        .copied()
        .collect();
    write_files(&base, &outside);
    let read = ok(data::read_sources(
        &[text(&["*.rs", "build/*.rs", "src/*.log"])],
        &base,
        &ReadSettings::default(),
    ));
    let names: Vec<&str> = read
        .documents
        .iter()
        .map(|d| d.origin.rsplit('/').next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["local.rs", "out.rs", "notes.log"]);
}

#[test]
fn undecodable_files_are_skipped_and_counted_or_refused() {
    let (_dir, base) = scratch_dir();
    // A NUL byte after the first 8000 bytes does not make a file binary (git's test); it is
    // valid UTF-8.
    let late_nul = [vec![b'a'; 8000], vec![0]].concat();
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("good.rs".into(), b"fn main() {}".to_vec()),
        ("blob.bin".into(), b"\x7fELF\x02\x01\0\0".to_vec()),
        ("latin1.txt".into(), b"caf\xe9 cr\xe8me".to_vec()),
        ("late_nul.txt".into(), late_nul),
        ("utf16.txt".into(), b"\xff\xfeh\0i\0".to_vec()),
    ];
    for i in 0..5 {
        files.push((format!("z{i}.bin"), vec![0, 1, 2]));
    }
    for (name, content) in &files {
        ok(fs::write(base.join(name), content));
    }
    let read = ok(data::read_sources(
        &[text(&["*"])],
        &base,
        &ReadSettings::default(),
    ));
    let names: Vec<&str> = read
        .documents
        .iter()
        .map(|d| d.origin.rsplit('/').next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["good.rs", "late_nul.txt"]);
    let report = &read.report;
    assert_eq!((report.text_files, report.undecodable.count), (2, 8));
    let examples: Vec<(String, &str)> = report
        .undecodable
        .examples
        .iter()
        .map(|f| {
            (
                f.path.replace(&base.display().to_string(), "{dir}"),
                f.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        examples,
        [
            ("{dir}/blob.bin".into(), "binary: a NUL byte at byte 6"),
            (
                "{dir}/latin1.txt".into(),
                "not valid UTF-8: first bad byte at byte 3"
            ),
            ("{dir}/utf16.txt".into(), "binary: a NUL byte at byte 3"),
            ("{dir}/z0.bin".into(), "binary: a NUL byte at byte 0"),
            ("{dir}/z1.bin".into(), "binary: a NUL byte at byte 0"),
        ],
        "the first five, in reading order"
    );

    // Nothing left: the error says every file was skipped, and why.
    let mut cfg = config(vec![text(&["*.bin", "latin1.txt"])]);
    match load_documents(&cfg, &base) {
        Ok(_) => panic!("expected an error"),
        Err(e) => assert!(
            e.to_string().contains(&format!(
                "the train data is empty (every file was skipped as not UTF-8 text (7 files, e.g. {}/blob.bin: binary",
                base.display()
            )),
            "{e}"
        ),
    }
    cfg.undecodable = Undecodable::Error;
    cfg.train = vec![text(&["good.rs", "*.bin"])];
    match load_documents(&cfg, &base) {
        Ok(_) => panic!("expected an error"),
        Err(e) => assert!(
            e.to_string()
                .starts_with(&format!("{}/blob.bin: binary", base.display())),
            "{e}"
        ),
    }
}

#[test]
fn an_unmatched_glob_is_an_error_only_when_the_sources_find_no_file() {
    let (_dir, base) = scratch_dir();
    write_files(
        &base,
        &[("a.rs", b"fn a() {}"), ("d.jsonl", b"{\"text\": \"x\"}\n")],
    );
    let read = |sources: Vec<Source>| data::read_sources(&sources, &base, &ReadSettings::default());
    let shown = |p: &str| base.join(p).display().to_string();

    let found = ok(read(vec![text(&["*.py", "a.rs"]), text(&["src/**/*.rs"])]));
    assert_eq!(found.documents.len(), 1);
    assert_eq!(
        found.report.unmatched_globs,
        [shown("*.py"), shown("src/**/*.rs")]
    );
    let jsonl = Source::Jsonl {
        path: "d.jsonl".into(),
        field: "text".into(),
    };
    let found = ok(read(vec![text(&["*.py"]), jsonl]));
    assert_eq!(found.documents.len(), 1);
    assert_eq!(found.report.unmatched_globs, [shown("*.py")]);

    match read(vec![text(&["*.py"]), text(&["src/*.rs"])]) {
        Ok(r) => panic!("expected an error, read {:?}", r.documents),
        Err(e) => {
            assert!(matches!(e, DataError::NoMatch { .. }), "{e}");
            assert!(e.is_input(), "a data selection error is the user's to fix");
            assert!(
                e.to_string().starts_with(&format!(
                    "{}, {}: no glob matches a file",
                    shown("*.py"),
                    shown("src/*.rs")
                )),
                "{e}"
            );
        }
    }
}

#[test]
fn documents_errors_for_settings_and_empty_corpora() {
    let dir = ok(tempfile::tempdir());
    ok(fs::write(dir.path().join("empty.rs"), ""));
    ok(fs::write(dir.path().join("a.rs"), "fn a() {}"));
    let mut cases: Vec<(DataConfig, &str)> = vec![
        (config(vec![]), "data.train: no sources"),
        (
            config(vec![text(&["empty.rs"])]),
            "the train data is empty (1 documents read, none left",
        ),
    ];
    let mut bad_fraction = config(vec![text(&["a.rs"])]);
    bad_fraction.val_fraction = 1.0;
    cases.push((
        bad_fraction,
        "data.val_fraction: must be at least 0 and below 1, found 1",
    ));
    let mut empty_val = config(vec![text(&["a.rs"])]);
    empty_val.val = vec![text(&["empty.rs"])];
    cases.push((empty_val, "the val data is empty"));
    for (cfg, expected) in cases {
        match load_documents(&cfg, dir.path()) {
            Ok(_) => panic!("{cfg:?}: expected an error"),
            Err(e) => assert!(e.to_string().contains(expected), "{e} lacks {expected:?}"),
        }
    }
}

#[test]
fn preprocessing_normalises_newlines_and_drops_short_documents() {
    let doc = |t: &str| Document {
        origin: "x".into(),
        text: t.into(),
    };
    let docs = vec![doc("a\r\nb\rc"), doc(""), doc("xy")];
    let texts = |p: Preprocess| -> Vec<String> {
        data::preprocess(docs.clone(), &p)
            .into_iter()
            .map(|d| d.text)
            .collect()
    };
    assert_eq!(texts(Preprocess::default()), ["a\nb\nc", "xy"]);
    assert_eq!(
        texts(Preprocess {
            normalize_newlines: false,
            min_chars: 0
        }),
        ["a\r\nb\rc", "", "xy"]
    );
    assert_eq!(
        texts(Preprocess {
            normalize_newlines: true,
            min_chars: 3
        }),
        ["a\nb\nc"]
    );
}

// ---- validation split ----

fn numbered_docs(n: usize, prefix: &str) -> Vec<Document> {
    (0..n)
        .map(|i| Document {
            origin: format!("{prefix}{i}.rs"),
            text: format!("fn f{i}() -> u32 {{ {i} }}"),
        })
        .collect()
}

fn val_texts(docs: Vec<Document>, fraction: f64) -> Vec<String> {
    let (_, val) = data::hold_out(docs, fraction);
    let mut texts: Vec<String> = val.into_iter().map(|d| d.text).collect();
    texts.sort();
    texts
}

#[test]
fn validation_split_depends_on_content_only() {
    let docs = numbered_docs(200, "src/");
    let held = val_texts(docs.clone(), 0.1);
    assert!(
        (10..=30).contains(&held.len()),
        "about 10% held out, got {}",
        held.len()
    );

    let mut renamed_and_reordered = numbered_docs(200, "moved/renamed_");
    renamed_and_reordered.reverse();
    assert_eq!(val_texts(renamed_and_reordered, 0.1), held);

    let (train, val) = data::hold_out(docs.clone(), 0.1);
    assert_eq!(train.len() + val.len(), 200);
    let index = |d: &Document| d.text.clone();
    let in_order = |part: &[Document]| {
        let positions: Vec<usize> = part
            .iter()
            .map(|d| {
                docs.iter()
                    .position(|x| index(x) == index(d))
                    .unwrap_or(usize::MAX)
            })
            .collect();
        positions.windows(2).all(|w| w[0] < w[1])
    };
    assert!(
        in_order(&train) && in_order(&val),
        "both sides keep source order"
    );

    // Tiny corpora still get one validation document, and keep one for training.
    let two = numbered_docs(2, "");
    assert_eq!(val_texts(two.clone(), 0.01).len(), 1);
    assert_eq!(val_texts(two, 0.99).len(), 1);
    assert!(val_texts(numbered_docs(5, ""), 0.0).is_empty());
}

// ---- token cache ----

/// A scratch directory holding a copy of the code fixtures and a cache.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = ok(tempfile::tempdir());
        ok(fs::create_dir(dir.path().join("code")));
        for entry in ok(fs::read_dir(fixtures().join("data/code"))) {
            let entry = ok(entry);
            ok(fs::copy(
                entry.path(),
                dir.path().join("code").join(entry.file_name()),
            ));
        }
        Scratch { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn cache(&self) -> TokenCache {
        TokenCache::new(self.path("cache"))
    }

    /// Load the code documents with `preprocess`, tokenize through the cache.
    fn load(
        &self,
        t: &TokenizerBox,
        name: &str,
        preprocess: Preprocess,
    ) -> (CacheOutcome, Vec<u32>, PathBuf) {
        let mut cfg = config(vec![text(&["code/*"])]);
        cfg.preprocess = preprocess.clone();
        let docs = ok(load_documents(&cfg, self.dir.path()));
        let fp = ok(TokenizerFingerprint::of(t, name, ""));
        let cached = ok(self.cache().load_or_build(&docs.train, t, &fp, &preprocess));
        (cached.outcome, cached.tokens.to_vec(), cached.path)
    }
}

#[test]
fn token_cache_is_keyed_by_content_tokenizer_and_settings() {
    let s = Scratch::new();
    let bytes = bytes_tokenizer();
    let corpus = code_corpus();
    let corpus: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let bpe = ok(tokenizer(
        "bpe",
        r#"{"vocab_size": 300}"#,
        Path::new(""),
        &corpus,
    ));
    let default = Preprocess::default;

    let (first, tokens, path) = s.load(&bytes, "bytes", default());
    assert_eq!(first, CacheOutcome::Miss);
    assert_eq!(
        tokens.iter().filter(|&&t| t == 256).count(),
        3,
        "one eot after each document"
    );
    assert_eq!(
        s.load(&bytes, "bytes", default()),
        (CacheOutcome::Hit, tokens.clone(), path.clone())
    );

    // The same content under another name is the same data (the glob order is unchanged).
    ok(fs::rename(
        s.path("code/greet.rs"),
        s.path("code/a_renamed_greet.rs"),
    ));
    assert_eq!(
        s.load(&bytes, "bytes", default()),
        (CacheOutcome::Hit, tokens.clone(), path)
    );

    // Any change in content, tokenizer or settings is a miss.
    let window = s.path("code/window.rs");
    let mut content = ok(fs::read(&window));
    content[0] = b'#';
    ok(fs::write(&window, &content));
    assert_eq!(
        s.load(&bytes, "bytes", default()).0,
        CacheOutcome::Miss,
        "one byte changed"
    );
    assert_eq!(
        s.load(&bpe, "bpe", default()).0,
        CacheOutcome::Miss,
        "another tokenizer"
    );
    let changed = Preprocess {
        min_chars: 2,
        ..default()
    };
    assert_eq!(
        s.load(&bytes, "bytes", changed.clone()).0,
        CacheOutcome::Miss,
        "another setting"
    );
    assert_eq!(s.load(&bytes, "bytes", changed).0, CacheOutcome::Hit);
    assert_eq!(s.load(&bpe, "bpe", default()).0, CacheOutcome::Hit);
}

#[test]
fn corrupt_or_truncated_cache_files_are_rebuilt() {
    let s = Scratch::new();
    let bytes = bytes_tokenizer();
    let (_, tokens, path) = s.load(&bytes, "bytes", Preprocess::default());
    let damages: &[(&str, fn(&mut Vec<u8>), &str)] = &[
        (
            "payload byte flipped",
            |f| *f.last_mut().unwrap_or(&mut 0) ^= 1,
            "checksum mismatch",
        ),
        ("truncated", |f| f.truncate(f.len() - 4), "truncated"),
        (
            "header cut",
            |f| f.truncate(10),
            "shorter than the 48-byte header",
        ),
        ("not a cache file", |f| f[0] = b'X', "bad magic"),
        ("empty", Vec::clear, "0 bytes"),
    ];
    for (what, damage, reason) in damages {
        let mut file = ok(fs::read(&path));
        damage(&mut file);
        ok(fs::write(&path, &file));
        let (outcome, rebuilt, _) = s.load(&bytes, "bytes", Preprocess::default());
        match outcome {
            CacheOutcome::Rebuilt(r) => {
                assert!(r.contains(reason), "{what}: {r:?} lacks {reason:?}")
            }
            other => panic!("{what}: expected a rebuild, got {other:?}"),
        }
        assert_eq!(
            rebuilt, tokens,
            "{what}: the rebuilt stream is the original"
        );
        assert_eq!(
            s.load(&bytes, "bytes", Preprocess::default()).0,
            CacheOutcome::Hit,
            "{what}"
        );
    }
}

/// Every document ends with the end-of-text id exactly once, and a template's bos starts it.
#[test]
fn documents_end_with_one_end_of_text_even_when_the_template_adds_it() {
    let base = fixtures().join("tokenizers");
    let docs = vec![
        Document {
            origin: "a.rs".into(),
            text: "fn main".into(),
        },
        Document {
            origin: "b.rs".into(),
            text: "return x".into(),
        },
    ];
    let stream = |params: &str| {
        let t = ok(tokenizer("hf", params, &base, &[]));
        ok(data::tokenize(&docs, &t))
    };
    assert_eq!(
        stream(r#"{"path": "wordlevel.json", "eot_token": "</s>"}"#),
        [4, 5, 2, 11, 12, 2]
    );
    assert_eq!(
        stream(
            r#"{"path": "wordlevel.json", "eot_token": "</s>", "bos_token": "<s>",
                "add_bos_token": true, "add_eos_token": true}"#
        ),
        [1, 4, 5, 2, 1, 11, 12, 2]
    );
}

#[test]
fn tokenizer_fingerprint_uses_json_or_canonical_params() {
    let bytes = bytes_tokenizer();
    let fp = |params: &str| ok(TokenizerFingerprint::of(&bytes, "bytes", params));
    assert_eq!(
        fp(r#"{"a": 1, "b": 2}"#),
        fp(r#"{ "b":2,"a":1 }"#),
        "key order does not matter"
    );
    assert_ne!(fp(r#"{"a": 1}"#), fp(r#"{"a": 2}"#));
    let corpus = code_corpus();
    let corpus: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let bpe = ok(tokenizer(
        "bpe",
        r#"{"vocab_size": 300}"#,
        Path::new(""),
        &corpus,
    ));
    let by_json = |name: &str, params: &str| ok(TokenizerFingerprint::of(&bpe, name, params));
    assert_eq!(
        by_json("bpe", "{}"),
        by_json("hf", r#"{"path": "x"}"#),
        "same json, same tokenizer"
    );
    assert_eq!(
        by_json("hf", r#"{"path": "x"}"#),
        by_json("hf", r#"{"path": "elsewhere/y"}"#),
        "the path is not the tokenizer"
    );
    assert_ne!(
        by_json("hf", r#"{"path": "x"}"#),
        by_json("hf", r#"{"path": "x", "split_special_tokens": false}"#),
        "a setting the file does not record is part of the key"
    );
}

// ---- batches ----

fn stream(n: u32) -> Tokens {
    Tokens::from((0..n).collect::<Vec<u32>>())
}

fn shape(batch_size: usize, seq_len: usize) -> BatchShape {
    BatchShape {
        batch_size,
        seq_len,
    }
}

fn draw(b: &mut TrainBatches, n: usize) -> Vec<data::TokenBatch> {
    (0..n).map(|_| b.next_batch()).collect()
}

/// The window index of every row of `batch` (token `w * seq_len` starts window `w`).
fn rows(batch: &data::TokenBatch) -> Vec<u32> {
    batch
        .inputs
        .chunks(batch.seq_len)
        .map(|r| r[0] / batch.seq_len as u32)
        .collect()
}

#[test]
fn training_windows_are_shifted_pairs_covering_each_epoch_once() {
    // 101 tokens, seq_len 10: windows start at 0, 10, ..., 90; 10 windows; 4 per batch.
    let mut b = ok(TrainBatches::new(stream(101), shape(4, 10), 7));
    assert_eq!(
        (b.windows(), b.batches_per_epoch(), b.tokens_per_epoch()),
        (10, 3, 100)
    );
    let epoch = draw(&mut b, 3);
    assert_eq!(epoch.iter().map(|x| x.rows).collect::<Vec<_>>(), [4, 4, 2]);
    for batch in &epoch {
        assert_eq!(batch.epoch, 0);
        assert_eq!(batch.tokens, (batch.rows * 10) as u64);
        for (i, t) in batch.inputs.iter().zip(&batch.targets) {
            assert_eq!(*t, i + 1, "targets are the inputs shifted by one");
        }
    }
    let mut seen: Vec<u32> = epoch.iter().flat_map(rows).collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..10).collect::<Vec<_>>(),
        "every window once per epoch"
    );
    assert_eq!(b.next_batch().epoch, 1);
}

#[test]
fn data_order_is_a_pure_function_of_seed_and_epoch() {
    let order = |seed, epoch| data::window_order(seed, epoch, 1000);
    let first = order(42, 0);
    // Other generators drawn in between (candle's CPU randn uses the thread RNG) change nothing.
    for _ in 0..3 {
        ok(codex_engine::candle::Tensor::randn(
            0f32,
            1.0,
            64,
            &codex_engine::candle::Device::Cpu,
        ));
    }
    assert_eq!(order(42, 0), first);
    assert_ne!(order(42, 1), first, "another epoch, another order");
    assert_ne!(order(43, 0), first, "another seed, another order");
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "a permutation");
    assert_ne!(first, sorted, "shuffled");

    let mut a = ok(TrainBatches::new(stream(2001), shape(3, 8), 42));
    let from_a = draw(&mut a, 200);
    ok(codex_engine::candle::Tensor::randn(
        0f32,
        1.0,
        64,
        &codex_engine::candle::Device::Cpu,
    ));
    let mut b = ok(TrainBatches::new(stream(2001), shape(3, 8), 42));
    assert_eq!(
        draw(&mut b, 200),
        from_a,
        "two independent batchers agree, across epochs"
    );
}

#[test]
fn a_saved_cursor_continues_identically() {
    let make = || ok(TrainBatches::new(stream(501), shape(4, 10), 9));
    // 50 windows, 13 batches per epoch: stop inside epoch 0, at its end, and inside epoch 2.
    for stop in [5, 13, 30] {
        let mut a = make();
        draw(&mut a, stop);
        let saved = ok(serde_json::to_string(&a.cursor()));
        let expected = draw(&mut a, 20);

        let mut b = make();
        ok(b.seek(ok(serde_json::from_str::<DataCursor>(&saved))));
        assert_eq!(draw(&mut b, 20), expected, "resumed after {stop} batches");
    }
    let mut b = make();
    match b.seek(DataCursor {
        epoch: 0,
        position: 51,
    }) {
        Err(e) => assert!(e.to_string().contains("position 51 is past the 50 windows")),
        Ok(()) => panic!("a cursor past the epoch must be refused"),
    }
}

#[test]
fn validation_padding_is_never_counted() {
    // 23 tokens, seq_len 5: targets 1..=22 in windows of 5, 5, 5, 5, 2.
    let v = ok(ValBatches::new(stream(23), shape(2, 5), 999));
    assert_eq!((v.windows(), v.len(), v.target_tokens()), (5, 3, 22));
    let batches: Vec<_> = (0..v.len())
        .map(|i| v.batch(i).unwrap_or_else(|| panic!("batch {i}")))
        .collect();
    assert!(v.batch(3).is_none());
    assert_eq!(
        batches.iter().map(|b| b.tokens).collect::<Vec<_>>(),
        [10, 10, 2]
    );
    let last = &batches[2];
    assert_eq!(last.rows, 1);
    assert_eq!(last.inputs, [20, 21, 999, 999, 999]);
    assert_eq!(
        last.targets,
        [21, 22, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    );
    for b in &batches {
        let counted = b.targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as u64;
        assert_eq!(b.tokens, counted);
    }
    assert_eq!(
        batches.iter().map(|b| b.tokens).sum::<u64>(),
        v.target_tokens()
    );
    assert_eq!(
        v.batch(0),
        ValBatches::new(stream(23), shape(2, 5), 999)
            .ok()
            .and_then(|v| v.batch(0)),
        "fixed order"
    );
}

#[test]
fn batch_errors_say_how_much_data_there_is() {
    let cases: Vec<(Result<(), DataError>, &str)> = vec![
        (TrainBatches::new(stream(0), shape(2, 8), 0).map(drop), "the train data is empty"),
        (
            TrainBatches::new(stream(8), shape(2, 8), 0).map(drop),
            "the train data has 8 tokens, but one window of seq_len 8 needs 9: lower `train.seq_len`",
        ),
        (TrainBatches::new(stream(100), shape(0, 8), 0).map(drop), "train.batch_size: must be at least 1"),
        (TrainBatches::new(stream(100), shape(2, 0), 0).map(drop), "train.seq_len: must be at least 1"),
        (ValBatches::new(stream(1), shape(2, 8), 0).map(drop), "the val data is empty (1 tokens"),
    ];
    for (result, expected) in cases {
        match result {
            Err(e) => assert!(e.to_string().contains(expected), "{e} lacks {expected:?}"),
            Ok(()) => panic!("expected an error containing {expected:?}"),
        }
    }
    assert!(
        TrainBatches::new(stream(9), shape(2, 8), 0).is_ok(),
        "exactly one window is enough"
    );
}

#[test]
fn end_to_end_from_fixtures_to_batches() {
    let base = fixtures().join("data");
    let mut cfg = config(vec![
        text(&["code/*"]),
        Source::Jsonl {
            path: "snippets.jsonl".into(),
            field: "text".into(),
        },
        Source::Csv {
            path: "snippets.csv".into(),
            column: "code".into(),
        },
    ]);
    cfg.val_fraction = 0.2;
    let docs = ok(load_documents(&cfg, &base));
    assert_eq!(docs.train.len() + docs.val.len(), 9);
    assert!(!docs.val.is_empty() && !docs.train.is_empty());
    let corpus: Vec<String> = docs.corpus().into_iter().map(|s| s.into_string()).collect();
    let corpus: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let bpe = ok(tokenizer("bpe", r#"{"vocab_size": 300}"#, &base, &corpus));
    let fp = ok(TokenizerFingerprint::of(
        &bpe,
        "bpe",
        r#"{"vocab_size": 300}"#,
    ));
    let dir = ok(tempfile::tempdir());
    let cache = TokenCache::new(dir.path());
    let streams = ok(data::token_streams(
        &docs,
        &bpe,
        &fp,
        &cache,
        &cfg.preprocess,
    ));
    let val = streams
        .val
        .unwrap_or_else(|| panic!("validation documents were held out"));
    let mut train = ok(TrainBatches::new(streams.train.tokens, shape(2, 16), 1));
    let val = ok(ValBatches::new(
        val.tokens,
        shape(2, 16),
        data::pad_id(&bpe),
    ));
    let batch = train.next_batch();
    assert_eq!(batch.inputs.len(), batch.rows * 16);
    assert!(batch
        .inputs
        .iter()
        .all(|&t| (t as usize) < bpe.vocab_size()));
    assert!(val.batch(0).is_some_and(|b| b.tokens > 0));
    assert_eq!(data::pad_id(&bpe), 1, "bpe pads with <|pad|>");
}

// ---- through the binary ----

/// A tiny experiment over `{data}` (a `Text` source's `paths`, RON list items) in a temporary
/// directory, run by the real binary with a controlled environment: no cache variable, and
/// `HOME` inside the directory (git's global excludes file is read from there).
struct Experiment {
    /// Removed with the experiment.
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Experiment {
    fn new(paths: &str) -> Experiment {
        let (dir, root) = scratch_dir();
        let config = format!(
            r#"(
    experiment: "selection",
    seed: 3,
    data: (train: [Text(paths: [{paths}])], val_fraction: 0.0),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 16, n_positions: 16)),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: 2, seq_len: 16, batch_size: 2, log_every: 1),
)"#
        );
        ok(fs::write(root.join("exp.ron"), config));
        for sub in ["work", "home"] {
            ok(fs::create_dir(root.join(sub)));
        }
        Experiment { _dir: dir, root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `codex-ml run exp.ron --run-dir out/RUN ARGS` from the empty `work/` directory, with
    /// `env` set on top of the controlled environment; the exit code and stderr.
    fn run(&self, run: &str, args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String) {
        let mut cmd = codex_tests::codex_ml();
        cmd.current_dir(self.path("work"))
            .env_remove("CODEX_ML_CACHE")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", self.path("home"))
            .arg("run")
            .arg(self.path("exp.ron"))
            .arg("--run-dir")
            .arg(self.path("out").join(run))
            .args(args);
        for (name, value) in env {
            cmd.env(name, value);
        }
        let out = ok(cmd.output());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The token cache files in `dir`, by name.
    fn cache_files(&self, dir: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.path(dir)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tokens"))
            .collect();
        names.sort();
        names
    }
}

/// Some source code, long enough for a few windows of 16 tokens.
const CODE: &[u8] =
    b"fn main() {\n    let xs: Vec<u32> = (0..10).collect();\n    println!(\"{}\", xs.len());\n}\n";

#[test]
fn a_run_skips_ignored_and_undecodable_files_and_records_them() {
    let e = Experiment::new(r#""repo/**/*", "repo/none/*.py""#);
    write_files(
        &e.root,
        &[
            ("repo/.git/HEAD", b"ref: refs/heads/main\n"),
            ("repo/.gitignore", b"ignored.rs\n"),
            ("repo/a.rs", CODE),
            ("repo/src/b.rs", CODE),
            ("repo/ignored.rs", b"\0 read it and the run fails"),
            ("repo/editor.swp", b"\0 read it and the run fails"),
            ("repo/blob.bin", b"\x7fELF\x02\x01\x01\0\0\0"),
            ("repo/latin1.rs", b"// caf\xe9\nfn main() {}\n"),
            // git's global excludes file, as git finds it when neither HOME/.gitconfig nor
            // XDG_CONFIG_HOME says otherwise.
            ("home/.config/git/ignore", b"*.swp\n"),
        ],
    );
    let xdg = e.path("xdg");
    let (code, stderr) = e.run("first", &[], &[("XDG_CACHE_HOME", &xdg)]);
    assert_eq!(code, Some(0), "{stderr}");
    let repo = e.path("repo").display().to_string();
    for expected in [
        format!("{repo}/none/*.py: the glob matches no file"),
        "skipped 2 files that are not UTF-8 text".to_string(),
        format!("{repo}/blob.bin: binary: a NUL byte at byte 7"),
        format!("{repo}/latin1.rs: not valid UTF-8: first bad byte at byte 6"),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} not in:\n{stderr}");
    }
    assert!(
        !stderr.contains("ignored.rs") && !stderr.contains("editor.swp"),
        "{stderr}"
    );

    let metadata: serde_json::Value = ok(serde_json::from_str(&ok(fs::read_to_string(
        e.path("out/first/metadata.json"),
    ))));
    let data = &metadata["data"];
    assert_eq!(data["text_files"], 2, "{data}");
    assert_eq!(data["undecodable"]["count"], 2, "{data}");
    let examples: Vec<(&str, &str)> = data["undecodable"]["examples"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (
                        f["path"].as_str().unwrap_or(""),
                        f["reason"].as_str().unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        examples,
        [
            (
                format!("{repo}/blob.bin").as_str(),
                "binary: a NUL byte at byte 7"
            ),
            (
                format!("{repo}/latin1.rs").as_str(),
                "not valid UTF-8: first bad byte at byte 6"
            ),
        ]
    );
    assert_eq!(
        data["unmatched_globs"],
        serde_json::json!([format!("{repo}/none/*.py")])
    );

    // The token cache went to $XDG_CACHE_HOME/codex-ml, nowhere near the working directory.
    let cached = e.cache_files("xdg/codex-ml");
    assert_eq!(cached.len(), 1, "one training stream");
    assert_eq!(
        ok(fs::read_dir(e.path("work"))).count(),
        0,
        "the working directory stays empty"
    );
    assert!(!e.path("home/.cache").exists());

    // CODEX_ML_CACHE wins over XDG_CACHE_HOME; the same data has the same key there.
    let own = e.path("own-cache");
    let (code, stderr) = e.run(
        "second",
        &[],
        &[("XDG_CACHE_HOME", &xdg), ("CODEX_ML_CACHE", &own)],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(e.cache_files("own-cache"), cached);
    // Without either, ~/.cache/codex-ml; data.cache_dir, when set, wins over everything.
    let (code, stderr) = e.run("third", &[], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(e.cache_files("home/.cache/codex-ml"), cached);
    let (code, stderr) = e.run(
        "fourth",
        &["--set", "data.cache_dir=\"configured\""],
        &[("CODEX_ML_CACHE", &own)],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        e.cache_files("configured"),
        cached,
        "relative to the config file"
    );
    assert_eq!(ok(fs::read_dir(e.path("work"))).count(), 0);

    // Each of the four runs trained on the same tokens.
    let model = |run: &str| {
        ok(fs::read(e.path(&format!(
            "out/{run}/checkpoints/step-00000002/model.safetensors"
        ))))
    };
    for run in ["second", "third", "fourth"] {
        assert!(model(run) == model("first"), "{run} differs from first");
    }
}

#[test]
fn data_selection_errors_exit_with_code_2() {
    let e = Experiment::new(r#""src/*.rs""#);
    write_files(&e.root, &[("src/a.rs", CODE), ("src/blob.rs", b"\0\0\0")]);
    let src = e.path("src").display().to_string();
    let cases: &[(&[&str], String)] = &[
        (
            &[
                "--set",
                "data.train=[{\"Text\": (paths: [\"lib/**/*.rs\"])}]",
            ],
            format!(
                "error: {}/lib/**/*.rs: the glob matches no file",
                e.root.display()
            ),
        ),
        (
            &["--set", "data.undecodable=error"],
            format!("{src}/blob.rs: binary"),
        ),
        (
            &[
                "--set",
                "data.train=[{\"Text\": (paths: [\"src/*.rs\", \"b.rs\"])}]",
            ],
            format!("{}/b.rs: no such file", e.root.display()),
        ),
        (
            &[
                "--set",
                "data.train=[{\"Text\": (paths: [\"src/*.rs\"], exclude: [\"src/{a\"])}]",
            ],
            "data.train[0].exclude[0]: invalid glob `src/{a`".to_string(),
        ),
    ];
    for (i, (args, expected)) in cases.iter().enumerate() {
        let (code, stderr) = e.run(&format!("run{i}"), args, &[]);
        assert_eq!(code, Some(2), "{args:?}:\n{stderr}");
        assert!(
            stderr.contains(expected.as_str()),
            "{args:?}: {expected:?} not in:\n{stderr}"
        );
    }
}
