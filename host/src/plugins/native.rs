//! Loading native plugins: shared libraries exporting a `codex_plugin_api` root module.
//!
//! This is where a native plugin file becomes registry entries. The manifest has already
//! checked that the file exists and matches its sha256 pin; loading then checks, in order:
//! that the file is a shared library, that it exports a codex-ml root module, that it was built
//! against a compatible `codex-plugin-api` (abi_stable's crate-version check, then the type
//! layouts of the root module and everything it reaches, then [`ApiVersion::can_load`]), and
//! finally calls its `register` function with the host's op table. Each failure is one short
//! error naming the plugin, its file and both versions — the plugin API's (`plugin API 2.0`)
//! and the crate's (`crate codex-plugin-api 0.2.0`), never one for the other — and, for a
//! layout mismatch, the type whose layout differs; abi_stable's layout report (kilobytes) goes
//! to the debug log only (`-v`).
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

use abi_stable::library::{lib_header_from_path, LibHeader, LibraryError, RootModule};
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
        "plugin `{plugin}`: {} was built against plugin API {found} (crate codex-plugin-api \
         {found_crate}), but this codex-ml loads plugin API {} (crate codex-plugin-api {}); \
         rebuild the plugin against crate codex-plugin-api {}",
        path.display(),
        Loadable(*expected),
        host_crate(),
        host_crate()
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
        /// The `codex-plugin-api` crate version the plugin was built against.
        found_crate: String,
    },
    /// Built against another `codex-plugin-api` crate version than abi_stable accepts.
    #[error(
        "plugin `{plugin}`: {} was built against crate codex-plugin-api {found}{}, but this \
         codex-ml uses crate codex-plugin-api {expected} (plugin API {expected_api}); rebuild \
         the plugin against crate codex-plugin-api {expected}",
        path.display(),
        found_api.map_or_else(String::new, |v| format!(" (plugin API {v})"))
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
        /// The host's plugin-API version.
        expected_api: ApiVersion,
        /// The plugin's, when it could be read.
        found_api: Option<ApiVersion>,
    },
    /// The types the plugin was built with do not have the layouts this host expects.
    #[error(
        "plugin `{plugin}`: {} does not match this codex-ml's ABI: {mismatch}; the plugin \
         states plugin API {} (crate codex-plugin-api {found_crate}), this codex-ml has plugin \
         API {expected} (crate codex-plugin-api {}): rebuild the plugin against an unmodified \
         crate codex-plugin-api {} (run with -v for the full layout report)",
        path.display(),
        found.map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
        host_crate(),
        host_crate()
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
        /// The `codex-plugin-api` crate version the plugin was built against.
        found_crate: String,
        /// What differs, from abi_stable's report (boxed: it is large, and rare).
        mismatch: Box<LayoutMismatch>,
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
        "plugin `{plugin}`: registration failed ({}): {}; the plugin is not loaded",
        path.display(),
        super::plugin_message(error)
    )]
    Register {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The plugin's error (not a `source`: its text is the plugin's, shown cleaned only).
        error: PluginError,
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
    let (module, found_crate) = root_module(plugin, path)?;
    let api_version = module.api_version();
    if !API_VERSION.can_load(api_version) {
        return Err(NativeError::ApiVersion {
            plugin: plugin.to_owned(),
            path: path.to_path_buf(),
            expected: API_VERSION,
            found: api_version,
            found_crate,
        });
    }
    let mut collector = Collector::default();
    let registered = (module.register())(
        Registrar_TO::from_ptr(&mut collector, TD_Opaque),
        codex_engine::op_table(),
    );
    if let RResult::RErr(error) = registered {
        return Err(NativeError::Register {
            plugin: plugin.to_owned(),
            path: path.to_path_buf(),
            error,
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

/// The `codex-plugin-api` crate version this host was built with: the version abi_stable
/// compares a plugin's with.
fn host_crate() -> &'static str {
    <PluginModuleRef as RootModule>::VERSION_STRINGS
        .version
        .as_str()
}

/// The plugin-API versions a host loads, for messages: `2.0`, or `2.0 to 2.3`.
struct Loadable(ApiVersion);

impl std::fmt::Display for Loadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ApiVersion { major, minor } = self.0;
        if minor == 0 {
            write!(f, "{major}.0")
        } else {
            write!(f, "{major}.0 to {major}.{minor}")
        }
    }
}

