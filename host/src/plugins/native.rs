//! Loading native plugins: shared libraries exporting a `codex_plugin_api` root module.
//!
//! This is where a native plugin file becomes registry entries. The manifest has already
//! checked that the file exists and matches its sha256 pin; loading then checks, in order:
//! that the file is a shared library, that it exports a codex-ml root module, that it was built
//! against a compatible `codex-plugin-api` (abi_stable's crate-version check, then the type
//! layouts of the root module and everything it reaches, then [`ApiVersion::can_load`]), and
//! finally calls its `register` function with the host's op table. Each failure is one short
//! error naming the plugin, its file and both versions; abi_stable's layout report (kilobytes)
//! goes to the debug log only (`-v`).
//!
//! Shaped by abi_stable's traps (see FACTS.md): every file is opened with
//! `lib_header_from_path(..).init_root_module()` — never `RootModule::load_from_*`, which hands a
//! second plugin the first one's module — and libraries are never unloaded, so a plugin's
//! function pointers stay valid for the life of the process. Panics never cross the boundary:
//! the plugin-side glue in `codex-plugin-api` turns them into errors, which arrive here.
//!
//! A plugin's components are registered as `PLUGIN/NAME`, `PLUGIN` being its manifest name,
//! with [`Origin::Native`] pointing at the file. The host's registrar only collects the
//! declarations; they enter the registry after `register` succeeds, so a plugin that fails half
//! way leaves nothing behind.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibHeader, LibraryError};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::RResult;
use codex_plugin_api::component::{Registrar, Registrar_TO};
use codex_plugin_api::plugin::PluginModuleRef;
use codex_plugin_api::{ApiVersion, ComponentDecl, ComponentKind, PluginError, API_VERSION};

use crate::plugins::registry::{Origin, Registry, RegistryError};

/// Why a native plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NativeError {
    /// The file is not a shared library this process can open.
    #[error(
        "plugin `{plugin}`: cannot load {}: {reason}; check that it is a shared library \
         (cdylib) built for this platform",
        path.display()
    )]
    Open {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// A shared library without a codex-ml root module.
    #[error(
        "plugin `{plugin}`: {} is a shared library but not a codex-ml plugin: it exports no \
         root module; define one with `codex_plugin_api::export_plugin!`",
        path.display()
    )]
    NotAPlugin {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
    },
    /// Built against a plugin API this host cannot load.
    #[error(
        "plugin `{plugin}`: {} was built against plugin API {found}, but this codex-ml loads \
         plugin API {}.0 to {expected}; rebuild the plugin against codex-plugin-api {expected}",
        path.display(),
        expected.major
    )]
    ApiVersion {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The host's plugin-API version.
        expected: ApiVersion,
        /// The plugin's.
        found: ApiVersion,
    },
    /// Built against another `codex-plugin-api` crate version than abi_stable accepts.
    #[error(
        "plugin `{plugin}`: {} was built against codex-plugin-api {found}, but this codex-ml \
         uses {expected}; rebuild the plugin against codex-plugin-api {expected}",
        path.display()
    )]
    CrateVersion {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The host's crate version.
        expected: String,
        /// The plugin's.
        found: String,
    },
    /// The types the plugin was built with do not have the layouts this host expects.
    #[error(
        "plugin `{plugin}`: {} does not match this codex-ml's ABI (plugin built against plugin \
         API {found}, host API {expected}): {summary}; rebuild the plugin against \
         codex-plugin-api {expected} (run with -v for the full layout report)",
        path.display(),
        found = found.map_or_else(|| "unknown".to_owned(), |v| v.to_string())
    )]
    Layout {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The host's plugin-API version.
        expected: ApiVersion,
        /// The plugin's, when it could be read.
        found: Option<ApiVersion>,
        /// The last lines of abi_stable's report.
        summary: String,
    },
    /// The root module's constructor failed.
    #[error("plugin `{plugin}`: {} failed to start: {message}", path.display())]
    Init {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// What abi_stable reported.
        message: String,
    },
    /// The plugin's `register` returned an error (a panic inside it included).
    #[error(
        "plugin `{plugin}`: registration failed ({}): {source}; the plugin is not loaded",
        path.display()
    )]
    Register {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The plugin's error.
        source: PluginError,
    },
    /// The plugin declares two components of one kind under one name.
    #[error(
        "plugin `{plugin}` ({}) declares {kind} `{name}` twice; give each component of a \
         plugin its own name",
        path.display(),
        kind = kind.as_str()
    )]
    DeclaredTwice {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The kind.
        kind: ComponentKind,
        /// The name, as the plugin declares it.
        name: String,
    },
    /// A component could not enter the registry (a duplicate name, an invalid name).
    #[error("plugin `{plugin}` ({}): a component cannot be registered", path.display())]
    Registry {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The registry's refusal (boxed: it is large, and rare).
        source: Box<RegistryError>,
    },
}

