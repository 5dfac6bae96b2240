//! The plugin manifest: which external plugins exist, where, pinned by sha256, and for WASM
//! plugins the limits they run under and the capabilities they are granted.
//!
//! Parsing is strict and goes through the same diagnostics as the experiment config (file,
//! line, column, field). Everything a manifest can get wrong is caught here, before anything is
//! loaded: unknown keys, wrong types, duplicate names, a missing plugin file, a sha256 pin that
//! does not match the file, and WASM-only settings on a native entry (native plugins are trusted
//! code running with the host's privileges, so limits and capabilities would be a false promise).
//!
//! One plugin entry is deserialised by hand rather than derived: which fields are allowed
//! depends on `origin`, and checking it while parsing lets the error point at the offending
//! line instead of at the whole entry. Loading the plugins is the job of the per-origin loaders.

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::diagnostics::{parse_ron, shorten, Diagnostic};

/// A plugin manifest as written on disk.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    /// The plugins. Default: none.
    #[serde(default)]
    plugins: Vec<RawPlugin>,
}

/// One plugin entry (deserialised by [`PluginVisitor`]).
#[derive(Debug)]
pub(crate) struct RawPlugin {
    /// The plugin's name; its components register as `NAME/COMPONENT`. Required.
    name: String,
    /// `native` or `wasm`. Required.
    origin: PluginKind,
    /// The plugin file, relative to the manifest. Required.
    path: String,
    /// Expected sha256 of the file, 64 hex digits. Default: none, not pinned.
    sha256: Option<String>,
    /// WASM only: resource limits. Default: see [`WasmLimits::default`].
    limits: Option<RawLimits>,
    /// WASM only: granted capabilities. Default: none granted.
    capabilities: Option<RawCapabilities>,
}

/// How a plugin is built and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// A `cdylib` loaded in-process: trusted, full speed, the host's privileges.
    Native,
    /// A WebAssembly component run sandboxed.
    Wasm,
}

impl PluginKind {
    /// `native` or `wasm`.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Native => "native",
            PluginKind::Wasm => "wasm",
        }
    }
}

/// WASM resource limits as written on disk; every field defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    /// Linear memory, MiB. Default: 64.
    #[serde(default)]
    memory_mib: Option<u64>,
    /// Wall-clock limit of one call into the plugin, milliseconds. Default: 1000.
    #[serde(default)]
    call_timeout_ms: Option<u64>,
    /// Fuel (instructions, roughly) per call. Default: none, only the time limit applies.
    #[serde(default)]
    fuel: Option<u64>,
    /// Core wasm instances the component may create. Default: 16.
    #[serde(default)]
    max_instances: Option<u32>,
    /// Tables the component may create. Default: 16.
    #[serde(default)]
    max_tables: Option<u32>,
    /// Largest value one call may return, bytes. Default: 1048576 (1 MiB).
    #[serde(default)]
    max_return_bytes: Option<u64>,
    /// Records queued for the plugin before new ones are dropped. Default: 1024.
    #[serde(default)]
    queue_size: Option<usize>,
}

/// WASM capabilities as written on disk; nothing is granted by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCapabilities {
    /// One output file inside the run directory. Default: none.
    #[serde(default)]
    output_file: Option<RawOutputFile>,
    /// Log lines the plugin may emit over the run (quota). Default: none, no logging.
    #[serde(default)]
    log_lines: Option<u64>,
    /// Environment variables the plugin may read, by name. Default: none.
    #[serde(default)]
    env: Vec<String>,
    /// Whether the plugin may read the wall clock. Default: false.
    #[serde(default)]
    clock: bool,
}

/// The output-file capability as written on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutputFile {
    /// File name relative to the run directory; must stay inside it. Required.
    path: String,
    /// Most bytes the plugin may write to it. Default: 16777216 (16 MiB).
    #[serde(default)]
    quota_bytes: Option<u64>,
}

const PLUGIN_FIELDS: &[&str] = &["name", "origin", "path", "sha256", "limits", "capabilities"];
const WASM_ONLY: &[&str] = &["limits", "capabilities"];