/// The checked root module of the plugin at `path`, and the `codex-plugin-api` crate version
/// the plugin was built against.
fn root_module(plugin: &str, path: &Path) -> Result<(PluginModuleRef, String), NativeError> {
    let header = lib_header_from_path(path).map_err(|e| library_error(plugin, path, e))?;
    let found_crate = header.version_strings().version.as_str().to_owned();
    match header.init_root_module::<PluginModuleRef>() {
        Ok(module) => Ok((module, found_crate)),
        Err(LibraryError::AbiInstability(report)) => {
            let report = report.to_string();
            tracing::debug!(
                "plugin `{plugin}` ({}): abi_stable's layout report:\n{report}",
                path.display()
            );
            // SAFETY: abi_stable's version check passed (it runs before the layout check).
            let found = unsafe { api_version_unchecked(header) };
            if let Some(found) = found.filter(|v| !API_VERSION.can_load(*v)) {
                return Err(NativeError::ApiVersion {
                    plugin: plugin.to_owned(),
                    path: path.to_path_buf(),
                    expected: API_VERSION,
                    found,
                    found_crate,
                });
            }
            Err(NativeError::Layout {
                plugin: plugin.to_owned(),
                path: path.to_path_buf(),
                expected: API_VERSION,
                found,
                found_crate,
                mismatch: Box::new(summarize_layout(&report)),
            })
        }
        Err(LibraryError::IncompatibleVersionNumber { .. }) => {
            // SAFETY: as above; the version check failed, but the root module's first field
            // is the same in every crate version (see `api_version_unchecked`).
            let found_api = unsafe { api_version_unchecked(header) };
            match found_api.filter(|v| !API_VERSION.can_load(*v)) {
                Some(found) => Err(NativeError::ApiVersion {
                    plugin: plugin.to_owned(),
                    path: path.to_path_buf(),
                    expected: API_VERSION,
                    found,
                    found_crate,
                }),
                None => Err(NativeError::CrateVersion {
                    plugin: plugin.to_owned(),
                    path: path.to_path_buf(),
                    expected: host_crate().to_owned(),
                    found: found_crate,
                    expected_api: API_VERSION,
                    found_api,
                }),
            }
        }
        Err(e) => Err(library_error(plugin, path, e)),
    }
}

/// The plugin-API version of a root module whose crate version or layout did not match ours,
/// so the error can name it. Nothing else of the module is touched.
///
/// # Safety
///
/// Sound because the root module's first field is an [`ApiVersion`] in every plugin-API
/// version and every version of the `codex-plugin-api` crate, past and future: the one promise
/// the layout of `PluginModule` keeps across majors. The library must have been opened by
/// abi_stable (a valid `LibHeader`).
unsafe fn api_version_unchecked(header: &LibHeader) -> Option<ApiVersion> {
    // SAFETY: only the first field is read, whose type and offset never change (see above).
    let module = unsafe { header.unchecked_layout::<PluginModuleRef>() };
    module.ok().map(|m| m.api_version())
}

/// What an abi_stable layout report says, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutMismatch {
    /// The type whose layout differs, with its module path
    /// (`codex_plugin_api::plugin::PluginModule`), when the report names it.
    pub type_name: Option<String>,
    /// What differs about it, expected and found.
    pub gist: String,
}

impl std::fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.type_name {
            Some(t) => write!(f, "the layout of `{t}` differs: {}", self.gist),
            None => f.write_str(&self.gist),
        }
    }
}

/// The gist of an abi_stable layout report. The report ends with one block per type where a
/// difference was found, from the outside in; the last block holds the path of fields leading
/// to the difference (from the compared root type), the layout of the type found there, and
/// the final `Error:` with what was expected and found. The type named is the one whose
/// layout differs: the type found at the end of the path, or — when the error is that a field
/// has another type (`mismatched type`) — the type holding that field. The report itself is
/// kilobytes of both layouts.
fn summarize_layout(report: &str) -> LayoutMismatch {
    let lines: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let is_count = |l: &&str| {
        l.split_once(" error(s)")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let block = &lines[lines.iter().rposition(is_count).unwrap_or(0)..];
    let layout_at = block.iter().position(|l| *l == "Layout of expected type:");
    // (field, type) pairs from the root type to the difference.
    let path: Vec<(&str, &str)> = block[..layout_at.unwrap_or(block.len())]
        .windows(2)
        .filter_map(|w| {
            let field = w[0].strip_prefix("field_name:")?;
            let ty = w[1].strip_prefix("type:")?;
            Some((field.trim(), ty.trim()))
        })
        .collect();
    let error = block.iter().rev().find_map(|l| l.strip_prefix("Error:"));
    let gist = summarize(report);
    let (type_name, gist) = if error.map(str::trim) == Some("mismatched type") && !path.is_empty() {
        // A field whose type was replaced: the type holding it changed.
        let (field, _) = path[path.len() - 1];
        let holder = match path.len() {
            1 => header_type(&lines, "Compared <this>:"),
            n => Some(path[n - 2].1),
        };
        (holder, format!("field `{field}`: {gist}"))
    } else {
        let found = layout_at
            .and_then(|i| block[i + 1..].iter().find_map(|l| l.strip_prefix("type:")))
            .map(str::trim)
            .or_else(|| header_type(&lines, "Compared <this>:"));
        (found, gist)
    };
    LayoutMismatch {
        type_name: type_name.map(|t| qualify(&lines, t)),
        gist,
    }
}

/// The type of the layout printed after the line `heading`.
fn header_type<'a>(lines: &[&'a str], heading: &str) -> Option<&'a str> {
    let at = lines.iter().position(|l| *l == heading)?;
    lines[at + 1..]
        .iter()
        .find_map(|l| l.strip_prefix("type:"))
        .map(str::trim)
}

