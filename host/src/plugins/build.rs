//! Building components from registry entries, and asking them to check their parameters.
//!
//! Each function looks the name up in the registry (so an unknown name lists the known ones),
//! hands the component its parameters as JSON, and turns a factory error into a host error
//! that names the component and its origin. The caller owns what comes back.

use abi_stable::std_types::{RStr, RString};
use anyhow::{anyhow, Context, Result};
use codex_plugin_api::kernel::KernelBox;
use codex_plugin_api::model::{ModelBox, ModelEnv};
use codex_plugin_api::optimizer::OptimizerBox;
use codex_plugin_api::params::TensorStoreRef;
use codex_plugin_api::sink::{SinkBox, SinkEnv};
use codex_plugin_api::tokenizer::{TokenizerBox, TokenizerEnv};
use codex_plugin_api::tracker::TrackerBox;
use codex_plugin_api::trainer::TrainerBox;
use codex_plugin_api::{ComponentDecl, ComponentKind, Factory, PluginError};

use crate::plugins::registry::{Entry, Maker, Origin, Registry};

/// The JSON text handed to a factory; `null` parameters mean "no parameters".
fn params_text(params: &serde_json::Value) -> String {
    match params {
        serde_json::Value::Null => "{}".to_string(),
        v => v.to_string(),
    }
}

/// A component's factory refused to build it from what the config gave it (its parameters, a
/// file they name): the user's to fix, exit code 2. A factory that panicked is a bug in the
/// component instead, exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{what} could not be created: {message}")]
pub struct NotCreated {
    /// `tokenizer `hf` (built-in)`.
    what: String,
    /// Why, cleaned for the terminal.
    message: String,
    /// Whether the factory panicked rather than returned an error.
    pub panicked: bool,
}

fn failed(entry: &Entry, e: PluginError) -> anyhow::Error {
    anyhow::Error::new(NotCreated {
        what: format!(
            "{} `{}` ({})",
            entry.kind.as_str(),
            entry.name,
            entry.origin
        ),
        message: super::plugin_message(&e),
        panicked: e.panicked,
    })
}

fn lookup<'r>(registry: &'r Registry, kind: ComponentKind, name: &str) -> Result<&'r Entry> {
    registry
        .get(kind, name)
        .map_err(|e| anyhow::Error::new(e).context(format!("in the config's {}", kind.as_str())))
}

fn mismatch(entry: &Entry, kind: ComponentKind) -> anyhow::Error {
    anyhow!(
        "`{}` ({}) is registered as a {} but its factory builds {}",
        entry.name,
        entry.origin,
        kind.as_str(),
        match entry.declaration() {
            Some(decl) => format!("a {}", decl.kind().as_str()),
            None => "a sandboxed sink".to_owned(),
        }
    )
}

/// The ABI factory of an entry made from a declaration; a sandboxed sink has none (it is
/// opened by [`sink`] alone).
fn factory(entry: &Entry) -> Result<Factory> {
    match &entry.maker {
        Maker::Declared(decl) => Ok(decl.factory),
        Maker::Sandboxed(_) => Err(anyhow!(
            "`{}` ({}) is a sandboxed sink and builds nothing else",
            entry.name,
            entry.origin
        )),
    }
}

/// Build a tokenizer; `corpus` is used by tokenizers that learn a vocabulary. With `saved`
/// (what the tokenizer's `to_json` gave for a run), it restores that tokenizer instead.
pub fn tokenizer(
    registry: &Registry,
    name: &str,
    params: &serde_json::Value,
    base_dir: &str,
    corpus: &[RString],
    saved: Option<&str>,
) -> Result<TokenizerBox> {
    let entry = lookup(registry, ComponentKind::Tokenizer, name)?;
    let Factory::Tokenizer(f) = factory(entry)? else {
        return Err(mismatch(entry, ComponentKind::Tokenizer));
    };
    let text = params_text(params);
    let env = TokenizerEnv {
        base_dir: RStr::from(base_dir),
        corpus: corpus.into(),
        saved: saved.map(RStr::from).into(),
    };
    f(RStr::from(text.as_str()), env)
        .into_result()
        .map_err(|e| failed(entry, e))
}

/// Build a model, declaring its parameters in `store`.
pub fn model(
    registry: &Registry,
    name: &str,
    params: &serde_json::Value,
    vocab_size: usize,
    store: TensorStoreRef<'_>,
) -> Result<ModelBox> {
    let entry = lookup(registry, ComponentKind::Model, name)?;
    let Factory::Model(f) = factory(entry)? else {
        return Err(mismatch(entry, ComponentKind::Model));
    };
    let text = params_text(params);
    f(RStr::from(text.as_str()), ModelEnv { vocab_size, store })
        .into_result()
        .map_err(|e| failed(entry, e))
}

/// Build an optimizer over the parameters already declared in `store`.
pub fn optimizer(
    registry: &Registry,
    name: &str,
    params: &serde_json::Value,
    store: TensorStoreRef<'_>,
) -> Result<OptimizerBox> {
    let entry = lookup(registry, ComponentKind::Optimizer, name)?;
    let Factory::Optimizer(f) = factory(entry)? else {
        return Err(mismatch(entry, ComponentKind::Optimizer));
    };
    let text = params_text(params);
    f(RStr::from(text.as_str()), store)
        .into_result()
        .map_err(|e| failed(entry, e))
}