impl<'de> Deserialize<'de> for RawPlugin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct("Plugin", PLUGIN_FIELDS, PluginVisitor)
    }
}

struct PluginVisitor;

fn wasm_only<E: de::Error>(field: &str) -> E {
    E::custom(format!(
        "`{field}` is only for wasm plugins and this entry is `origin: native`; remove `{field}` \
         (native plugins run unsandboxed) or make it a wasm plugin"
    ))
}

/// Reads `origin` and refuses `native` when WASM-only fields came earlier in the entry. The
/// check runs inside the value's deserialisation so the error points at the value itself.
struct OriginSeed {
    wasm_field_seen: Option<&'static str>,
}

impl<'de> DeserializeSeed<'de> for OriginSeed {
    type Value = PluginKind;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<PluginKind, D::Error> {
        let kind = PluginKind::deserialize(deserializer)?;
        match (kind, self.wasm_field_seen) {
            (PluginKind::Native, Some(field)) => Err(wasm_only(field)),
            _ => Ok(kind),
        }
    }
}

impl<'de> Visitor<'de> for PluginVisitor {
    type Value = RawPlugin;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a plugin entry like (name: \"lion\", origin: native, path: \"liblion.so\")")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPlugin, A::Error> {
        let mut name: Option<String> = None;
        let mut origin: Option<PluginKind> = None;
        let mut path: Option<String> = None;
        let mut sha256: Option<Option<String>> = None;
        let mut limits: Option<Option<RawLimits>> = None;
        let mut capabilities: Option<Option<RawCapabilities>> = None;
        while let Some(key) = map.next_key::<String>()? {
            let field = PLUGIN_FIELDS
                .iter()
                .copied()
                .find(|f| *f == key)
                .ok_or_else(|| de::Error::unknown_field(&key, PLUGIN_FIELDS))?;
            if WASM_ONLY.contains(&field) && origin == Some(PluginKind::Native) {
                return Err(wasm_only(field));
            }
            let duplicate = match field {
                "name" => name.replace(map.next_value()?).is_some(),
                "origin" => {
                    let wasm_field_seen = [
                        ("limits", limits.is_some()),
                        ("capabilities", capabilities.is_some()),
                    ]
                    .into_iter()
                    .find_map(|(f, seen)| seen.then_some(f));
                    let kind = map.next_value_seed(OriginSeed { wasm_field_seen })?;
                    origin.replace(kind).is_some()
                }
                "path" => path.replace(map.next_value()?).is_some(),
                "sha256" => sha256.replace(map.next_value()?).is_some(),
                "limits" => limits.replace(map.next_value()?).is_some(),
                _ => capabilities.replace(map.next_value()?).is_some(),
            };
            if duplicate {
                return Err(de::Error::duplicate_field(field));
            }
        }
        Ok(RawPlugin {
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            origin: origin.ok_or_else(|| de::Error::missing_field("origin"))?,
            path: path.ok_or_else(|| de::Error::missing_field("path"))?,
            sha256: sha256.flatten(),
            limits: limits.flatten(),
            capabilities: capabilities.flatten(),
        })
    }
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The manifest file, as given.
    pub path: PathBuf,
    /// The plugins, in file order.
    pub plugins: Vec<PluginSpec>,
}

/// One validated plugin entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    /// The plugin's name.
    pub name: String,
    /// The file, absolute.
    pub path: PathBuf,
    /// The file as written in the manifest (relative to it).
    pub declared_path: String,
    /// The sha256 of the file, lowercase hex, computed now.
    pub sha256: String,
    /// Whether the manifest pins the sha256 (it matched, or loading would have failed).
    pub pinned: bool,
    /// Native or WASM, with the WASM settings.
    pub origin: PluginOrigin,
}

/// How a plugin runs.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginOrigin {
    /// Native: trusted, nothing to configure.
    Native,
    /// WASM: sandboxed under these limits with these capabilities.
    Wasm {
        /// Resource limits.
        limits: WasmLimits,
        /// What the plugin may do beyond computing.
        capabilities: Capabilities,
    },
}

