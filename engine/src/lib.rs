//! The tensor engine of codex-ml: candle behind the plugin API's op table, and the parameter
//! store. This is the only crate that depends on candle; the host holds a [`Device`] and
//! [`TensorId`] handles and never names a candle type.
//!
//! Components never see a candle `Tensor`. They hold [`TensorId`] handles into one global,
//! thread-safe table (`handles`) and call the entries of the op table (`table`), each of
//! which is a thin `extern "C"` shell: it catches panics, resolves handles, calls one plain Rust
//! function on candle tensors, and registers the result. Those functions live in `ops`
//! (primitives, layout, creation) and `nn` (neural-network ops). The ops a fused kernel can
//! replace — softmax, layer norm, RMS norm, GELU, cross-entropy, attention, bias adds, sums over
//! leading dimensions and the AdamW update — are each a single function in `nn`, `ops` or
//! `autograd` that first offers the call to `dispatch`, which runs the active kernel (see
//! [`set_kernel`], [`scoped_kernel`]) as candle custom ops, forward and backward, and otherwise
//! lets the primitive composition run. While a kernel is active, `fusion` also lets a matmul's
//! consumer (a bias add, a cross-entropy) and causal attention on split heads take over the
//! backward pass of the ops before them, so candle's autograd gives fewer large intermediates
//! a gradient. `elementwise` runs element-wise programs (an optimizer's whole step) in one pass
//! over declared tensors, writing them in place. `profile` times op-table entries and kernel
//! calls for `codex-ml bench --profile`. `packed` carries the layout of rows packed with several
//! examples and confines causal attention to each example.
//!
//! Parameters and optimizer state are candle `Var`s owned by a [`ParamStore`] (`store`) and
//! reachable through handles like any tensor; only parameters have gradient slots, filled by
//! `autograd` the way PyTorch fills `.grad`.

#![warn(missing_docs, unreachable_pub)]

pub(crate) mod adapter;
pub(crate) mod autograd;
pub(crate) mod dispatch;
pub(crate) mod elementwise;
pub(crate) mod fusion;
pub(crate) mod handles;
pub(crate) mod mixed;
pub(crate) mod nn;
pub(crate) mod ops;
pub(crate) mod packed;
pub mod profile;
pub(crate) mod store;
pub(crate) mod table;

use std::path::PathBuf;

use candle_core::Tensor;
use codex_plugin_api::TensorId;

/// candle itself, for tests that check the engine against candle's own ops. Nothing outside
/// the engine's tests computes with it.
#[doc(hidden)]
pub use candle_core as candle;
/// A device tensors live on: `cpu`, or a GPU in builds with the `cuda` or `metal` feature.
/// Parse a user's device string with [`parse_device`].
pub use candle_core::Device;

pub use adapter::{probe, set_forward, WeightUse};
pub use autograd::backward_time;
pub use dispatch::{
    bf16_active, kernel_active, products_precision, scoped_kernel, scoped_kernel_at, set_kernel,
    KernelScope,
};
pub use mixed::{matmul_rate, packed_operands, Precision};
pub use packed::{forward_pass, upload_packed, PassReport};
pub use store::{check_safetensors, write_safetensors, ExportedTensor, ParamStore, TensorGroup};

/// Everything that can go wrong in the tensor engine and the parameter store.
///
/// Op-table entries prefix the message with the op's name (`matmul: ...`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// A handle that was released or never issued.
    #[error("unknown tensor handle {0}: it was released or never created")]
    UnknownHandle(u64),
    /// A gradient was asked of something that is not a declared parameter.
    #[error("tensor handle {0} is not a parameter: only tensors declared with declare_param have gradient slots")]
    NotAParameter(u64),
    /// `assign` on a tensor the store did not declare.
    #[error("tensor handle {0} is not a declared parameter or state tensor: only those can be assigned in place")]
    NotAssignable(u64),
    /// `assign` with a value of another shape.
    #[error("cannot assign a value of shape {value:?} to a tensor of shape {target:?}")]
    AssignShape {
        /// Shape of the declared tensor.
        target: Vec<usize>,
        /// Shape of the value.
        value: Vec<usize>,
    },
    /// A bad argument (shape, dimension, probability, ...), described in full.
    #[error("{0}")]
    Invalid(String),
    /// An element type the plugin API cannot name.
    #[error("element type {0:?} is not supported by the plugin api")]
    UnsupportedDType(candle_core::DType),
    /// An error from candle, the engine.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A second declaration under a name already taken.
    #[error("`{0}` is already declared: parameter and state names must be unique")]
    DuplicateName(String),
    /// A name the store does not know.
    #[error("no parameter or state tensor is named `{0}`")]
    UnknownName(String),
    /// A safetensors file that does not match the store.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What does not match, naming the tensors.
        message: String,
    },
    /// A device string that cannot be used.
    #[error("unknown device `{0}`: use `cpu`, `cuda`, `cuda:N` or `metal` (the last two only in builds with those features)")]
    UnknownDevice(String),
    /// A device this build cannot drive.
    #[error("device `{0}` needs a codex-ml build with the `{1}` feature: rebuild with `--features {1}` or use `cpu`")]
    DeviceNotBuilt(String, &'static str),
}

