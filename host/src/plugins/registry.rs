//! The one registry of components, keyed by (kind, name).
//!
//! Whatever its origin — compiled in, native plugin, WASM plugin — a component arrives as a
//! [`ComponentDecl`] and is stored the same way; only [`Origin`] remembers where it came from,
//! for `codex-ml list`, for error messages and for the run's plugin lock. The registry is a
//! plain map with no loading logic: the loaders for each origin call [`Registry::add`].
//!
//! Two rules keep runs unambiguous: a (kind, name) is registered once (a duplicate is an error
//! naming both origins, never a silent override), and an unknown name is an error listing the
//! known names of that kind, with a suggestion when one is close.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use codex_plugin_api::sink::SinkBox;
use codex_plugin_api::{ApiVersion, ComponentDecl, ComponentKind, API_VERSION};

use crate::diagnostics::{backticked, did_you_mean};
use crate::plugins::manifest::{PluginOrigin, PluginSpec};

/// Where a registered component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compiled into the binary; `source` is the `module_path!()` of its registration.
    Builtin {
        /// The module that registered it.
        source: String,
    },
    /// A native plugin (`cdylib`) at `path`.
    Native {
        /// The plugin file.
        path: PathBuf,
    },
    /// A WASM plugin at `path`.
    Wasm {
        /// The plugin file.
        path: PathBuf,
    },
}

impl Origin {
    /// The origin of the components of the manifest plugin `spec`.
    pub fn of_plugin(spec: &PluginSpec) -> Origin {
        match spec.origin {
            PluginOrigin::Native => Origin::Native {
                path: spec.path.clone(),
            },
            PluginOrigin::Wasm { .. } => Origin::Wasm {
                path: spec.path.clone(),
            },
        }
    }

    /// `built-in`, `native` or `wasm`.
    pub fn label(&self) -> &'static str {
        match self {
            Origin::Builtin { .. } => "built-in",
            Origin::Native { .. } => "native",
            Origin::Wasm { .. } => "wasm",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin { source } => write!(f, "built-in ({source})"),
            Origin::Native { path } => write!(f, "native plugin {}", path.display()),
            Origin::Wasm { path } => write!(f, "wasm plugin {}", path.display()),
        }
    }
}

/// One registered component.
#[derive(Clone)]
pub struct Entry {
    /// Its kind.
    pub kind: ComponentKind,
    /// Its registry name.
    pub name: String,
    /// Its own version.
    pub version: String,
    /// One line for `codex-ml list`.
    pub description: String,
    /// Where it comes from.
    pub origin: Origin,
    /// The plugin-API version it was built against.
    pub api_version: ApiVersion,
    /// How it is made.
    pub maker: Maker,
}

/// How a component is made: what its origin's adapter handed the registry. Everything else
/// about an entry (kind, name, version, description, origin) is the same whatever the origin.
#[derive(Clone)]
pub enum Maker {
    /// A declaration through the plugin ABI (built-ins and native plugins): its factory and
    /// its parameter check.
    Declared(ComponentDecl),
    /// A sink the host builds itself around a sandboxed WebAssembly component. It reads its
    /// parameters when it opens (a bad one disables it then), so there is nothing to check
    /// before.
    Sandboxed(HostSinkFactory),
}

impl Entry {
    /// The ABI declaration, for a component that has one (all but sandboxed sinks).
    pub fn declaration(&self) -> Option<&ComponentDecl> {
        match &self.maker {
            Maker::Declared(decl) => Some(decl),
            Maker::Sandboxed(_) => None,
        }
    }
}

/// A sink factory the host builds itself, `(params as JSON, run directory, resume step)`. Unlike
/// an `extern "C"` factory it can capture state — a WASM plugin's file, limits and grants.
pub type HostSinkFactory =
    Arc<dyn Fn(&str, &Path, Option<u64>) -> Result<SinkBox, String> + Send + Sync>;

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("origin", &self.origin)
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
}

