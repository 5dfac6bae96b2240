//! `codex-ml list`: what this binary can run, grouped by kind, and what a manifest declares.
//!
//! One row type feeds both outputs, so the table and `--json` never disagree. Plugins from a
//! manifest are listed as a group of their own, after the manifest is checked (parse, files
//! present, sha256 pins): native plugins are loaded exactly as a run loads them, so their
//! components appear under their kinds with the plugin file as origin, and a plugin that cannot
//! load fails the command as it would fail the run. WASM plugins are compiled and checked the
//! same way a run checks them; one that cannot be loaded is listed with the reason, since a run
//! naming it would warn and train on without it.

use std::io::{self, Write};
use std::path::PathBuf;

/// The width the human listing keeps to.
const LINE_WIDTH: usize = 80;

use anyhow::Context;
use clap::{Args, ValueEnum};
use codex_plugin_api::ComponentKind;
use serde::Serialize;

use crate::plugins::manifest::{Capabilities, Manifest, PluginOrigin, PluginSpec, WasmLimits};
use crate::plugins::registry::{Entry, Origin, Registry};
use crate::plugins::Loaded;

pub(crate) const LONG_ABOUT: &str = "List every registered component, grouped by kind: name, \
    version, plugin-API version, origin and a one-line description.\n\n\
    With --manifest, also check the manifest (strict parse, plugin files present, sha256 pins), \
    load its plugins as a run would and list them with their limits and capabilities: a native \
    plugin's components are listed as PLUGIN/NAME with the plugin file as origin; a WASM \
    plugin is compiled and asked for its name and version inside its sandbox, and its sink is \
    listed under the plugin's name.";

/// `codex-ml list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this kind
    #[arg(long, value_name = "KIND", value_enum)]
    pub kind: Option<KindFilter>,
    /// Print a JSON array on stdout, one object per component or plugin, with the fields
    /// kind, name, origin, source, path, version, api_version, description and status
    /// (plugins add sha256, sha256_pinned, limits and capabilities)
    #[arg(long)]
    pub json: bool,
    /// Plugin manifest (RON) to check and whose plugins to list
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
}

/// What `--kind` accepts: a component kind, or `plugin` for the manifest's plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindFilter {
    /// Tokenizers
    Tokenizer,
    /// Models
    Model,
    /// Optimizers
    Optimizer,
    /// Metric sinks
    Sink,
    /// Run trackers
    Tracker,
    /// Training loops
    Trainer,
    /// Fused-op kernels
    Kernel,
    /// Plugins declared by --manifest
    Plugin,
}

impl KindFilter {
    fn component_kind(self) -> Option<ComponentKind> {
        match self {
            KindFilter::Tokenizer => Some(ComponentKind::Tokenizer),
            KindFilter::Model => Some(ComponentKind::Model),
            KindFilter::Optimizer => Some(ComponentKind::Optimizer),
            KindFilter::Sink => Some(ComponentKind::Sink),
            KindFilter::Tracker => Some(ComponentKind::Tracker),
            KindFilter::Trainer => Some(ComponentKind::Trainer),
            KindFilter::Kernel => Some(ComponentKind::Kernel),
            KindFilter::Plugin => None,
        }
    }
}

const REGISTERED: &str = "registered";
const CHECKED: &str = "compiled and checked";
const UNLOADABLE: &str = "cannot be loaded";
const LOADED: &str = "loaded";

/// One line of the listing; also its JSON object.
#[derive(Debug, Serialize)]
struct Row {
    kind: &'static str,
    name: String,
    /// `built-in`, `native` or `wasm`.
    origin: &'static str,
    /// Module that registered a built-in.
    source: Option<String>,
    /// Plugin file.
    path: Option<String>,
    version: Option<String>,
    api_version: Option<String>,
    description: Option<String>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256_pinned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<WasmLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capabilities: Option<Capabilities>,
    /// WASM plugins: what loading the component found.
    #[serde(skip_serializing_if = "Option::is_none")]
    component: Option<WasmCheck>,
}

/// A WASM plugin, compiled and asked for its name and version under its own limits.
#[derive(Debug, Serialize)]
struct WasmCheck {
    /// Whether it is a sink of the `codex:sink` world this build runs.
    loads: bool,
    world: &'static str,
    /// The sink's own name and version, when it loads.
    sink_name: Option<String>,
    sink_version: Option<String>,
    /// Why it does not load; a run naming it warns and goes on without it.
    error: Option<String>,
}