impl PluginSpec {
    /// `native` or `wasm`.
    pub fn kind(&self) -> PluginKind {
        match self.origin {
            PluginOrigin::Native => PluginKind::Native,
            PluginOrigin::Wasm { .. } => PluginKind::Wasm,
        }
    }
}

/// Resource limits of one WASM plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WasmLimits {
    /// Linear memory, MiB.
    pub memory_mib: u64,
    /// Wall-clock limit of one call, milliseconds.
    pub call_timeout_ms: u64,
    /// Fuel per call; `None` meters time only.
    pub fuel: Option<u64>,
    /// Core wasm instances.
    pub max_instances: u32,
    /// Tables.
    pub max_tables: u32,
    /// Largest value one call may return, bytes.
    pub max_return_bytes: u64,
    /// Records queued for the plugin before new ones are dropped.
    pub queue_size: usize,
}

impl Default for WasmLimits {
    /// 64 MiB, 1 s per call, no fuel, 16 instances and tables, 1 MiB returned, 1024 queued:
    /// enough for a sink or tracker written in Rust against `wasm32-wasip2`.
    fn default() -> Self {
        WasmLimits {
            memory_mib: 64,
            call_timeout_ms: 1000,
            fuel: None,
            max_instances: 16,
            max_tables: 16,
            max_return_bytes: 1 << 20,
            queue_size: 1024,
        }
    }
}

/// What a WASM plugin may do beyond computing. The default grants nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// One output file inside the run directory.
    pub output_file: Option<OutputFile>,
    /// Log lines the plugin may emit over the run; `None`: no logging.
    pub log_lines: Option<u64>,
    /// Environment variables it may read.
    pub env: Vec<String>,
    /// Whether it may read the wall clock.
    pub clock: bool,
}

/// The output-file capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputFile {
    /// Relative to the run directory, never outside it.
    pub path: String,
    /// Most bytes the plugin may write.
    pub quota_bytes: u64,
}

/// Default quota of the output-file capability: 16 MiB.
pub const DEFAULT_OUTPUT_QUOTA: u64 = 16 << 20;

/// Errors reading and validating a manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The manifest could not be read.
    #[error("cannot read manifest {}: {source}; check the path", path.display())]
    Read {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A parse or validation error in the manifest.
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
    /// A plugin file is missing or unreadable.
    #[error(
        "{}: plugin `{name}`: cannot read {}: {source}; build the plugin or fix its `path` \
         (relative to the manifest)",
        manifest.display(),
        shown(path)
    )]
    PluginFile {
        /// The manifest.
        manifest: PathBuf,
        /// The entry.
        name: String,
        /// The plugin file, resolved.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The plugin file's sha256 is not the pinned one.
    #[error(
        "{}: plugin `{name}`: sha256 mismatch for {}: expected {expected}, actual {actual}; \
         if the file was rebuilt on purpose, update `sha256` in the manifest",
        manifest.display(),
        shown(path)
    )]
    Sha256Mismatch {
        /// The manifest.
        manifest: PathBuf,
        /// The entry.
        name: String,
        /// The plugin file, resolved.
        path: PathBuf,
        /// The pin.
        expected: String,
        /// The file's digest.
        actual: String,
    },
}

/// A plugin path as written in the manifest, for a message: on one line (a RON string may hold
/// newlines and control characters, which would forge or garble terminal lines) and short.
fn shown(path: &Path) -> String {
    shorten(&path.display().to_string(), 200)
}

