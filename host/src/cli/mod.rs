//! The `codex-ml` command line: argument parsing, logging set-up, dispatch, and the mapping
//! from failures to exit codes.
//!
//! Exit codes follow ripgrep: 0 success, 1 a runtime failure, 2 a problem with what the user
//! asked for (arguments, config, manifest, component names) — something to fix before trying
//! again — and, as shells do, 128 + n for a run stopped by signal n (after its checkpoint). Errors print as `error: ...` followed by their cause chain on stderr; stdout carries
//! only machine-readable output.
//!
//! Each subcommand lives in its own module with one entry point taking its argument struct;
//! the argument structs are defined here so `--help` for the whole tool reads in one place.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, Override};
use crate::diagnostics::Diagnostic;
use crate::plugins::manifest::ManifestError;
use crate::plugins::native::NativeError;
use crate::plugins::registry::RegistryError;
use crate::run::{Latest, RunError};

pub mod bench;
pub mod eval;
pub mod export;
pub mod generate;
pub mod list;
pub mod plugin;
pub mod report;
pub mod resume;
pub mod run;
pub mod tokenize;
pub mod verify;

pub use list::{KindFilter, ListArgs};

/// Train and run causal language models from one binary, with pluggable components.
#[derive(Debug, Parser)]
#[command(
    name = "codex-ml",
    version,
    propagate_version = true,
    arg_required_else_help = true,
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 bad arguments, config or manifest,\n\
                  128+n a run stopped by signal n after its checkpoint (130 Ctrl-C, 143 SIGTERM).\n\
                  Logging: RUST_LOG (e.g. RUST_LOG=codex_host=debug) takes precedence over -v/-q."
)]
pub struct Cli {
    /// More log output on stderr: -v debug, -vv trace
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every registered component (tokenizers, models, optimizers, sinks, trackers,
    /// trainers, kernels) and the plugins a manifest declares
    #[command(long_about = list::LONG_ABOUT)]
    List(ListArgs),
    /// Train a model as an experiment config describes
    #[command(long_about = RUN_LONG_ABOUT)]
    Run(RunArgs),
    /// Evaluate a trained model: loss, perplexity and token accuracy
    Eval(EvalArgs),
    /// Continue an interrupted run from its newest valid checkpoint, with its own config
    #[command(long_about = RESUME_LONG_ABOUT)]
    Resume(ResumeArgs),
    /// Check the SHA-256 sums of one checkpoint or of every checkpoint of a run
    Verify(VerifyArgs),
    /// Generate text from a trained model
    Generate(GenerateArgs),
    /// Print the token ids a run's tokenizer (or a Hugging Face directory's) gives a text
    #[command(long_about = TOKENIZE_LONG_ABOUT)]
    Tokenize(TokenizeArgs),
    /// Write a checkpoint as a Hugging Face model directory, as transformers saves one
    #[command(long_about = EXPORT_LONG_ABOUT)]
    Export(ExportArgs),
    /// Measure training throughput (tokens/s) on built-in model sizes
    Bench(BenchArgs),
    /// Write an HTML page of one or more runs' curves, side by side with their differing config
    #[command(long_about = REPORT_LONG_ABOUT)]
    Report(ReportArgs),
    /// Work with plugin files: `plugin inspect FILE` shows what a native plugin declares
    Plugin(plugin::PluginArgs),
}

const RUN_LONG_ABOUT: &str = "Train a model as an experiment config describes.\n\n\
    The config (RON) names the tokenizer, model, optimizer, trainer, sinks and trackers by \
    registry name (see `codex-ml list`), the data and the training settings. The run directory \
    receives the resolved config, metadata, metrics, the log and checkpoints.";

const RESUME_LONG_ABOUT: &str = "Continue an interrupted run from its newest valid checkpoint.\n\n\
    Every checkpoint's SHA-256 sums are verified before anything is loaded; corrupt or \
    incomplete checkpoints are skipped with a warning. The run continues in its own directory \
    with the config stored in the checkpoint; --set may change only what does not alter the \
    steps already taken (train.max_steps, cadences, sinks, ...). On CPU the result is \
    bitwise identical to an uninterrupted run. See docs/checkpoints.md.";

const REPORT_LONG_ABOUT: &str = "Write an HTML page of one or more runs.\n\n\
    The page shows each run's status (finished, failed, interrupted, running), the config \
    values in which the runs differ, and a chart per metric (training and validation loss, \
    learning rate, throughput, system metrics) with every run overlaid. It is one file that \
    needs nothing else: open it in any browser, offline, or attach it. A run that is still \
    going can be reported; its last, incomplete record is skipped. See docs/observability.md.";

/// `codex-ml report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories to show, e.g. runs/quickstart/20261204-211500; several are overlaid
    #[arg(value_name = "RUN_DIR", required = true)]
    pub runs: Vec<PathBuf>,
    /// The HTML file to write (replaced if it exists)
    #[arg(short, long, value_name = "FILE", default_value = "report.html")]
    pub output: PathBuf,
}

