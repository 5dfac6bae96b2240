//! Errors on both sides of the boundary, and the glue that turns plugin panics into errors.
//!
//! A panic that unwinds across an `extern "C"` boundary aborts the whole process (see the
//! abi_stable notes in `ARCHITECTURE.md`). Every call the host makes into a component therefore
//! goes through [`guard`] on the plugin side, which catches the panic and returns it as a
//! [`PluginError`] naming the component and the call. Plugin authors never write the guard
//! themselves: the adapters in this crate wrap every method of every component trait.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use abi_stable::std_types::{RResult, RString};
use abi_stable::StableAbi;

/// The error that crosses the ABI: a message, already naming what failed.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    /// Human-readable, lowercase, no trailing period.
    pub message: RString,
    /// True when the error comes from a caught panic rather than a returned error.
    pub panicked: bool,
}

impl PluginError {
    /// An error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        PluginError {
            message: RString::from(message.into()),
            panicked: false,
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

/// The error type plugin authors return from component methods.
///
/// Any `std::error::Error` converts into it with `?`, like `anyhow::Error`; [`Error::msg`]
/// makes one from a message.
#[derive(Debug, Clone)]
pub struct Error(String);

impl Error {
    /// An error from a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Error(message.to_string())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }

    /// Prefix the message with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error(format!("{what}: {}", self.0))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Self {
        Error(e.to_string())
    }
}

impl From<Error> for PluginError {
    fn from(e: Error) -> Self {
        PluginError::new(e.0)
    }
}

/// `Result` with the authoring [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Return early with an [`Error`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::msg(::std::format!($($arg)*)))
    };
}

/// The name of the native plugin this copy of the crate is linked into. Every cdylib links its
/// own copy, so the name set at registration is that plugin's; built-ins never set it.
static PLUGIN_NAME: OnceLock<String> = OnceLock::new();

/// Record the plugin's name so that every error [`guard`] reports from now on names it.
pub(crate) fn name_plugin(name: &str) {
    let _ = PLUGIN_NAME.set(name.to_owned());
}

/// `component`, prefixed with the plugin's name inside a native plugin.
fn label(component: &str) -> String {
    match PLUGIN_NAME.get() {
        Some(plugin) if plugin == component => format!("plugin `{plugin}`"),
        Some(plugin) => format!("plugin `{plugin}`: {component}"),
        None => component.to_string(),
    }
}

/// Run `f`, turning a panic into a [`PluginError`] that names `component` and `call` (and,
/// inside a native plugin, the plugin).
///
/// This is the plugin-side glue: the adapters call it around every component method.
pub fn guard<T>(
    component: &str,
    call: &str,
    f: impl FnOnce() -> Result<T>,
) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(PluginError::new(format!(
            "{}: {call}: {}",
            label(component),
            e.0
        ))),
        Err(payload) => {
            let what = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".to_string()
            };
            RResult::RErr(PluginError {
                message: RString::from(format!("{}: panic in {call}: {what}", label(component))),
                panicked: true,
            })
        }
    }
}

/// Convert an ABI result into the authoring one.
pub(crate) fn from_abi<T>(r: RResult<T, PluginError>) -> Result<T> {
    match r {
        RResult::ROk(v) => Ok(v),
        RResult::RErr(e) => Err(Error(e.message.into_string())),
    }
}
