//! Why a kernel call was refused.
//!
//! The host checks shapes before it dispatches, but a kernel is also reachable from plugins
//! and tests, so every op validates its buffers again and refuses with one of these instead of
//! reading out of bounds. Each variant names the op and the buffer so that the message alone
//! tells the host author which argument of the dispatch table is wrong.

use codex_plugin_api::DType;

/// A refused kernel call or kernel construction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The op name is not one of [`crate::OPS`].
    #[error("unknown op `{op}`; the cpu kernel implements: {known}")]
    UnknownOp {
        /// The name asked for.
        op: String,
        /// Every implemented name, comma-separated.
        known: String,
    },
    /// Wrong number of inputs, outputs or attributes.
    #[error("{op}: expected {expected} {what}, found {found}; see the op table in the codex-kernels docs")]
    Count {
        /// The op.
        op: &'static str,
        /// `inputs`, `outputs` or `attrs`.
        what: &'static str,
        /// How many the op takes.
        expected: usize,
        /// How many were given.
        found: usize,
    },
    /// A buffer has a dtype the op does not take.
    #[error("{op}: `{name}` has dtype {found}, expected {expected}")]
    DType {
        /// The op.
        op: &'static str,
        /// The buffer's name in the op table.
        name: &'static str,
        /// Its dtype.
        found: &'static str,
        /// What the op accepts.
        expected: &'static str,
    },
    /// A buffer has the wrong shape.
    #[error("{op}: `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The buffer's name in the op table.
        name: &'static str,
        /// Its shape.
        found: Vec<usize>,
        /// The expected shape, in words.
        expected: String,
    },
    /// A buffer's byte length does not match its shape and dtype.
    #[error("{op}: `{name}` holds {found} bytes but shape {shape:?} of {dtype} needs {expected}")]
    Bytes {
        /// The op.
        op: &'static str,
        /// The buffer's name in the op table.
        name: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Its dtype.
        dtype: &'static str,
        /// Bytes present.
        found: usize,
        /// Bytes the shape needs.
        expected: usize,
    },
    /// An attribute is out of range.
    #[error("{op}: attribute `{name}` is {found}, expected {expected}")]
    Attr {
        /// The op.
        op: &'static str,
        /// The attribute's name in the op table.
        name: &'static str,
        /// Its value.
        found: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// A cross-entropy target is neither a class index nor the ignore index.
    #[error("{op}: target {target} at row {row} is out of range for {classes} classes and is not the ignore index {ignore}")]
    Target {
        /// The op.
        op: &'static str,
        /// The row.
        row: usize,
        /// The target found there.
        target: u32,
        /// Number of classes.
        classes: usize,
        /// The ignore index in force.
        ignore: f64,
    },
    /// A packed-attention query would see no key: its first key lies after its own position.
    #[error("{op}: `starts` row {row}, position {position}: start {start} is beyond key {last}, the query's own position; each query must see itself, so a start is at most s − t + position")]
    Start {
        /// The op.
        op: &'static str,
        /// The row of `starts`.
        row: usize,
        /// The query's position among the `t` queries.
        position: usize,
        /// The start found there.
        start: u32,
        /// The query's own key position, `s − t + position`.
        last: usize,
    },
    /// The kernel's parameters are not valid JSON of the expected form.
    #[error("cpu kernel params: {0}; expected a JSON object such as {{\"threads\": 2, \"simd\": \"auto\"}}")]
    Params(String),
    /// The dedicated thread pool could not be started.
    #[error("cpu kernel: cannot start a pool of {threads} threads: {reason}; lower `threads` or leave it unset")]
    Pool {
        /// Threads asked for.
        threads: usize,
        /// rayon's reason.
        reason: String,
    },
}

/// Short name of a dtype for messages.
pub(crate) fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}