/// `codex-ml resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The run directory to continue, e.g. runs/quickstart/20261124-201500, or `latest` (the
    /// newest run under runs/ with a valid checkpoint)
    #[arg(value_name = "RUN_DIR|latest")]
    pub run_dir: PathBuf,
    /// Override one value of the run's config, e.g. `--set train.max_steps=800`; only
    /// settings that leave the steps already taken unchanged may differ
    #[arg(long = "set", value_name = "PATH=VALUE", value_parser = parse_override)]
    pub set: Vec<Override>,
    /// Plugin manifest (RON) declaring external plugins the config names
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Resume even if a plugin file differs from the one the run last used (exact resume may
    /// no longer hold); the change is logged and the new hash recorded
    #[arg(long)]
    pub allow_plugin_change: bool,
    /// Let --set change the learning rate and schedule of the steps still to come
    /// (optimizer.lr, train.schedule), e.g. after a divergence; the steps taken stay as they were
    #[arg(long)]
    pub retune: bool,
    /// Skip this many optimizer steps' worth of training batches after the checkpoint (the
    /// data around a divergence, say)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub skip_batches: u64,
    /// Print the outcome as one JSON object on stdout instead of text (docs/cli.md); a failure
    /// too prints one, with the error and the exit code
    #[arg(long)]
    pub json: bool,
}

/// `codex-ml verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A checkpoint directory, a run directory (every checkpoint in it is checked), or
    /// `latest` (the newest run under runs/ that has written a checkpoint)
    #[arg(value_name = "CHECKPOINT_OR_RUN|latest")]
    pub path: PathBuf,
    /// Print the outcome as one JSON object on stdout instead of text (docs/cli.md); a failure
    /// too prints one, with the error and the exit code
    #[arg(long)]
    pub json: bool,
}

/// `codex-ml run`.
// Field docs are clap's help text, where `<experiment>` is meant literally.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Experiment config (RON), e.g. configs/quickstart.ron
    #[arg(value_name = "CONFIG")]
    pub config: PathBuf,
    /// Override one config value, e.g. `--set optimizer.lr=3e-4` or `--set sinks[0].name=csv`;
    /// repeatable, applied in order. VALUE is a RON literal (500, 3e-4, true, "text", [1, 2],
    /// (a: 1), None) or else taken as a string
    #[arg(long = "set", value_name = "PATH=VALUE", value_parser = parse_override)]
    pub set: Vec<Override>,
    /// Directory for this run [default: runs/<experiment>/<run-id>]
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Plugin manifest (RON) declaring external plugins the config may name
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Continue an earlier run of this config: `latest` (the newest valid checkpoint of the
    /// newest run, or of --run-dir), a run directory, or a checkpoint directory
    #[arg(long, value_name = "latest|PATH")]
    pub resume: Option<PathBuf>,
    /// With --resume: go on even if a plugin file differs from the one the run last used
    #[arg(long, requires = "resume")]
    pub allow_plugin_change: bool,
    /// With --resume: let the config change the learning rate and schedule of the steps still
    /// to come
    #[arg(long, requires = "resume")]
    pub retune: bool,
    /// With --resume: skip this many optimizer steps' worth of training batches after the
    /// checkpoint
    #[arg(long, value_name = "N", default_value_t = 0, requires = "resume")]
    pub skip_batches: u64,
    /// Print the outcome as one JSON object on stdout instead of text (docs/cli.md); a failure
    /// too prints one, with the error and the exit code
    #[arg(long)]
    pub json: bool,
}