impl Manifest {
    /// Read and validate the manifest at `path`: parse strictly, check every entry, hash every
    /// plugin file and compare it with its pin.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let source = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Manifest::from_source(path, &source)
    }

    /// Like [`Manifest::load`] with the text already read; `path` names the manifest in
    /// errors and anchors the plugin paths.
    pub fn from_source(path: &Path, source: &str) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = parse_ron(path, source).map_err(ManifestError::Invalid)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let invalid = |field: String, message: String| {
            ManifestError::Invalid(Box::new(Diagnostic::new(path, Some(field), message)))
        };
        let mut plugins: Vec<PluginSpec> = Vec::with_capacity(raw.plugins.len());
        for (i, entry) in raw.plugins.into_iter().enumerate() {
            let field = |name: &str| format!("plugins[{i}].{name}");
            check_name(&entry.name).map_err(|m| invalid(field("name"), m))?;
            if let Some(first) = plugins.iter().position(|p| p.name == entry.name) {
                return Err(invalid(
                    field("name"),
                    format!(
                        "plugin `{}` is declared twice (plugins[{first}] and plugins[{i}]: {} \
                         and {}); names must be unique, rename or remove one",
                        entry.name, plugins[first].declared_path, entry.path
                    ),
                ));
            }
            let pin = entry
                .sha256
                .as_deref()
                .map(check_sha256)
                .transpose()
                .map_err(|m| invalid(field("sha256"), m))?;
            let origin = match entry.origin {
                PluginKind::Native => PluginOrigin::Native,
                PluginKind::Wasm => PluginOrigin::Wasm {
                    limits: limits(entry.limits)
                        .map_err(|(f, m)| invalid(field(&format!("limits.{f}")), m))?,
                    capabilities: capabilities(entry.capabilities)
                        .map_err(|(f, m)| invalid(field(&format!("capabilities.{f}")), m))?,
                },
            };
            if let PluginOrigin::Wasm {
                capabilities:
                    Capabilities {
                        output_file: Some(out),
                        ..
                    },
                ..
            } = &origin
            {
                let other = plugins
                    .iter()
                    .enumerate()
                    .find_map(|(j, p)| match &p.origin {
                        PluginOrigin::Wasm {
                            capabilities:
                                Capabilities {
                                    output_file: Some(theirs),
                                    ..
                                },
                            ..
                        } if grants_overlap(&out.path, &theirs.path) => Some((j, p, &theirs.path)),
                        _ => None,
                    });
                if let Some((j, p, theirs)) = other {
                    return Err(invalid(
                        field("capabilities.output_file.path"),
                        format!(
                            "`{}` is also granted to plugin `{}` (plugins[{j}]: `{theirs}`); two \
                             plugins may not share an output file or write inside each other's \
                             directory: give each plugin a path of its own",
                            out.path, p.name
                        ),
                    ));
                }
            }
            if entry.path.trim().is_empty() {
                return Err(invalid(
                    field("path"),
                    "the path is empty; name the plugin file".to_owned(),
                ));
            }
            let file = dir.join(&entry.path);
            let sha256 = crate::sha256_file(&file).map_err(|source| ManifestError::PluginFile {
                manifest: path.to_owned(),
                name: entry.name.clone(),
                path: file.clone(),
                source,
            })?;
            if let Some(expected) = &pin {
                if *expected != sha256 {
                    return Err(ManifestError::Sha256Mismatch {
                        manifest: path.to_owned(),
                        name: entry.name,
                        path: file,
                        expected: expected.clone(),
                        actual: sha256,
                    });
                }
            }
            plugins.push(PluginSpec {
                name: entry.name,
                path: file,
                declared_path: entry.path,
                sha256,
                pinned: pin.is_some(),
                origin,
            });
        }
        Ok(Manifest {
            path: path.to_owned(),
            plugins,
        })
    }
}

/// The parts of a granted path that name something, for comparing paths: `./a//b` and `a/b`
/// are one file. Compared without case, since a run directory may live on a file system that
/// ignores it.
fn path_parts(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().to_lowercase()),
            _ => None,
        })
        .collect()
}

