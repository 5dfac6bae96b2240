//! Components and where they come from: the one registry, keyed by (kind, name), and one
//! adapter per origin that turns what it loads into registry entries — built-ins
//! (`inventory`, in [`registry`]), native plugins ([`native`], `abi_stable`) and sandboxed
//! WebAssembly plugins ([`wasm`], through `codex-wasm`) — from the plugin [`manifest`].
//! [`build`] builds a component from its entry, whatever its origin: it is the one place
//! factories are called (the metrics hub opens the run's own record through it too).

pub mod build;
pub use codex_formats::manifest;
pub mod native;
pub mod registry;
pub mod wasm;

use std::path::Path;

use manifest::{Manifest, PluginOrigin};
use native::PluginInfo;
pub use registry::{Entry, Origin, Registry, RegistryError};

/// The registry for a command: every built-in, plus the components of the plugins a manifest
/// declares. The manifest is parsed and verified (paths, sha256 pins) before any plugin loads.
pub fn registry_for(manifest: Option<&Path>) -> anyhow::Result<Registry> {
    let mut registry = Registry::with_builtins()?;
    if let Some(path) = manifest {
        let manifest = Manifest::load(path)?;
        load_plugins(&manifest, &mut registry)?;
    }
    Ok(registry)
}

/// Longest part of a plugin's error message shown; the rest is cut.
const MAX_PLUGIN_MESSAGE: usize = 4096;

/// A plugin's error message, cleaned for a terminal and a log (see
/// [`codex_plugin_api::untrusted::clean`]).
pub(crate) fn plugin_message(e: &codex_plugin_api::PluginError) -> String {
    plugin_text(&e.message)
}

/// Any other text a plugin hands the host for a person to read, made safe to print.
pub(crate) fn plugin_text(text: &str) -> String {
    codex_plugin_api::untrusted::clean(text, MAX_PLUGIN_MESSAGE)
}

/// What loading one manifest plugin found.
pub enum Loaded {
    /// A native plugin, loaded; its components are registered as `PLUGIN/NAME`.
    Native(PluginInfo),
    /// A wasm sink, registered under the plugin's name: its own name and version, or why it
    /// cannot be loaded (a run naming it warns and trains on without it).
    Wasm(Result<codex_wasm::Described, String>),
}

/// Load every plugin of `manifest` into `registry`, in manifest order, exactly as a run does.
pub fn load_plugins(manifest: &Manifest, registry: &mut Registry) -> anyhow::Result<Vec<Loaded>> {
    let mut loaded = Vec::with_capacity(manifest.plugins.len());
    for plugin in &manifest.plugins {
        loaded.push(match &plugin.origin {
            PluginOrigin::Native => {
                Loaded::Native(native::load(&plugin.name, &plugin.path, registry)?)
            }
            PluginOrigin::Wasm {
                limits,
                capabilities,
            } => Loaded::Wasm(wasm::register_wasm_sink(
                registry,
                plugin,
                limits,
                capabilities,
            )?),
        });
    }
    Ok(loaded)
}