/// `codex-ml eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory (its newest valid checkpoint is used), a checkpoint directory, or
    /// `latest` (the newest run under runs/ with a valid checkpoint)
    #[arg(value_name = "RUN_OR_CHECKPOINT|latest")]
    pub target: PathBuf,
    /// Evaluate on these files or globs instead of the run's validation split; repeatable. A
    /// supervised fine-tuning run reads them (JSON Lines files, not globs) as its training
    /// sources, and counts completion or assistant tokens only
    #[arg(long, value_name = "FILE_OR_GLOB")]
    pub data: Vec<String>,
    /// Evaluate at most N batches [default: all of them]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub batches: Option<usize>,
    /// Plugin manifest (RON) declaring the plugins the run used (needed when its model or
    /// tokenizer comes from a plugin)
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print the outcome as one JSON object on stdout instead of text (docs/cli.md); a failure
    /// too prints one, with the error and the exit code
    #[arg(long)]
    pub json: bool,
}

const TOKENIZE_LONG_ABOUT: &str = "Print the token ids a tokenizer gives a text.\n\n\
    TARGET is a run or checkpoint directory (the run's tokenizer) or a Hugging Face model \
    directory (its tokenizer.json, as `model: (from: DIR)` uses it). The text is encoded \
    exactly as training data is: special-token text such as <|endoftext|> stays text, and no \
    bos or eos is added. See docs/finetune-hf.md.";

/// `codex-ml tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// A run directory, a checkpoint directory, `latest`, or a Hugging Face model directory
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
    /// The text to encode
    #[arg(value_name = "TEXT")]
    pub text: Option<String>,
    /// Encode this file's text instead
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Plugin manifest (RON) declaring the plugins the run used (needed when its tokenizer
    /// comes from a plugin)
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print one JSON object on stdout: the ids, their count, the end-of-text id and the
    /// vocabulary size
    #[arg(long)]
    pub json: bool,
}

const EXPORT_LONG_ABOUT: &str = "Write a checkpoint as a Hugging Face model directory.\n\n\
    OUT_DIR receives config.json, generation_config.json, the weights (model.safetensors, or \
    shards with model.safetensors.index.json), tokenizer.json, tokenizer_config.json and a \
    README.md model card; AutoModelForCausalLM.from_pretrained(OUT_DIR) and \
    AutoTokenizer.from_pretrained(OUT_DIR) load it. A LoRA run exports its adapter (--adapter: \
    adapter_config.json and adapter_model.safetensors, which PEFT loads) or the model with the \
    adapter merged (--merge). OUT_DIR must not exist or be empty. See docs/finetune-hf.md.";

/// `codex-ml export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run directory (its newest valid checkpoint is used), a checkpoint directory, or
    /// `latest` (the newest run under runs/ with a valid checkpoint)
    #[arg(value_name = "RUN_OR_CHECKPOINT|latest")]
    pub target: PathBuf,
    /// The directory to write; must not exist, or be empty
    #[arg(value_name = "OUT_DIR")]
    pub out: PathBuf,
    /// The dtype of the written weights
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// Largest weight file (`5GB`, `500MB`, `100KB`); more weights are split into shards
    /// with model.safetensors.index.json
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// For a LoRA run: write the adapter as PEFT saves one (adapter_config.json and
    /// adapter_model.safetensors), for PeftModel.from_pretrained(base, OUT_DIR)
    #[arg(long, conflicts_with = "merge")]
    pub adapter: bool,
    /// For a LoRA run: write the whole model with the adapter merged into its weights
    #[arg(long)]
    pub merge: bool,
    /// Plugin manifest (RON) declaring the plugins the run used (needed when its model or
    /// tokenizer comes from a plugin)
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print the outcome as one JSON object on stdout instead of text (docs/cli.md); a failure
    /// too prints one, with the error and the exit code
    #[arg(long)]
    pub json: bool,
}

