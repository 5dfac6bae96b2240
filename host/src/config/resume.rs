//! The resume check: which settings a resumed run may change, and which differences between a
//! config and the one its checkpoint was written under are refused.

use serde_json::Value;

use super::reference::shape;
use super::{Config, ConfigError};
use crate::diagnostics::{join_field, Diagnostic};
use codex_formats::config::RawConfig;

impl Config {
    /// Check that this config may continue a run whose checkpoint was written under `saved`,
    /// and list the settings that differ (`train.max_steps: 12 -> 20`, ...).
    ///
    /// Only the settings in `RESUMABLE` may differ: they do not change the computation of
    /// the steps already taken. Any other difference (experiment, seed, data, tokenizer,
    /// model, optimizer, trainer, sequence and batch shape, clipping, schedule, and any
    /// setting added since) is refused, naming the first differing field in the order the
    /// file is written. The device may change, but bitwise-exact continuation holds only on
    /// the device that wrote it.
    ///
    /// With `retune`, the settings in `RETUNABLE` (the learning rate and its schedule) may
    /// differ too: they change only the steps still to come, which is what a run that diverged
    /// needs; without it, the refusal says to pass `--retune`.
    pub fn resume_differences(
        &self,
        saved: &Config,
        retune: bool,
    ) -> Result<Vec<String>, ConfigError> {
        let (old, new) = (saved.to_json()?, self.to_json()?);
        let mut differing = Vec::new();
        differences(&shape::of::<RawConfig>(), "", &old, &new, &mut differing);
        let mut changed = Vec::new();
        for (field, old, new) in differing {
            let retunable = RETUNABLE.contains(&field.as_str());
            if retunable && !retune {
                return Err(ConfigError::Invalid(Box::new(Diagnostic::new(
                    &self.path,
                    Some(field.clone()),
                    format!(
                        "differs from the config of the checkpoint being resumed; {field} \
                         cannot change on resume without --retune, because it sets the learning \
                         rate of the steps taken as well as of those to come: pass --retune to \
                         change it from the checkpoint on (the steps taken stay as they were; \
                         the change is logged and the session's config saved)"
                    ),
                ))));
            }
            if !RESUMABLE.contains(&field.as_str()) && !retunable {
                let values = match (shown(old), shown(new)) {
                    (Some(old), Some(new)) => format!(" ({new} here, {old} in the checkpoint)"),
                    _ => String::new(),
                };
                return Err(ConfigError::Invalid(Box::new(Diagnostic::new(
                    &self.path,
                    Some(field.clone()),
                    format!(
                        "differs from the config of the checkpoint being resumed{values}; {field} \
                         cannot change on resume because the steps already taken depend on it: \
                         resume with the run's own config (codex-ml resume RUN_DIR) or start a \
                         new run"
                    ),
                ))));
            }
            // A new length is allowed, but the schedule decays towards the last step, so it
            // changes the learning rate of the steps still to come: the caller reports it.
            match (shown(old), shown(new)) {
                (Some(old), Some(new)) if old == new => {}
                (Some(old), Some(new)) => changed.push(format!("{field}: {old} -> {new}")),
                _ => changed.push(format!("{field}: changed")),
            }
        }
        Ok(changed)
    }
}

/// Settings a resumed run may change: how long to train, how often to evaluate, checkpoint
/// and log, retention, sinks, trackers, the kernel, the final sample and the device. None of
/// them alters the steps already taken; any other setting, including one added later, must
/// stay as the checkpoint's config has it.
const RESUMABLE: [&str; 12] = [
    "device",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "sinks",
    "trackers",
    "kernel",
    "generate",
];

/// Settings `--retune` lets a resumed run change: the peak learning rate and the schedule. The
/// steps already taken keep theirs (their parameters and optimizer state come from the
/// checkpoint); the steps to come follow the new values.
const RETUNABLE: [&str; 2] = ["optimizer.lr", "train.schedule"];

/// The fields of the struct at `path` whose values differ between `old` and `new` (JSON
/// forms of the raw config), in declaration order. A section is compared whole unless a
/// setting inside it is [`RESUMABLE`].
fn differences<'v>(
    shape: &shape::Shape,
    path: &str,
    old: &'v Value,
    new: &'v Value,
    out: &mut Vec<(String, &'v Value, &'v Value)>,
) {
    let Some(shape::Node::Struct { fields, .. }) = shape.get(path) else {
        return;
    };
    for field in *fields {
        let (a, b) = (&old[field], &new[field]);
        if a == b {
            continue;
        }
        let field = join_field(path, field);
        let inside = |r: &&str| {
            r.strip_prefix(field.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        };
        if RESUMABLE.iter().chain(&RETUNABLE).any(inside) {
            differences(shape, &field, a, b, out);
        } else {
            out.push((field, a, b));
        }
    }
}

/// A setting's value in a resume note: `none`, the text, the number, or the names of a list
/// of components; `None` for a section (reported as changed).
fn shown(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some("none".to_owned()),
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .map(|item| item["name"].as_str())
            .collect::<Option<Vec<_>>>()
            .map(|names| names.join(", ")),
        Value::Object(_) => None,
        other => Some(other.to_string()),
    }
}