/// What the host writes at `path` in a run directory (a granted path, already known to stay
/// inside it), if anything: `rundir.rs` and the run record name these files, and the host's
/// temporary files start with a dot (`fsio`).
fn host_file(path: &str) -> Option<&'static str> {
    let parts = path_parts(path);
    let first = parts.first()?.as_str();
    let numbered = |stem: &str, ext: &str| {
        first
            .strip_prefix(stem)
            .and_then(|rest| rest.strip_suffix(ext))
            .and_then(|n| n.strip_prefix("resume-"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    Some(match first {
        "metrics.ndjson" => "the run's record of metrics",
        "metrics.csv" => "the metrics table of the `csv` sink",
        "config.ron" => "the run's resolved config",
        "metadata.json" => "the run's metadata",
        "log.txt" => "the run's log",
        "tokenizer.json" => "the run's tokenizer",
        "checkpoints" => "the checkpoints directory",
        "run.lock" => "the run directory's lock",
        _ if numbered("config.", ".ron") => "the config of a resumed session",
        _ if numbered("metadata.", ".json") => "the metadata of a resumed session",
        _ if first.starts_with('.') => "a hidden file, the form of the host's temporary files",
        _ => return None,
    })
}

/// Two output grants that would share a file: the same path, or one inside the other.
fn grants_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (path_parts(a), path_parts(b));
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// Plugin names prefix their components' names (`lion/lion`), so they stay simple.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid plugin name; use lowercase letters, digits, `-` and `_`, \
             starting with a letter"
        ))
    }
}