/// `codex-ml generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A run directory (its newest valid checkpoint is used), a checkpoint directory, or
    /// `latest` (the newest run under runs/ with a valid checkpoint)
    #[arg(value_name = "RUN_OR_CHECKPOINT|latest")]
    pub target: PathBuf,
    /// Text to continue
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Tokens to generate
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = parse_positive)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 always picks the most likely token
    #[arg(long, value_name = "T", default_value_t = 1.0, value_parser = parse_temperature)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens [default: all tokens]
    #[arg(long, value_name = "K", value_parser = parse_positive)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P, in (0, 1]
    /// [default: no cut-off]
    #[arg(long, value_name = "P", value_parser = parse_top_p)]
    pub top_p: Option<f64>,
    /// Seed of the sampler [default: the run's seed]
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Plugin manifest (RON) declaring the plugins the run used (needed when its model or
    /// tokenizer comes from a plugin)
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print the outcome as one JSON object on stdout instead of text (docs/cli.md); a failure
    /// too prints one, with the error and the exit code
    #[arg(long)]
    pub json: bool,
}

/// `codex-ml bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model size to measure
    #[arg(long, value_name = "SIZE", value_enum, default_value_t = BenchPreset::Tiny)]
    pub config: BenchPreset,
    /// Also report where a training step spends its time: the op-table entries and kernel calls
    /// that take the most of it
    #[arg(long)]
    pub profile: bool,
    /// Untimed steps before measuring [default: 5 for tiny, 2 for small, 1 for medium, as the reference]
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Timed windows; the median window is reported [default: 7 for tiny, 5 for small, 3 for medium]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub windows: Option<usize>,
    /// Optimizer steps per window [default: 10 for tiny, 3 for small, 1 for medium]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub steps: Option<usize>,
    /// Worker threads [default: one per core]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub threads: Option<usize>,
    /// Compose every op from candle primitives instead of the built-in `cpu` kernel's fused ops
    #[arg(long)]
    pub no_kernel: bool,
    /// Precision of the matrix products: `bf16` or `f16` multiplies in that format with f32
    /// accumulation (f32 weights and optimizer state); bf16 where the CPU has AVX512-BF16,
    /// f16 everywhere
    #[arg(long, value_enum, default_value_t = BenchPrecision::F32)]
    pub precision: BenchPrecision,
}

/// The precisions `codex-ml bench --precision` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPrecision {
    /// Everything in f32
    F32,
    /// Matrix products in bf16, accumulated in f32
    Bf16,
    /// Matrix products in f16, accumulated in f32
    F16,
}

/// The model sizes `codex-ml bench` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPreset {
    /// A GPT-2 small enough for CI
    Tiny,
    /// A GPT-2 of a few million parameters
    Small,
    /// GPT-2 124M's shapes (vocabulary 50257, width 768, 12 layers)
    Medium,
    /// Every size, one after the other
    All,
}

fn parse_override(arg: &str) -> Result<Override, String> {
    arg.parse()
}

/// `5GB`, `500MB`, `100KB` or a number of bytes (decimal units, as transformers'
/// `max_shard_size`).
fn parse_size(arg: &str) -> Result<u64, String> {
    let upper = arg.trim().to_ascii_uppercase();
    let (number, unit) = match upper.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => upper.split_at(i),
        None => (upper.as_str(), "B"),
    };
    let scale: u64 = match unit {
        "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("`{arg}`: give a size like 5GB, 500MB or 100KB")),
    };
    match number.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n.saturating_mul(scale)),
        _ => Err(format!(
            "`{arg}`: give a positive size like 5GB, 500MB or 100KB"
        )),
    }
}