/// What a plugin file declares, as its root module and `register` report it.
#[derive(Clone)]
pub struct PluginInfo {
    /// The file.
    pub path: PathBuf,
    /// The name the plugin gives itself (the manifest's name is the one components use).
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// The plugin-API version it was built against.
    pub api_version: ApiVersion,
    /// Its components, under the names the plugin gives them (without the `PLUGIN/` prefix).
    pub components: Vec<ComponentDecl>,
}

impl std::fmt::Debug for PluginInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let components: Vec<String> = self
            .components
            .iter()
            .map(|d| format!("{} {}", d.kind().as_str(), d.name))
            .collect();
        f.debug_struct("PluginInfo")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("api_version", &self.api_version)
            .field("components", &components)
            .finish()
    }
}

/// Load the plugin at `path` and register its components into `registry` as `PLUGIN/NAME`,
/// `plugin` being its manifest name. Nothing is registered when any step fails.
pub fn load(plugin: &str, path: &Path, registry: &mut Registry) -> Result<PluginInfo, NativeError> {
    let info = open(plugin, path)?;
    let origin = Origin::Native {
        path: path.to_path_buf(),
    };
    let registry_error = |source| NativeError::Registry {
        plugin: plugin.to_owned(),
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    for (i, decl) in info.components.iter().enumerate() {
        let twice = info.components[..i]
            .iter()
            .any(|d| d.kind() == decl.kind() && d.name == decl.name);
        if twice {
            return Err(NativeError::DeclaredTwice {
                plugin: plugin.to_owned(),
                path: path.to_path_buf(),
                kind: decl.kind(),
                name: decl.name.as_str().to_owned(),
            });
        }
    }
    // Check every name before adding any, so a refused plugin leaves the registry untouched.
    let mut scratch = Registry::new();
    let prefixed: Vec<ComponentDecl> = info
        .components
        .iter()
        .map(|decl| {
            let mut decl = decl.clone();
            decl.name = format!("{plugin}/{}", decl.name).into();
            decl
        })
        .collect();
    for decl in &prefixed {
        scratch
            .add(decl.clone(), origin.clone(), info.api_version)
            .map_err(registry_error)?;
        if let Ok(existing) = registry.get(decl.kind(), decl.name.as_str()) {
            return Err(registry_error(RegistryError::Duplicate {
                kind: existing.kind,
                name: existing.name.clone(),
                first: existing.origin.clone(),
                second: origin,
            }));
        }
    }
    for decl in prefixed {
        registry
            .add(decl, origin.clone(), info.api_version)
            .map_err(registry_error)?;
    }
    tracing::debug!(
        "plugin `{plugin}`: loaded {} ({} {}, plugin API {}), {} components",
        path.display(),
        info.name,
        info.version,
        info.api_version,
        info.components.len()
    );
    Ok(info)
}

/// Open the plugin at `path`, check it, and collect what its `register` declares, without
/// touching any registry. `plugin` names it in errors.
pub fn open(plugin: &str, path: &Path) -> Result<PluginInfo, NativeError> {
    let module = root_module(plugin, path)?;
    let api_version = module.api_version();
    if !API_VERSION.can_load(api_version) {
        return Err(NativeError::ApiVersion {
            plugin: plugin.to_owned(),
            path: path.to_path_buf(),
            expected: API_VERSION,
            found: api_version,
        });
    }
    let mut collector = Collector::default();
    let registered = (module.register())(
        Registrar_TO::from_ptr(&mut collector, TD_Opaque),
        codex_engine::op_table(),
    );
    if let RResult::RErr(source) = registered {
        return Err(NativeError::Register {
            plugin: plugin.to_owned(),
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(PluginInfo {
        path: path.to_path_buf(),
        name: module.name().as_str().to_owned(),
        version: module.version().as_str().to_owned(),
        api_version,
        components: collector.decls,
    })
}

/// The host's registrar: keeps the declarations for [`load`] to check and register.
#[derive(Default)]
struct Collector {
    decls: Vec<ComponentDecl>,
}

impl Registrar for Collector {
    fn add(&mut self, decl: ComponentDecl) -> RResult<(), PluginError> {
        self.decls.push(decl);
        RResult::ROk(())
    }
}

fn root_module(plugin: &str, path: &Path) -> Result<PluginModuleRef, NativeError> {
    let header = lib_header_from_path(path).map_err(|e| library_error(plugin, path, e))?;
    match header.init_root_module::<PluginModuleRef>() {
        Ok(module) => Ok(module),
        Err(LibraryError::AbiInstability(report)) => {
            let report = report.to_string();
            tracing::debug!(
                "plugin `{plugin}` ({}): abi_stable's layout report:\n{report}",
                path.display()
            );
            let found = api_version_unchecked(header);
            if let Some(found) = found.filter(|v| !API_VERSION.can_load(*v)) {
                return Err(NativeError::ApiVersion {
                    plugin: plugin.to_owned(),
                    path: path.to_path_buf(),
                    expected: API_VERSION,
                    found,
                });
            }
            Err(NativeError::Layout {
                plugin: plugin.to_owned(),
                path: path.to_path_buf(),
                expected: API_VERSION,
                found,
                summary: summarize(&report),
            })
        }
        Err(e) => Err(library_error(plugin, path, e)),
    }
}

/// The plugin-API version of a root module whose layout did not match ours, so the error can
/// name it. Sound because the root module's first field is an [`ApiVersion`] in every
/// plugin-API version, past and future: the one promise the layout of `PluginModule` keeps
/// across majors. Nothing else of the module is touched.
fn api_version_unchecked(header: &LibHeader) -> Option<ApiVersion> {
    // SAFETY: only the first field is read, whose type and offset never change (see above).
    let module = unsafe { header.init_root_module_with_unchecked_layout::<PluginModuleRef>() };
    module.ok().map(|m| m.api_version())
}

/// The gist of a layout report: its final `Error:` with what was expected and found, or else
/// its last lines. The report itself is kilobytes of both layouts.
fn summarize(report: &str) -> String {
    let lines: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let text = match lines.iter().rposition(|l| l.starts_with("Error:")) {
        Some(i) => {
            let mut text = lines[i].trim_start_matches("Error:").trim().to_owned();
            let mut first_value = true;
            for line in &lines[i + 1..] {
                match *line {
                    "Expected:" | "Found:" => {
                        text.push_str(if *line == "Found:" {
                            ", found"
                        } else {
                            ": expected"
                        });
                        first_value = true;
                    }
                    value => {
                        text.push_str(if first_value { " " } else { ", " });
                        text.push_str(value);
                        first_value = false;
                    }
                }
            }
            text
        }
        None => lines[lines.len().saturating_sub(3)..].join(" "),
    };
    const MAX: usize = 400;
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        text
    }
}

fn library_error(plugin: &str, path: &Path, error: LibraryError) -> NativeError {
    let plugin = plugin.to_owned();
    let path = path.to_path_buf();
    match error {
        LibraryError::OpenError { err, .. } => NativeError::Open {
            plugin,
            path,
            reason: err.to_string(),
        },
        LibraryError::GetSymbolError { .. } => NativeError::NotAPlugin { plugin, path },
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => NativeError::CrateVersion {
            plugin,
            path,
            expected: expected_version.to_string(),
            found: actual_version.to_string(),
        },
        LibraryError::AbiInstability(report) => {
            let report = report.to_string();
            tracing::debug!("plugin `{plugin}`: abi_stable's layout report:\n{report}");
            NativeError::Layout {
                plugin,
                path,
                expected: API_VERSION,
                found: None,
                summary: summarize(&report),
            }
        }
        other => {
            let message = other.to_string();
            tracing::debug!("plugin `{plugin}`: abi_stable reported:\n{message}");
            NativeError::Init {
                plugin,
                path,
                message: summarize(&message),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_keep_the_final_error_of_a_report() {
        let report = "Layout of found type:\n  fields\n\nError:mismatched package\nExpected:\n    \
                      codex-plugin-api\nFound:\n    fixture-layout\n";
        assert_eq!(
            summarize(report),
            "mismatched package: expected codex-plugin-api, found fixture-layout"
        );
        assert_eq!(summarize("one\ntwo\n\nthree\nfour"), "two three four");
        let long = "x".repeat(1000);
        assert_eq!(summarize(&long).chars().count(), 401);
    }

    #[test]
    fn a_missing_file_is_an_open_error_naming_the_plugin() {
        let error = open("ghost", Path::new("/nonexistent/libghost.so")).expect_err("missing");
        assert!(matches!(error, NativeError::Open { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.starts_with("plugin `ghost`: cannot load /nonexistent/libghost.so"),
            "{text}"
        );
    }
}