impl WasmCheck {
    fn of(found: &Result<codex_wasm::Described, String>) -> WasmCheck {
        let (sink_name, sink_version, error) = match found {
            Ok(d) => (Some(d.name.clone()), Some(d.version.clone()), None),
            Err(e) => (None, None, Some(e.clone())),
        };
        WasmCheck {
            loads: found.is_ok(),
            world: codex_wasm::WORLD,
            sink_name,
            sink_version,
            error,
        }
    }
}

/// Longest text of a plugin's shown in the table; the rest is cut.
const MAX_SHOWN: usize = 1024;

impl Row {
    /// Every text field that may come from a plugin, made safe for a terminal.
    fn clean(&mut self) {
        let clean = |text: &mut String| *text = codex_plugin_api::untrusted::clean(text, MAX_SHOWN);
        clean(&mut self.name);
        for text in [
            &mut self.source,
            &mut self.path,
            &mut self.version,
            &mut self.api_version,
            &mut self.description,
        ]
        .into_iter()
        .flatten()
        {
            clean(text);
        }
        if let Some(w) = &mut self.component {
            for text in [&mut w.sink_name, &mut w.sink_version, &mut w.error]
                .into_iter()
                .flatten()
            {
                clean(text);
            }
        }
    }

    fn component(entry: &Entry) -> Row {
        let (source, path) = match &entry.origin {
            Origin::Builtin { source } => (Some(source.clone()), None),
            Origin::Native { path } | Origin::Wasm { path } => {
                (None, Some(path.display().to_string()))
            }
        };
        Row {
            kind: entry.kind.as_str(),
            name: entry.name.clone(),
            origin: entry.origin.label(),
            source,
            path,
            version: Some(entry.version.clone()),
            api_version: Some(entry.api_version.to_string()),
            description: Some(entry.description.clone()),
            status: REGISTERED,
            sha256: None,
            sha256_pinned: None,
            limits: None,
            capabilities: None,
            component: None,
        }
    }

    fn plugin(plugin: &PluginSpec, found: &Loaded) -> Row {
        let (limits, capabilities) = match &plugin.origin {
            PluginOrigin::Native => (None, None),
            PluginOrigin::Wasm {
                limits,
                capabilities,
            } => (Some(*limits), Some(capabilities.clone())),
        };
        let (loaded, component) = match found {
            Loaded::Native(info) => (Some(info), None),
            Loaded::Wasm(result) => (None, Some(WasmCheck::of(result))),
        };
        Row {
            kind: "plugin",
            name: plugin.name.clone(),
            origin: plugin.kind().as_str(),
            source: None,
            path: Some(plugin.path.display().to_string()),
            version: loaded.map(|i| i.version.clone()),
            api_version: loaded.map(|i| i.api_version.to_string()),
            description: loaded.map(|i| {
                format!(
                    "`{}` {}: {} components",
                    i.name,
                    i.version,
                    i.components.len()
                )
            }),
            status: match found {
                Loaded::Native(_) => LOADED,
                Loaded::Wasm(Ok(_)) => CHECKED,
                Loaded::Wasm(Err(_)) => UNLOADABLE,
            },
            sha256: Some(plugin.sha256.clone()),
            sha256_pinned: Some(plugin.pinned),
            limits,
            capabilities,
            component,
        }
    }
}

/// Run `codex-ml list`.
pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut registry =
        Registry::with_builtins().context("cannot build the registry of built-in components")?;
    let manifest = match &args.manifest {
        Some(path) => Some(Manifest::load(path).context("invalid plugin manifest")?),
        None => None,
    };
    let loaded = match &manifest {
        Some(m) => crate::plugins::load_plugins(m, &mut registry)?,
        None => Vec::new(),
    };
    let kinds: Vec<ComponentKind> = match args.kind {
        Some(filter) => filter.component_kind().into_iter().collect(),
        None => ComponentKind::ALL.to_vec(),
    };
    let show_plugins = matches!(args.kind, None | Some(KindFilter::Plugin));
    let mut groups: Vec<(&'static str, Vec<Row>)> = kinds
        .iter()
        .map(|&kind| {
            (
                kind.as_str(),
                registry.of_kind(kind).map(Row::component).collect(),
            )
        })
        .collect();
    if show_plugins {
        if let Some(manifest) = &manifest {
            let rows = manifest
                .plugins
                .iter()
                .zip(&loaded)
                .map(|(p, found)| Row::plugin(p, found))
                .collect();
            groups.push(("plugin", rows));
        }
    }

    if args.json {
        let rows: Vec<&Row> = groups.iter().flat_map(|(_, rows)| rows).collect();
        return super::print_json(&rows);
    }
    // Names, versions, descriptions and errors come from plugins: clean them before they
    // reach a terminal. JSON needs nothing more, its escaping is already exact.
    for row in groups.iter_mut().flat_map(|(_, rows)| rows.iter_mut()) {
        row.clean();
    }
    let mut out = io::stdout().lock();
    write_table(
        &mut out,
        &groups,
        manifest.as_ref(),
        args.kind == Some(KindFilter::Plugin),
    )?;
    out.flush()?;
    Ok(())
}