fn parse_positive(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

fn parse_temperature(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(_) => Err("must be a finite number ≥ 0".to_owned()),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

fn parse_top_p(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        Ok(_) => Err("must be in (0, 1]".to_owned()),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// `eprintln!` that never panics: with stderr closed (`codex-ml run … 2>&1 | head`), a message
/// is lost rather than a finished run turned into a crash.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use say;

/// A run stopped by a signal after its checkpoint was written and its results flushed: not a
/// failure to report (the run said how to continue), but the exit code, 128 + the signal's
/// number, tells a script it did not finish, so `codex-ml run … && next` does not carry on.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {}", crate::run::signal_name(*.0))]
pub struct Stopped(pub i32);

/// Where runs go (`runs/<experiment>/<run-id>`) and where `latest` looks: under the current
/// directory.
pub(crate) const RUNS_ROOT: &str = "runs";

/// A command's run or checkpoint argument: `latest` stands for the newest run under `runs/`
/// the command can use (named in the log); any other path must exist.
pub(crate) fn run_target(target: &Path, latest: Latest) -> anyhow::Result<PathBuf> {
    if target == Path::new("latest") {
        return crate::run::latest_run(Path::new(RUNS_ROOT), None, latest);
    }
    if !target.exists() {
        return Err(RunError::NoSuchRun(target.to_path_buf()).into());
    }
    Ok(target.to_path_buf())
}

/// Whether the command has printed its JSON document (so a failure after it adds none).
static JSON_PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Write `value` to stdout as the command's one JSON document (`--json`).
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    use std::io::Write as _;
    JSON_PRINTED.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// The JSON document of a failed command: the error, its causes and the exit code.
pub fn error_json(error: &anyhow::Error, exit_code: i32) -> serde_json::Value {
    let mut chain = error.chain().map(|cause| cause.to_string());
    serde_json::json!({
        "error": chain.next().unwrap_or_default(),
        "causes": chain.collect::<Vec<_>>(),
        "exit_code": exit_code,
    })
}

/// A problem with how codex-ml was invoked; exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parse the command line, run the command, and return the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with code 0; usage errors to stderr with code 2.
            let _ = e.print();
            return e.exit_code();
        }
    };
    crate::logging::init(cli.verbose, cli.quiet);
    let json = cli.command.json();
    let result = match cli.command {
        Command::List(args) => list::list(args),
        Command::Run(args) => run::run(args),
        Command::Resume(args) => resume::resume(args),
        Command::Verify(args) => verify::verify(args),
        Command::Eval(args) => eval::eval(args),
        Command::Generate(args) => generate::generate(args),
        Command::Export(args) => export::export(args),
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Bench(args) => bench::bench(args),
        Command::Report(args) => report::report(args),
        Command::Plugin(args) => plugin::plugin(args),
    };
    match result {
        Ok(()) => 0,
        // A closed pipe (`codex-ml list | head`) is the reader's choice, not a failure.
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) if e.is::<Stopped>() => exit_code(&e),
        Err(e) => {
            say!("{}", report(&e));
            let code = exit_code(&e);
            if json && !JSON_PRINTED.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = print_json(&error_json(&e, code));
            }
            code
        }
    }
}

impl Command {
    /// Whether the command was asked for `--json` output.
    fn json(&self) -> bool {
        match self {
            Command::List(args) => args.json,
            Command::Run(args) => args.json,
            Command::Resume(args) => args.json,
            Command::Verify(args) => args.json,
            Command::Eval(args) => args.json,
            Command::Generate(args) => args.json,
            Command::Export(args) => args.json,
            Command::Tokenize(args) => args.json,
            Command::Plugin(args) => match &args.command {
                plugin::PluginCommand::Inspect(args) => args.json,
            },
            Command::Bench(_) | Command::Report(_) => false,
        }
    }
}