/// Build a sink writing into `run_dir`.
pub fn sink(
    registry: &Registry,
    name: &str,
    params: &serde_json::Value,
    run_dir: &std::path::Path,
    resume_step: Option<u64>,
) -> Result<SinkBox> {
    let entry = lookup(registry, ComponentKind::Sink, name)?;
    let params = params_text(params);
    match &entry.maker {
        Maker::Sandboxed(open) => open(&params, run_dir, resume_step).map_err(|message| {
            anyhow!(
                "sink `{name}` ({}) could not be created: {message}",
                entry.origin
            )
        }),
        Maker::Declared(decl) => open_sink(decl, &params, run_dir, resume_step)
            .map_err(|e| match e {
                SinkOpenError::NotASink { found } => anyhow!(
                    "component `{name}` is a {found}, not a sink; list sinks with `codex-ml list`"
                ),
                SinkOpenError::Failed(message) => anyhow!("cannot open sink `{name}`: {message}"),
            })
            .with_context(|| format!("sink `{name}` ({})", entry.origin)),
    }
}

/// Why [`open_sink`] failed.
#[derive(Debug)]
pub enum SinkOpenError {
    /// The declaration is for another kind of component.
    NotASink {
        /// The kind it is.
        found: &'static str,
    },
    /// The sink's constructor failed, with this message.
    Failed(String),
}

/// Open a sink from its declaration: `params_json` is its parameters as JSON (empty for none),
/// `run_dir` the directory file sinks write into, `resume_step` the step being resumed from.
/// [`sink`] does this for a registry name; the metrics hub, for the run's own record.
pub fn open_sink(
    decl: &ComponentDecl,
    params_json: &str,
    run_dir: &std::path::Path,
    resume_step: Option<u64>,
) -> std::result::Result<SinkBox, SinkOpenError> {
    let Factory::Sink(factory) = decl.factory else {
        return Err(SinkOpenError::NotASink {
            found: decl.kind().as_str(),
        });
    };
    let run_dir = run_dir.to_string_lossy();
    let env = SinkEnv {
        run_dir: RStr::from(run_dir.as_ref()),
        resume_step: resume_step.into(),
    };
    factory(RStr::from(params_json), env)
        .into_result()
        .map_err(|e| SinkOpenError::Failed(super::plugin_message(&e)))
}

/// Build a tracker. It is told about the run later, from its own thread (see
/// [`crate::metrics::MetricsHub::start_tracked`]); only its parameters are checked here, so a
/// bad one stops the run before any work.
pub fn tracker(registry: &Registry, name: &str, params: &serde_json::Value) -> Result<TrackerBox> {
    let entry = lookup(registry, ComponentKind::Tracker, name)?;
    let Factory::Tracker(f) = factory(entry)? else {
        return Err(mismatch(entry, ComponentKind::Tracker));
    };
    let text = params_text(params);
    f(RStr::from(text.as_str()))
        .into_result()
        .map_err(|e| failed(entry, e))
}

/// Build a trainer.
pub fn trainer(registry: &Registry, name: &str, params: &serde_json::Value) -> Result<TrainerBox> {
    let entry = lookup(registry, ComponentKind::Trainer, name)?;
    let Factory::Trainer(f) = factory(entry)? else {
        return Err(mismatch(entry, ComponentKind::Trainer));
    };
    let text = params_text(params);
    f(RStr::from(text.as_str()))
        .into_result()
        .map_err(|e| failed(entry, e))
}

/// Build a kernel.
pub fn kernel(registry: &Registry, name: &str, params: &serde_json::Value) -> Result<KernelBox> {
    let entry = lookup(registry, ComponentKind::Kernel, name)?;
    let Factory::Kernel(f) = factory(entry)? else {
        return Err(mismatch(entry, ComponentKind::Kernel));
    };
    let text = params_text(params);
    f(RStr::from(text.as_str()))
        .into_result()
        .map_err(|e| failed(entry, e))
        .with_context(|| format!("kernel `{name}`"))
}

/// Ask the component of `entry` whether it accepts `params`, without building it. The error
/// is the component's own message (the path of the bad value first, when it names one), or
/// how it panicked.
pub fn check_params(entry: &Entry, params: &serde_json::Value) -> Result<(), String> {
    let text = params_text(params);
    let Maker::Declared(decl) = &entry.maker else {
        return Ok(());
    };
    (decl.check)(RStr::from(text.as_str()))
        .into_result()
        .map_err(|e| match &entry.origin {
            Origin::Builtin { .. } => e.message.into_string(),
            // A plugin's component is named with the plugin, as its other errors are.
            Origin::Native { .. } | Origin::Wasm { .. } => format!(
                "{} ({} `{}` of plugin `{}`)",
                super::plugin_message(&e),
                entry.kind.as_str(),
                entry.name,
                entry.name.split('/').next().unwrap_or_default()
            ),
        })
}

/// Host code computes with the plugin API's [`codex_plugin_api::Tensor`] too; its error type
/// is not a `std::error::Error` (so that `?` converts any error into it), so convert here.
pub trait ApiResultExt<T> {
    /// Into an `anyhow` result.
    fn anyhow(self) -> Result<T>;
}

impl<T> ApiResultExt<T> for codex_plugin_api::Result<T> {
    fn anyhow(self) -> Result<T> {
        self.map_err(|e| anyhow!("{e}"))
    }
}