/// A pin is 64 hex digits; case does not matter, it is compared in lowercase.
fn check_sha256(pin: &str) -> Result<String, String> {
    if pin.len() == 64 && pin.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(pin.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{pin}` is not a sha256 (64 hex digits); compute it with `sha256sum FILE`"
        ))
    }
}

fn positive<T: PartialEq + Default + Copy>(
    field: &'static str,
    value: Option<T>,
    default: T,
) -> Result<T, (&'static str, String)> {
    match value {
        Some(v) if v == T::default() => Err((field, "must be at least 1".to_owned())),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn limits(raw: Option<RawLimits>) -> Result<WasmLimits, (&'static str, String)> {
    let d = WasmLimits::default();
    let Some(raw) = raw else { return Ok(d) };
    Ok(WasmLimits {
        memory_mib: positive("memory_mib", raw.memory_mib, d.memory_mib)?,
        call_timeout_ms: positive("call_timeout_ms", raw.call_timeout_ms, d.call_timeout_ms)?,
        fuel: match raw.fuel {
            Some(0) => {
                return Err((
                    "fuel",
                    "must be at least 1; leave it out to meter time only".to_owned(),
                ))
            }
            fuel => fuel,
        },
        max_instances: positive("max_instances", raw.max_instances, d.max_instances)?,
        max_tables: positive("max_tables", raw.max_tables, d.max_tables)?,
        max_return_bytes: positive("max_return_bytes", raw.max_return_bytes, d.max_return_bytes)?,
        queue_size: positive("queue_size", raw.queue_size, d.queue_size)?,
    })
}

fn capabilities(raw: Option<RawCapabilities>) -> Result<Capabilities, (&'static str, String)> {
    let Some(raw) = raw else {
        return Ok(Capabilities::default());
    };
    let output_file = match raw.output_file {
        None => None,
        Some(out) => {
            let inside = !out.path.is_empty()
                && Path::new(&out.path)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside {
                return Err((
                    "output_file.path",
                    format!(
                        "`{}` must be a relative path inside the run directory (no `..`, not absolute)",
                        out.path
                    ),
                ));
            }
            if let Some(what) = host_file(&out.path) {
                return Err((
                    "output_file.path",
                    format!(
                        "`{}` names {what}, which codex-ml writes in the run directory; a grant \
                         may not name a file or directory the host writes: grant a path of the \
                         plugin's own, such as `<plugin>/{}`",
                        out.path,
                        out.path.trim_start_matches("./")
                    ),
                ));
            }
            Some(OutputFile {
                path: out.path,
                quota_bytes: positive(
                    "output_file.quota_bytes",
                    out.quota_bytes,
                    DEFAULT_OUTPUT_QUOTA,
                )?,
            })
        }
    };
    if let Some(name) = raw
        .env
        .iter()
        .find(|n| n.is_empty() || n.contains('=') || n.contains('\0'))
    {
        return Err((
            "env",
            format!("`{name}` is not an environment variable name"),
        ));
    }
    Ok(Capabilities {
        output_file,
        log_lines: raw.log_lines,
        env: raw.env,
        clock: raw.clock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `manifest` fuzz target: a plugin path holding newlines and control
    /// characters was printed raw in the "cannot read" error, over nine lines.
    #[test]
    fn a_plugin_path_is_shown_on_one_short_line() {
        let source =
            include_str!("../../tests/fixtures/fuzz/manifest/control-characters-in-path.ron");
        let error = Manifest::from_source(Path::new("/nonexistent/plugins.ron"), source)
            .expect_err("no such plugin file")
            .to_string();
        assert_eq!(error.lines().count(), 1, "{error}");
        assert!(!error.contains(['\0', '\u{1}']), "{error}");
        let long = format!(
            "(plugins: [(name: \"a\", origin: native, path: \"{}\")])",
            "p".repeat(5000)
        );
        let error = Manifest::from_source(Path::new("/nonexistent/plugins.ron"), &long)
            .expect_err("no such plugin file")
            .to_string();
        assert!(error.len() < 600, "{} bytes: {error}", error.len());
    }

    #[test]
    fn plugin_names_are_checked() {
        for (name, ok) in [
            ("lion", true),
            ("my-sink_2", true),
            ("", false),
            ("Lion", false),
            ("a/b", false),
            ("2x", false),
        ] {
            assert_eq!(check_name(name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn pins_are_64_hex_digits_in_any_case() {
        let upper = "AB".repeat(32);
        assert_eq!(check_sha256(&upper), Ok("ab".repeat(32)));
        assert!(check_sha256("abc").is_err());
        assert!(check_sha256(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn limits_default_field_by_field() {
        let raw = RawLimits {
            memory_mib: Some(8),
            call_timeout_ms: None,
            fuel: Some(1000),
            max_instances: None,
            max_tables: None,
            max_return_bytes: None,
            queue_size: Some(4),
        };
        let l = limits(Some(raw)).expect("valid");
        assert_eq!(
            l,
            WasmLimits {
                memory_mib: 8,
                fuel: Some(1000),
                queue_size: 4,
                ..WasmLimits::default()
            }
        );
    }

    #[test]
    fn output_grants_may_not_name_what_the_host_writes() {
        for (path, host) in [
            ("metrics.ndjson", true),
            ("./metrics.ndjson", true),
            ("Metrics.NDJSON", true),
            ("metrics.csv", true),
            ("config.ron", true),
            ("config.resume-2.ron", true),
            ("metadata.json", true),
            ("metadata.resume-1.json", true),
            ("log.txt", true),
            ("tokenizer.json", true),
            ("checkpoints", true),
            ("checkpoints/step-00000010/model.safetensors", true),
            ("run.lock", true),
            (".metrics.ndjson.tmp-abc", true),
            ("summary.md", false),
            ("reports/metrics.ndjson", false),
            ("config.resume-x.ron", false),
            ("checkpoints.md", false),
        ] {
            assert_eq!(host_file(path).is_some(), host, "{path:?}");
        }
    }

    #[test]
    fn overlapping_grants_are_detected() {
        for (a, b, overlap) in [
            ("a.md", "a.md", true),
            ("./a.md", "a.md", true),
            ("out", "out/a.md", true),
            ("out/a.md", "OUT", true),
            ("a.md", "b.md", false),
            ("out/a.md", "out/b.md", false),
            ("out", "output", false),
        ] {
            assert_eq!(grants_overlap(a, b), overlap, "{a:?} {b:?}");
        }
    }

    #[test]
    fn output_file_must_stay_in_the_run_directory() {
        for (path, ok) in [
            ("out/x.txt", true),
            ("./x", true),
            ("../x", false),
            ("/tmp/x", false),
            ("", false),
        ] {
            let raw = RawCapabilities {
                output_file: Some(RawOutputFile {
                    path: path.to_owned(),
                    quota_bytes: None,
                }),
                log_lines: None,
                env: vec![],
                clock: false,
            };
            assert_eq!(capabilities(Some(raw)).is_ok(), ok, "{path:?}");
        }
    }
}