/// 2 when the failure is the user's input (arguments, config, manifest, component names, a
/// plugin that cannot be loaded, a component that cannot be built from its parameters or the
/// files they name, data files and their selection, a path that is not a run or whose record
/// is damaged), 128 + n for a run stopped by signal n,
/// else 1.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    if let Some(Stopped(signal)) = error.downcast_ref::<Stopped>() {
        return 128 + signal;
    }
    let usage = error.chain().any(|cause| {
        cause.is::<UsageError>()
            || cause
                .downcast_ref::<crate::data::DataError>()
                .is_some_and(crate::data::DataError::is_input)
            || cause.is::<ConfigError>()
            || cause.is::<ManifestError>()
            || cause.is::<RegistryError>()
            || cause.is::<NativeError>()
            || cause.is::<Diagnostic>()
            || cause.is::<crate::run::RunError>()
            || cause.is::<crate::hf::HfError>()
            || cause
                .downcast_ref::<crate::report::ReportError>()
                .is_some_and(crate::report::ReportError::is_input)
            || cause
                .downcast_ref::<crate::plugins::build::NotCreated>()
                .is_some_and(|e| !e.panicked)
    });
    if usage {
        2
    } else {
        1
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// `error: what failed` and one `caused by:` line per cause; multi-line causes (diagnostics
/// with a source excerpt) keep their shape, indented under their line.
pub fn report(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for (i, cause) in error.chain().enumerate() {
        let label = if i == 0 { "error: " } else { "  caused by: " };
        let text = cause.to_string();
        let mut lines = text.lines();
        let _ = write!(out, "{}{}", if i == 0 { "" } else { "\n" }, label);
        out.push_str(lines.next().unwrap_or_default());
        let indent = " ".repeat(label.len());
        for line in lines {
            let _ = write!(out, "\n{indent}{line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes_separate_user_input_from_runtime_failures() {
        let usage = anyhow::Error::new(UsageError("bad".into())).context("while listing");
        assert_eq!(exit_code(&usage), 2);
        let config = anyhow::Error::new(ConfigError::Override {
            arg: "x=1".into(),
            message: "unknown field".into(),
        });
        assert_eq!(exit_code(&config), 2);
        let runtime =
            anyhow::Error::new(io::Error::other("disk full")).context("writing a checkpoint");
        assert_eq!(exit_code(&runtime), 1);
        for (signal, code) in [(2, 130), (15, 143), (1, 129)] {
            assert_eq!(exit_code(&anyhow::Error::new(Stopped(signal))), code);
        }
    }

    #[test]
    fn reports_show_the_cause_chain() {
        let error = anyhow::Error::new(io::Error::other("disk full\nsecond line"))
            .context("writing a checkpoint");
        assert_eq!(
            report(&error),
            "error: writing a checkpoint\n  caused by: disk full\n             second line"
        );
    }

    #[test]
    fn overrides_and_numbers_are_checked_while_parsing() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(parse(&["codex-ml", "run", "c.ron", "--set", "seed"]).is_err());
        assert!(parse(&["codex-ml", "generate", "r", "--prompt", "x", "--top-p", "1.5"]).is_err());
        assert!(parse(&[
            "codex-ml",
            "generate",
            "r",
            "--prompt",
            "x",
            "--temperature",
            "-1"
        ])
        .is_err());
        assert!(parse(&["codex-ml", "bench", "--windows", "0"]).is_err());
        assert!(parse(&["codex-ml", "-v", "-q", "list"]).is_err());
        let cli = parse(&[
            "codex-ml",
            "run",
            "c.ron",
            "--set",
            "seed=4",
            "--set",
            "train.max_steps=9",
            "-vv",
        ])
        .expect("valid");
        assert_eq!(cli.verbose, 2);
        match cli.command {
            Command::Run(args) => {
                let paths: Vec<&str> = args.set.iter().map(|o| o.path.as_str()).collect();
                assert_eq!(paths, ["seed", "train.max_steps"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