/// Results of the tensor engine.
pub type Result<T, E = TensorError> = std::result::Result<T, E>;

/// Install the host's op table so that `codex_plugin_api::ops()` works. Idempotent: the table
/// is built once and every later call is a no-op.
pub fn install() {
    table::install();
}

/// The op table itself, for handing to native plugins at registration (built on first use;
/// the same table every time).
pub fn op_table() -> codex_plugin_api::OpTableRef {
    table::table()
}

/// Register a candle tensor and return an owned handle to it (release it with the op table's
/// `release`, or wrap it in `codex_plugin_api::Tensor::from_id`).
pub fn insert(tensor: Tensor) -> TensorId {
    handles::insert(tensor)
}

/// The candle tensor behind a handle. For a trainable parameter it is the variable itself, so
/// a graph built from it back-propagates into the parameter; for state and frozen parameters it
/// is a view of the same storage that autograd does not track.
pub fn get(id: TensorId) -> Result<Tensor> {
    handles::tensor(id)
}

/// Upload token ids (row-major, `shape` = `[rows, columns]` or `[n]`) to `device` as a `u32`
/// tensor and return an owned handle to it: how batches reach the model.
pub fn upload_ids(ids: Vec<u32>, shape: &[usize], device: &Device) -> Result<TensorId> {
    Ok(handles::insert(Tensor::from_vec(ids, shape, device)?))
}

/// How many handles are alive, over all threads (for leak checks).
pub fn live_handles() -> usize {
    handles::live()
}

/// How many handles created on `thread` are still alive. Leak tests use it because other
/// threads of the same process create and release handles at the same time.
pub fn live_handles_on_thread(thread: std::thread::ThreadId) -> usize {
    handles::live_on_thread(thread)
}

/// Parse a device name: `cpu`; `cuda` or `cuda:N` in builds with the `cuda` feature; `metal`
/// in builds with the `metal` feature.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let (family, ordinal) = match name.split_once(':') {
        Some((f, n)) => {
            let n: usize = n
                .parse()
                .map_err(|_| TensorError::UnknownDevice(name.to_string()))?;
            (f, n)
        }
        None => (name, 0),
    };
    match family {
        "cuda" => cuda_device(name, ordinal),
        "metal" => metal_device(name, ordinal),
        _ => Err(TensorError::UnknownDevice(name.to_string())),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(_name: &str, ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _ordinal: usize) -> Result<Device> {
    Err(TensorError::DeviceNotBuilt(name.to_string(), "cuda"))
}

#[cfg(feature = "metal")]
fn metal_device(_name: &str, ordinal: usize) -> Result<Device> {
    Ok(Device::new_metal(ordinal)?)
}

#[cfg(not(feature = "metal"))]
fn metal_device(name: &str, _ordinal: usize) -> Result<Device> {
    Err(TensorError::DeviceNotBuilt(name.to_string(), "metal"))
}

/// The candle element type for a plugin-API one.
pub(crate) fn to_candle_dtype(dtype: codex_plugin_api::DType) -> candle_core::DType {
    use codex_plugin_api::DType as P;
    match dtype {
        P::F32 => candle_core::DType::F32,
        P::BF16 => candle_core::DType::BF16,
        P::F16 => candle_core::DType::F16,
        P::F64 => candle_core::DType::F64,
        P::U32 => candle_core::DType::U32,
        P::U8 => candle_core::DType::U8,
        P::I64 => candle_core::DType::I64,
    }
}

/// The plugin-API element type for a candle one, if the API has it.
pub(crate) fn from_candle_dtype(dtype: candle_core::DType) -> Result<codex_plugin_api::DType> {
    use codex_plugin_api::DType as P;
    Ok(match dtype {
        candle_core::DType::F32 => P::F32,
        candle_core::DType::BF16 => P::BF16,
        candle_core::DType::F16 => P::F16,
        candle_core::DType::F64 => P::F64,
        candle_core::DType::U32 => P::U32,
        candle_core::DType::U8 => P::U8,
        candle_core::DType::I64 => P::I64,
        other => return Err(TensorError::UnsupportedDType(other)),
    })
}

/// Run `f` on a worker of rayon's global pool and wait for it.
///
/// The matrix products and the kernel's ops are parallel sections on that pool. Called from a
/// thread outside it, every section hands its work over and puts the caller to sleep until it
/// is done; called from a worker, the caller takes part and the pool's other threads stay
/// warm between sections. The calling thread's kernel setting ([`scoped_kernel`]) goes with it.
pub fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut out = None;
    let kernel = dispatch::thread_kernel();
    rayon::scope(|s| {
        s.spawn(|_| {
            let _kernel = dispatch::carry_kernel(kernel);
            out = Some(f())
        })
    });
    // `scope` returns only after the spawned closure ran; it re-raises a panic in it.
    out.unwrap_or_else(|| unreachable!("rayon::scope ran the spawned closure"))
}