fn write_table(
    out: &mut impl Write,
    groups: &[(&'static str, Vec<Row>)],
    manifest: Option<&Manifest>,
    plugins_asked: bool,
) -> io::Result<()> {
    let components = groups
        .iter()
        .filter(|(kind, _)| *kind != "plugin")
        .flat_map(|(_, rows)| rows);
    let name_width = groups
        .iter()
        .flat_map(|(_, rows)| rows)
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0);
    let version_width = components
        .clone()
        .map(|r| r.version.as_deref().unwrap_or("").len())
        .max()
        .unwrap_or(0);
    let origin_width = components.map(|r| r.origin.len()).max().unwrap_or(0);
    let mut first = true;
    for (kind, rows) in groups {
        if !first {
            writeln!(out)?;
        }
        first = false;
        if *kind == "plugin" {
            write_plugins(out, rows, manifest, name_width)?;
            continue;
        }
        writeln!(out, "{kind}")?;
        if rows.is_empty() {
            writeln!(out, "  (none registered)")?;
        }
        for row in rows {
            let columns = format!(
                "  {:name_width$}  {:version_width$}  api {}  {:origin_width$}",
                row.name,
                row.version.as_deref().unwrap_or(""),
                row.api_version.as_deref().unwrap_or(""),
                row.origin,
            );
            let description = row.description.as_deref().unwrap_or("");
            // A description that would run past 80 columns goes on its own line, indented
            // under the name, so the listing reads in a plain terminal.
            if columns.chars().count() + 2 + description.chars().count() <= LINE_WIDTH {
                writeln!(out, "{columns}  {description}")?;
            } else {
                writeln!(out, "{}", columns.trim_end())?;
                for line in wrap(description, LINE_WIDTH - 6) {
                    writeln!(out, "      {line}")?;
                }
            }
        }
    }
    if plugins_asked && manifest.is_none() {
        writeln!(out, "plugin")?;
        writeln!(out, "  (no manifest given; pass --manifest FILE)")?;
    }
    Ok(())
}

fn write_plugins(
    out: &mut impl Write,
    rows: &[Row],
    manifest: Option<&Manifest>,
    name_width: usize,
) -> io::Result<()> {
    match manifest {
        Some(m) => writeln!(out, "plugin (declared in {})", m.path.display())?,
        None => writeln!(out, "plugin")?,
    }
    if rows.is_empty() {
        writeln!(out, "  (the manifest declares no plugins)")?;
    }
    // One block per plugin, one fact per line, within 80 columns: a 64-digit sha256 and a
    // long path leave no room for a table. Only a path longer than the line runs past it.
    const PAD: &str = "    ";
    let width = LINE_WIDTH - PAD.len();
    for row in rows {
        let pin = match row.sha256_pinned {
            Some(true) => "sha256 pinned",
            _ => "sha256 not pinned",
        };
        writeln!(
            out,
            "  {:name_width$}  {:6}  {}; {pin}",
            row.name, row.origin, row.status,
        )?;
        let mut facts: Vec<String> = Vec::new();
        if let Some(path) = &row.path {
            facts.push(format!("file {path}"));
        }
        if let Some(sha256) = &row.sha256 {
            facts.push(format!("sha256 {sha256}"));
        }
        for fact in facts {
            writeln!(out, "{PAD}{fact}")?;
        }
        if let (Some(description), Some(api)) = (&row.description, &row.api_version) {
            for line in wrap_hanging(&format!("{description}, plugin API {api}"), width) {
                writeln!(out, "{PAD}{line}")?;
            }
        }
        if let Some(l) = &row.limits {
            let fuel = l
                .fuel
                .map_or_else(|| "unmetered".to_owned(), |f| f.to_string());
            let items = [
                format!("memory {} MiB", l.memory_mib),
                format!("{} ms per call", l.call_timeout_ms),
                format!("fuel {fuel}"),
                format!("{} instances", l.max_instances),
                format!("{} tables", l.max_tables),
                format!("returns up to {} bytes", l.max_return_bytes),
                format!("queue {}", l.queue_size),
            ];
            for line in wrap_items("limits: ", &items, ", ", width) {
                writeln!(out, "{PAD}{line}")?;
            }
        }
        if let Some(c) = &row.capabilities {
            for line in wrap_items("capabilities: ", &granted(c), "; ", width) {
                writeln!(out, "{PAD}{line}")?;
            }
        }
        if let Some(w) = &row.component {
            let text = match (&w.sink_name, &w.sink_version, &w.error) {
                (Some(name), Some(version), _) => format!(
                    "component: sink `{name}` {version}, world {}; registered as sink `{}`",
                    w.world, row.name
                ),
                (_, _, error) => format!(
                    "component: cannot be loaded ({}); a run naming it warns and goes on without it",
                    error.as_deref().unwrap_or("unknown reason")
                ),
            };
            for line in wrap_hanging(&text, width) {
                writeln!(out, "{PAD}{line}")?;
            }
        }
    }
    Ok(())
}

/// `label` and then `items` joined by `separator`, broken only between items into lines of
/// at most `width` columns; later lines are indented under the first item. When even the
/// first item does not fit beside the label, the label gets a line of its own and the items
/// follow, indented by two.
fn wrap_items(label: &str, items: &[String], separator: &str, width: usize) -> Vec<String> {
    let pieces: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(i, item)| match i + 1 < items.len() {
            true => format!("{item}{}", separator.trim_end()),
            false => item.clone(),
        })
        .collect();
    let mut lines: Vec<String> = Vec::new();
    let first_fits = pieces
        .first()
        .is_none_or(|p| label.chars().count() + p.chars().count() <= width);
    let (mut line, indent) = if first_fits {
        (label.to_owned(), " ".repeat(label.chars().count()))
    } else {
        lines.push(label.trim_end().to_owned());
        ("  ".to_owned(), "  ".to_owned())
    };
    let mut empty = true;
    for piece in pieces {
        if !empty && line.chars().count() + 1 + piece.chars().count() > width {
            lines.push(std::mem::replace(&mut line, indent.clone()));
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(&piece);
        empty = false;
    }
    lines.push(line);
    lines
}

/// `text` wrapped at spaces into lines of at most `width` columns, later lines indented by two.
fn wrap_hanging(text: &str, width: usize) -> Vec<String> {
    let mut lines = wrap(text, width);
    if lines.len() > 1 {
        let rest = wrap(&lines[1..].join(" "), width.saturating_sub(2));
        lines.truncate(1);
        lines.extend(rest.into_iter().map(|l| format!("  {l}")));
    }
    lines
}

fn granted(c: &Capabilities) -> Vec<String> {
    let mut granted = Vec::new();
    if let Some(file) = &c.output_file {
        granted.push(format!(
            "output file {} in the run directory (up to {} bytes)",
            file.path, file.quota_bytes
        ));
    }
    if let Some(lines) = c.log_lines {
        granted.push(format!("{lines} log lines"));
    }
    if !c.env.is_empty() {
        granted.push(format!("env {}", c.env.join(", ")));
    }
    if c.clock {
        granted.push("clock".to_owned());
    }
    if granted.is_empty() {
        granted.push("none".to_owned());
    }
    granted
}

/// `text` in lines of at most `width` chars, broken at spaces (a longer word stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_wrap_at_spaces_within_the_width() {
        assert_eq!(wrap("one two three four", 9), ["one two", "three", "four"]);
        assert_eq!(
            wrap("averyveryverylongword x", 5),
            ["averyveryverylongword", "x"]
        );
        assert!(wrap("", 10).is_empty());
    }

    #[test]
    fn items_wrap_between_items_under_their_label() {
        let items: Vec<String> = ["memory 16 MiB", "1000 ms per call", "fuel unmetered"]
            .map(str::to_owned)
            .into();
        assert_eq!(
            wrap_items("limits: ", &items, ", ", 40),
            [
                "limits: memory 16 MiB, 1000 ms per call,",
                "        fuel unmetered"
            ]
        );
        assert_eq!(
            wrap_items("caps: ", &["clock".to_owned(), "env A".to_owned()], "; ", 9),
            ["caps:", "  clock;", "  env A"]
        );
        assert_eq!(
            wrap_hanging("one two three four", 9),
            ["one two", "  three", "  four"]
        );
    }
}