/// Registration and lookup failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The same (kind, name) was registered twice.
    #[error(
        "{kind} `{name}` is registered twice: by {first} and by {second}; \
         rename one of them or drop one plugin from the manifest",
        kind = kind.as_str()
    )]
    Duplicate {
        /// The kind.
        kind: ComponentKind,
        /// The name.
        name: String,
        /// The origin registered first.
        first: Origin,
        /// The origin that collided with it.
        second: Origin,
    },
    /// No component of this kind has this name.
    #[error("{}", unknown_message(*kind, name, registered_as, known, suggestion.as_deref(), unloaded_plugin.as_deref()))]
    Unknown {
        /// The kind looked up.
        kind: ComponentKind,
        /// The name asked for.
        name: String,
        /// The kinds under which this name is registered (a component in the wrong slot).
        registered_as: Vec<ComponentKind>,
        /// Every name of that kind, sorted.
        known: Vec<String>,
        /// A close known name, if any.
        suggestion: Option<String>,
        /// The `PLUGIN` of a `PLUGIN/NAME` when no component of that plugin is registered:
        /// the plugin was not loaded (no manifest, or a manifest without it).
        unloaded_plugin: Option<String>,
    },
    /// A registration with an empty or malformed name.
    #[error("{kind} from {origin} has an invalid name `{}`: names are non-empty and contain no whitespace, control or bidirectional characters", codex_plugin_api::untrusted::clean(name, 256), kind = kind.as_str())]
    InvalidName {
        /// The kind.
        kind: ComponentKind,
        /// The offending name.
        name: String,
        /// Who registered it.
        origin: Origin,
    },
}

/// `a sink`, `an optimizer`: kind names read as nouns in messages.
fn with_article(noun: &str) -> String {
    let article = if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {noun}")
}

fn unknown_message(
    kind: ComponentKind,
    name: &str,
    registered_as: &[ComponentKind],
    known: &[String],
    suggestion: Option<&str>,
    unloaded_plugin: Option<&str>,
) -> String {
    let mut message = format!("unknown {} `{name}`", kind.as_str());
    if let Some(plugin) = unloaded_plugin {
        // The list of known names would only distract: what is missing is the plugin.
        message.push_str(&format!(
            ": it comes from plugin `{plugin}`, which is not loaded; pass a plugin manifest \
             declaring `{plugin}` with --manifest FILE (see docs/plugins-native.md)"
        ));
        return message;
    }
    if !registered_as.is_empty() {
        let kinds: Vec<String> = registered_as
            .iter()
            .map(|k| with_article(k.as_str()))
            .collect();
        message.push_str(&format!(
            ": `{name}` is registered as {}, not as {}",
            kinds.join(" and as "),
            with_article(kind.as_str())
        ));
    } else if let Some(s) = suggestion {
        message.push_str(&format!(", did you mean `{s}`?"));
    }
    if known.is_empty() {
        message.push_str(&format!(
            "; no {} is registered in this build (see `codex-ml list`)",
            kind.as_str()
        ));
    } else {
        message.push_str(&format!(
            "; known {}s: {}",
            kind.as_str(),
            backticked(known.iter().map(String::as_str))
        ));
    }
    message
}

