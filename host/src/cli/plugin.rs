//! `codex-ml plugin inspect FILE`: what a native plugin file declares, before anyone writes a
//! manifest entry for it.
//!
//! The file goes through exactly the checks a run applies (library, root module, crate
//! version, layouts, plugin-API version, registration), into a scratch registry so duplicate
//! or invalid names show up too; nothing it declares reaches any run. Loading a native plugin
//! runs its code with this process's privileges, so inspect only files you would also run.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::plugins::native;
use crate::plugins::registry::Registry;

/// `codex-ml plugin`.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// What to do with a plugin.
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// The `plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Show a native plugin file's name, version, plugin-API version and components, without
    /// using it in any run
    Inspect(InspectArgs),
}

/// `codex-ml plugin inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The plugin file (a cdylib: lib*.so, lib*.dylib or *.dll)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print one JSON object on stdout with the fields path, sha256, name, version, api_version
    /// and components (each with kind, name, version and description)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    path: String,
    sha256: String,
    name: String,
    version: String,
    api_version: String,
    components: Vec<Component>,
}

#[derive(Debug, Serialize)]
struct Component {
    kind: &'static str,
    name: String,
    version: String,
    description: String,
}

/// Run `codex-ml plugin ...`.
pub fn plugin(args: PluginArgs) -> anyhow::Result<()> {
    match args.command {
        PluginCommand::Inspect(args) => inspect(&args),
    }
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let path = std::path::absolute(&args.file).unwrap_or_else(|_| args.file.clone());
    if !path.is_file() {
        return Err(super::UsageError(format!(
            "{}: no such plugin file; build the plugin (`cargo build --release -p NAME`) or fix \
             the path",
            path.display()
        ))
        .into());
    }
    let sha256 =
        crate::fsio::sha256_file(&path).with_context(|| format!("hashing {}", path.display()))?;
    let label = file_label(&path);
    let info = native::load(&label, &path, &mut Registry::new())?;
    let report = Report {
        path: path.display().to_string(),
        sha256,
        name: info.name.clone(),
        version: info.version.clone(),
        api_version: info.api_version.to_string(),
        components: info
            .components
            .iter()
            .map(|decl| Component {
                kind: decl.kind().as_str(),
                name: decl.name.as_str().to_owned(),
                version: decl.version.as_str().to_owned(),
                description: decl.description.as_str().to_owned(),
            })
            .collect(),
    };
    if args.json {
        return super::print_json(&report);
    }
    let mut out = io::stdout().lock();
    write_report(&mut out, &report)?;
    out.flush()?;
    Ok(())
}

/// How errors name a plugin that has no manifest entry yet: its file name.
fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn write_report(out: &mut impl Write, r: &Report) -> io::Result<()> {
    writeln!(
        out,
        "plugin {} {} (plugin API {})",
        r.name, r.version, r.api_version
    )?;
    writeln!(out, "  file    {}", r.path)?;
    writeln!(out, "  sha256  {}", r.sha256)?;
    if r.components.is_empty() {
        writeln!(out, "components\n  (none declared)")?;
        return Ok(());
    }
    writeln!(
        out,
        "components (a manifest entry `name: \"PLUGIN\"` registers each as PLUGIN/NAME)"
    )?;
    let kind_width = r.components.iter().map(|c| c.kind.len()).max().unwrap_or(0);
    let name_width = r.components.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let version_width = r
        .components
        .iter()
        .map(|c| c.version.len())
        .max()
        .unwrap_or(0);
    for c in &r.components {
        writeln!(
            out,
            "  {:kind_width$}  {:name_width$}  {:version_width$}  {}",
            c.kind, c.name, c.version, c.description
        )?;
    }
    Ok(())
}
