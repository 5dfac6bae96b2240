//! The root module of a native plugin, and the version promise.
//!
//! The root module is deliberately tiny and never grows: a plugin's identity, the plugin-API
//! version it was built against, and one registration function. Everything that evolves
//! (the op table, component vtables) is a prefix type that can gain trailing entries.
//! Use [`export_plugin!`](crate::export_plugin) to define it.

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr};
use abi_stable::{package_version_strings, StableAbi};

use crate::component::RegistrarRef;
use crate::error::PluginError;
use crate::ops::OpTableRef;

/// A plugin-API version. Hosts load plugins of the same `major` whose `minor` is at most
/// their own: minors only ever add trailing op-table entries and defaulted methods.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Additions.
    pub minor: u32,
}

impl ApiVersion {
    /// Whether a host of version `self` can load a plugin built against `plugin`.
    pub fn can_load(self, plugin: ApiVersion) -> bool {
        self.major == plugin.major && plugin.minor <= self.minor
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The version of the plugin API this crate defines.
pub const API_VERSION: ApiVersion = ApiVersion { major: 2, minor: 2 };

/// The root module a native plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin-API version the plugin was built against.
    pub api_version: ApiVersion,
    /// The plugin's name: its components register as `NAME/COMPONENT`.
    pub name: RStr<'static>,
    /// The plugin's version.
    pub version: RStr<'static>,
    /// Install the host's op table and add every component to the registrar.
    #[sabi(last_prefix_field)]
    pub register: extern "C" fn(RegistrarRef<'_>, OpTableRef) -> RResult<(), PluginError>,
}

impl RootModule for PluginModuleRef {
    abi_stable::declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "codex_plugin";
    const NAME: &'static str = "codex-ml plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Plugin-side registration glue used by [`export_plugin!`](crate::export_plugin): installs
/// the op table, names the plugin in every later error, then adds each declaration, catching
/// panics.
#[doc(hidden)]
pub fn register_all(
    plugin: &str,
    mut registrar: RegistrarRef<'_>,
    ops: OpTableRef,
    declare: &[fn() -> crate::component::ComponentDecl],
) -> RResult<(), PluginError> {
    crate::ops::install_ops(ops);
    crate::error::name_plugin(plugin);
    crate::error::guard(plugin, "register", || {
        for d in declare {
            let decl = d();
            crate::error::from_abi(registrar.add(decl))?;
        }
        Ok(())
    })
}

/// The symbol abi_stable looks a library's root module up by (`abi_stable::library::
/// ROOT_MODULE_LOADER_NAME`). [`export_plugin!`](crate::export_plugin) spells it as a literal
/// because `#[export_name]` takes nothing else; a test keeps the two equal.
#[doc(hidden)]
#[macro_export]
macro_rules! __root_module_symbol {
    () => {
        "_1as_0lib_1header_0root_bmodule_bloader"
    };
}

/// Define a native plugin's root module:
///
/// ```text
/// codex_plugin_api::export_plugin! {
///     name: "lion",
///     version: env!("CARGO_PKG_VERSION"),
///     components: [codex_plugin_api::optimizer::declare::<Lion>],
/// }
/// ```
///
/// The expansion is what `#[abi_stable::export_root_module]` generates, written with paths
/// through this crate so that a plugin needs no dependency on `abi_stable` of its own.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, version: $version:expr, components: [$($declare:expr),* $(,)?] $(,)?) => {
        /// The plugin's root module, built once when the host first loads the library.
        pub fn codex_plugin_root_module() -> $crate::plugin::PluginModuleRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            extern "C" fn register(
                registrar: $crate::component::RegistrarRef<'_>,
                ops: $crate::ops::OpTableRef,
            ) -> $crate::abi_stable::std_types::RResult<(), $crate::PluginError> {
                $crate::plugin::register_all($name, registrar, ops, &[$($declare),*])
            }
            $crate::plugin::PluginModule {
                api_version: $crate::plugin::API_VERSION,
                name: $crate::abi_stable::std_types::RStr::from_str($name),
                version: $crate::abi_stable::std_types::RStr::from_str($version),
                register,
            }
            .leak_into_prefix()
        }

        #[doc(hidden)]
        #[export_name = $crate::__root_module_symbol!()]
        pub static CODEX_PLUGIN_LIB_HEADER: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased_root_module() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(codex_plugin_root_module)
            }
            // SAFETY: this is the expansion of `#[export_root_module]`: the constructor
            // returns the `PluginModuleRef` whose layout the header records.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<
                    $crate::plugin::PluginModuleRef,
                >(
                    erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exported_symbol_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            __root_module_symbol!(),
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }

    #[test]
    fn hosts_load_the_same_major_up_to_their_own_minor() {
        let host = ApiVersion { major: 1, minor: 2 };
        let v = |major, minor| ApiVersion { major, minor };
        assert!(host.can_load(v(1, 0)));
        assert!(host.can_load(v(1, 2)));
        assert!(
            !host.can_load(v(1, 3)),
            "a newer minor may call missing ops"
        );
        assert!(!host.can_load(v(0, 2)));
        assert!(!host.can_load(v(2, 0)));
        assert!(API_VERSION.can_load(API_VERSION));
    }
}