/// Every component this process knows, by (kind, name).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: BTreeMap<(ComponentKind, String), Entry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry holding every built-in component linked into this binary.
    pub fn with_builtins() -> Result<Self, RegistryError> {
        let mut registry = Registry::new();
        for builtin in codex_plugin_api::component::builtins() {
            registry.add(
                (builtin.declare)(),
                Origin::Builtin {
                    source: builtin.source.to_owned(),
                },
                API_VERSION,
            )?;
        }
        Ok(registry)
    }

    /// Register one component from `origin`, built against `api_version`. The API-version
    /// check belongs to the loader of each origin, which knows what it can run.
    pub fn add(
        &mut self,
        decl: ComponentDecl,
        origin: Origin,
        api_version: ApiVersion,
    ) -> Result<(), RegistryError> {
        let entry = Entry {
            kind: decl.kind(),
            name: decl.name.as_str().to_owned(),
            version: decl.version.as_str().to_owned(),
            description: decl.description.as_str().to_owned(),
            origin,
            api_version,
            maker: Maker::Declared(decl),
        };
        self.insert(entry)
    }

    /// Register a sink the host builds itself with `factory` (a WASM sink). It follows the same
    /// rules as [`Registry::add`]: a valid, unique name.
    pub fn add_sandboxed_sink(
        &mut self,
        name: &str,
        version: &str,
        description: &str,
        origin: Origin,
        factory: HostSinkFactory,
    ) -> Result<(), RegistryError> {
        self.insert(Entry {
            kind: ComponentKind::Sink,
            name: name.to_owned(),
            version: version.to_owned(),
            description: description.to_owned(),
            origin,
            api_version: API_VERSION,
            maker: Maker::Sandboxed(factory),
        })
    }

    fn insert(&mut self, entry: Entry) -> Result<(), RegistryError> {
        let (kind, name) = (entry.kind, entry.name.clone());
        // A name is printed as is everywhere: nothing in it may act on a terminal.
        let printable = codex_plugin_api::untrusted::clean(&name, name.len()) == name;
        if name.is_empty() || name.chars().any(char::is_whitespace) || !printable {
            return Err(RegistryError::InvalidName {
                kind,
                name,
                origin: entry.origin,
            });
        }
        let key = (kind, name);
        if let Some(existing) = self.entries.get(&key) {
            return Err(RegistryError::Duplicate {
                kind,
                name: key.1,
                first: existing.origin.clone(),
                second: entry.origin,
            });
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    /// The component of `kind` named `name`.
    pub fn get(&self, kind: ComponentKind, name: &str) -> Result<&Entry, RegistryError> {
        if let Some(entry) = self.entries.get(&(kind, name.to_owned())) {
            return Ok(entry);
        }
        let known: Vec<String> = self.of_kind(kind).map(|e| e.name.clone()).collect();
        let suggestion = did_you_mean(name, known.iter().map(String::as_str)).map(str::to_owned);
        let registered_as = ComponentKind::ALL
            .into_iter()
            .filter(|&other| other != kind && self.contains(other, name))
            .collect();
        let unloaded_plugin = name.split_once('/').and_then(|(plugin, _)| {
            let prefix = format!("{plugin}/");
            let loaded = self.entries.keys().any(|(_, n)| n.starts_with(&prefix));
            (!loaded && !plugin.is_empty()).then(|| plugin.to_owned())
        });
        Err(RegistryError::Unknown {
            kind,
            name: name.to_owned(),
            registered_as,
            known,
            suggestion,
            unloaded_plugin,
        })
    }

    /// Whether a component of `kind` named `name` is registered.
    pub fn contains(&self, kind: ComponentKind, name: &str) -> bool {
        self.entries.contains_key(&(kind, name.to_owned()))
    }

    /// Every entry, by kind (in [`ComponentKind::ALL`] order) then name.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entries of one kind, by name.
    pub fn of_kind(&self, kind: ComponentKind) -> impl Iterator<Item = &Entry> {
        self.entries
            .range((kind, String::new())..)
            .take_while(move |((k, _), _)| *k == kind)
            .map(|(_, entry)| entry)
    }

    /// How many components are registered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::{RErr, RResult, RStr};
    use codex_plugin_api::kernel::KernelBox;
    use codex_plugin_api::trainer::TrainerBox;
    use codex_plugin_api::{Factory, PluginError};

    extern "C" fn no_trainer(_: RStr<'_>) -> RResult<TrainerBox, PluginError> {
        RErr(PluginError::new("fake trainer"))
    }

    extern "C" fn no_kernel(_: RStr<'_>) -> RResult<KernelBox, PluginError> {
        RErr(PluginError::new("fake kernel"))
    }

    fn trainer(name: &str) -> ComponentDecl {
        ComponentDecl {
            name: name.into(),
            version: "0.1.0".into(),
            description: "a fake trainer".into(),
            factory: Factory::Trainer(no_trainer),
            check: codex_plugin_api::component::accept_any_params,
        }
    }

    fn kernel(name: &str) -> ComponentDecl {
        ComponentDecl {
            name: name.into(),
            version: "0.2.0".into(),
            description: "a fake kernel".into(),
            factory: Factory::Kernel(no_kernel),
            check: codex_plugin_api::component::accept_any_params,
        }
    }

    fn builtin(source: &str) -> Origin {
        Origin::Builtin {
            source: source.into(),
        }
    }

    fn registry(decls: Vec<ComponentDecl>) -> Registry {
        let mut registry = Registry::new();
        for decl in decls {
            let name = decl.name.to_string();
            if let Err(e) = registry.add(decl, builtin("tests"), API_VERSION) {
                panic!("adding {name}: {e}");
            }
        }
        registry
    }

    #[test]
    fn entries_are_grouped_by_kind_then_sorted_by_name() {
        let r = registry(vec![
            kernel("cpu"),
            trainer("zeta"),
            trainer("default"),
            kernel("avx"),
        ]);
        let listed: Vec<(ComponentKind, &str)> =
            r.entries().map(|e| (e.kind, e.name.as_str())).collect();
        assert_eq!(
            listed,
            vec![
                (ComponentKind::Trainer, "default"),
                (ComponentKind::Trainer, "zeta"),
                (ComponentKind::Kernel, "avx"),
                (ComponentKind::Kernel, "cpu"),
            ]
        );
        let kernels: Vec<&str> = r
            .of_kind(ComponentKind::Kernel)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(kernels, ["avx", "cpu"]);
        assert_eq!(r.of_kind(ComponentKind::Model).count(), 0);
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn lookup_returns_the_declaration() {
        let r = registry(vec![kernel("cpu")]);
        let entry = r.get(ComponentKind::Kernel, "cpu").expect("registered");
        assert_eq!(entry.version, "0.2.0");
        assert_eq!(entry.description, "a fake kernel");
        assert_eq!(
            entry.declaration().map(ComponentDecl::kind),
            Some(ComponentKind::Kernel)
        );
        assert_eq!(entry.api_version, API_VERSION);
    }

    #[test]
    fn same_name_of_another_kind_is_not_a_duplicate() {
        let r = registry(vec![kernel("default"), trainer("default")]);
        assert!(r.contains(ComponentKind::Kernel, "default"));
        assert!(r.contains(ComponentKind::Trainer, "default"));
    }

    #[test]
    fn duplicate_names_both_origins() {
        let mut r = registry(vec![trainer("default")]);
        let second = Origin::Native {
            path: PathBuf::from("plugins/libfast.so"),
        };
        let error = r
            .add(trainer("default"), second, API_VERSION)
            .expect_err("duplicate");
        assert_eq!(
            error.to_string(),
            "trainer `default` is registered twice: by built-in (tests) and by native plugin \
             plugins/libfast.so; rename one of them or drop one plugin from the manifest"
        );
        assert_eq!(r.len(), 1, "the first registration stays");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let r = registry(vec![trainer("default"), trainer("fsdp"), kernel("cpu")]);
        let check = |kind, name: &str, expect: &str| {
            let error = r.get(kind, name).expect_err("unknown");
            assert_eq!(error.to_string(), expect);
        };
        check(
            ComponentKind::Trainer,
            "defualt",
            "unknown trainer `defualt`, did you mean `default`?; known trainers: `default`, `fsdp`",
        );
        check(
            ComponentKind::Trainer,
            "ddp",
            "unknown trainer `ddp`; known trainers: `default`, `fsdp`",
        );
        check(
            ComponentKind::Model,
            "gpt2",
            "unknown model `gpt2`; no model is registered in this build (see `codex-ml list`)",
        );
    }

    #[test]
    fn a_plugin_name_whose_plugin_is_not_loaded_says_so() {
        let r = registry(vec![trainer("default"), trainer("fast/loop")]);
        let error = r
            .get(ComponentKind::Model, "llama/llama")
            .expect_err("no such plugin");
        assert_eq!(
            error.to_string(),
            "unknown model `llama/llama`: it comes from plugin `llama`, which is not loaded; \
             pass a plugin manifest declaring `llama` with --manifest FILE (see \
             docs/plugins-native.md)"
        );
        // The plugin is loaded but has no such component: the ordinary message.
        let error = r
            .get(ComponentKind::Trainer, "fast/lop")
            .expect_err("misspelt");
        assert!(
            error.to_string().starts_with(
                "unknown trainer `fast/lop`, did you mean `fast/loop`?; known trainers:"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_component_in_the_wrong_slot_says_what_it_is() {
        let r = registry(vec![trainer("default"), kernel("cpu")]);
        let error = r
            .get(ComponentKind::Trainer, "cpu")
            .expect_err("a kernel, not a trainer");
        assert_eq!(
            error.to_string(),
            "unknown trainer `cpu`: `cpu` is registered as a kernel, not as a trainer; \
             known trainers: `default`"
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        let mut r = Registry::new();
        for name in ["", "two words", "esc\u{1b}[31m", "rlo\u{202e}"] {
            let error = r
                .add(trainer(name), builtin("tests"), API_VERSION)
                .expect_err("invalid");
            assert!(
                matches!(error, RegistryError::InvalidName { .. }),
                "{error}"
            );
        }
        assert!(r.is_empty());
    }

    #[test]
    fn origins_render_with_their_location() {
        assert_eq!(
            builtin("codex_optim::adamw").to_string(),
            "built-in (codex_optim::adamw)"
        );
        let wasm = Origin::Wasm {
            path: PathBuf::from("p/x.wasm"),
        };
        assert_eq!(wasm.to_string(), "wasm plugin p/x.wasm");
        assert_eq!(wasm.label(), "wasm");
    }
}