/// `ty` with its module path (`codex_plugin_api::plugin::PluginModule`), taken from a layout of
/// it printed in the report (`type:PluginModule` ... `line:46 mod:codex_plugin_api::plugin`).
fn qualify(lines: &[&str], ty: &str) -> String {
    let module = lines.iter().enumerate().find_map(|(i, l)| {
        if l.strip_prefix("type:").map(str::trim) != Some(ty) {
            return None;
        }
        // The header of a layout: `type:`, `size:`, `package:`, then `line: mod:`.
        lines[i + 1..]
            .iter()
            .take(3)
            .find_map(|l| l.split_once(" mod:").map(|(_, m)| m.trim()))
    });
    match module {
        Some(m) if !m.is_empty() && !m.starts_with('<') && !ty.contains("::") => {
            format!("{m}::{ty}")
        }
        _ => ty.to_owned(),
    }
}

/// The gist of a report: its final `Error:` with what was expected and found, or else its last
/// lines; at most a few hundred characters.
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
            expected_api: API_VERSION,
            found_api: None,
        },
        LibraryError::AbiInstability(report) => {
            let report = report.to_string();
            tracing::debug!("plugin `{plugin}`: abi_stable's layout report:\n{report}");
            NativeError::Layout {
                plugin,
                path,
                expected: API_VERSION,
                found: None,
                found_crate: "unknown".to_owned(),
                mismatch: Box::new(summarize_layout(&report)),
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

    /// Two versions of one interface whose inner type changed, as two builds of
    /// codex-plugin-api would have it: the same names and package, another field type.
    mod v1 {
        #[repr(C)]
        #[derive(abi_stable::StableAbi)]
        pub(super) struct Outer {
            pub(super) id: u32,
            pub(super) inner: Inner,
        }
        #[repr(C)]
        #[derive(abi_stable::StableAbi)]
        pub(super) struct Inner {
            pub(super) value: u32,
        }
    }
    mod v2 {
        #[repr(C)]
        #[derive(abi_stable::StableAbi)]
        pub(super) struct Outer {
            pub(super) id: u32,
            pub(super) inner: Inner,
        }
        #[repr(C)]
        #[derive(abi_stable::StableAbi)]
        pub(super) struct Inner {
            pub(super) value: u64,
        }
    }

    #[test]
    fn a_layout_summary_names_the_type_that_changed_and_what_differs() {
        use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
        use abi_stable::StableAbi;
        let report = check_layout_compatibility(
            <v1::Outer as StableAbi>::LAYOUT,
            <v2::Outer as StableAbi>::LAYOUT,
        )
        .expect_err("the layouts differ")
        .to_string();
        assert!(report.len() > 1000, "a report is long: {report}");
        let summary = summarize_layout(&report);
        assert_eq!(
            summary.type_name.as_deref(),
            Some("codex_host::plugins::native::tests::v1::Inner"),
            "{report}"
        );
        assert_eq!(
            summary.gist,
            "field `value`: mismatched type: expected u32, found u64"
        );

        // A mismatch of the compared type itself has no "Layout of expected type".
        let root = "Compared <this>:\n    --- Type Layout ---\n    type:PluginModule\n    \
                    size:48 align:8\n    line:46 mod:codex_plugin_api::plugin\n    data:\n\
                    To <other>:\n\n1 error(s).\n\nError:too many fields\nExpected:\n    3\n\
                    Found:\n    4\n";
        assert_eq!(
            summarize_layout(root),
            LayoutMismatch {
                type_name: Some("codex_plugin_api::plugin::PluginModule".into()),
                gist: "too many fields: expected 3, found 4".into(),
            }
        );
    }

    #[test]
    fn versions_are_named_as_plugin_api_or_crate_never_mixed() {
        let path = PathBuf::from("/p/libx.so");
        let api = |major, minor| ApiVersion { major, minor };
        let text = NativeError::ApiVersion {
            plugin: "x".into(),
            path: path.clone(),
            expected: api(2, 3),
            found: api(1, 1),
            found_crate: "0.1.0".into(),
        }
        .to_string();
        let host = host_crate();
        assert_eq!(
            text,
            format!(
                "plugin `x`: /p/libx.so was built against plugin API 1.1 (crate codex-plugin-api \
                 0.1.0), but this codex-ml loads plugin API 2.0 to 2.3 (crate codex-plugin-api \
                 {host}); rebuild the plugin against crate codex-plugin-api {host}"
            )
        );
        let text = NativeError::CrateVersion {
            plugin: "x".into(),
            path: path.clone(),
            expected: "0.2.0".into(),
            found: "0.1.4".into(),
            expected_api: api(2, 0),
            found_api: None,
        }
        .to_string();
        assert_eq!(
            text,
            "plugin `x`: /p/libx.so was built against crate codex-plugin-api 0.1.4, but this \
             codex-ml uses crate codex-plugin-api 0.2.0 (plugin API 2.0); rebuild the plugin \
             against crate codex-plugin-api 0.2.0"
        );
        assert_eq!(Loadable(api(2, 0)).to_string(), "2.0");
        assert!(host_crate().starts_with("0."), "{}", host_crate());
    }

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
