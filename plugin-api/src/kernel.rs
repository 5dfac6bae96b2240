//! Kernels: fast implementations of named ops for one device.
//!
//! The host's op table dispatches by op name and device: when the active kernel for a
//! tensor's device implements an op, the host calls it instead of composing the op from
//! primitives, forward and backward. Models never see the difference. A kernel works on raw
//! host buffers (for CPU kernels) whose shapes the host has already checked against the op's
//! signature, so it needs no tensor engine of its own.
//!
//! Op names are `<op>.fwd` and `<op>.bwd`; each op's inputs, outputs and attributes are
//! specified where the host dispatches it (`host/src/tensor/`), and listed in `docs/kernels.md`.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};
use crate::tensor::DType;

/// A device family.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Host CPU.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// Apple Metal.
    Metal,
}

/// A read-only input buffer: contiguous, row-major.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct BufferView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: RSlice<'a, usize>,
    /// The bytes.
    pub data: RSlice<'a, u8>,
}

/// An output buffer the kernel fills: contiguous, row-major, already allocated by the host.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct BufferMut<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: RSlice<'a, usize>,
    /// The bytes.
    pub data: RSliceMut<'a, u8>,
}

/// The ABI face of a kernel.
#[sabi_trait]
pub trait KernelAbi: Send + Sync {
    /// The device it runs on.
    fn device(&self) -> DeviceKind;
    /// The op names it implements (`softmax_last_dim.fwd`, ...).
    fn ops(&self) -> RVec<RString>;
    /// Run one op.
    #[sabi(last_prefix_field)]
    fn run(
        &self,
        op: RStr<'_>,
        inputs: RSlice<'_, BufferView<'_>>,
        attrs: RSlice<'_, f64>,
        outputs: RSliceMut<'_, BufferMut<'_>>,
    ) -> RResult<(), PluginError>;
}

/// An owned kernel object.
pub type KernelBox = KernelAbi_TO<'static, RBox<()>>;

/// A kernel constructor: `(params as JSON)`.
pub type KernelFactory = extern "C" fn(RStr<'_>) -> RResult<KernelBox, PluginError>;

/// What kernel authors implement.
pub trait Kernel: Describe + Send + Sync + Sized + 'static {
    /// Parse `params` (JSON, strictly), e.g. a thread count.
    fn create(params: &str) -> Result<Self>;
    /// The device.
    fn device(&self) -> DeviceKind;
    /// Op names implemented.
    fn ops(&self) -> Vec<String>;
    /// Run one op.
    fn run(
        &self,
        op: &str,
        inputs: &[BufferView<'_>],
        attrs: &[f64],
        outputs: &mut [BufferMut<'_>],
    ) -> Result<()>;
}

struct Adapter<K>(K);

impl<K: Kernel> KernelAbi for Adapter<K> {
    fn device(&self) -> DeviceKind {
        self.0.device()
    }
    fn ops(&self) -> RVec<RString> {
        self.0.ops().into_iter().map(RString::from).collect()
    }
    fn run(
        &self,
        op: RStr<'_>,
        inputs: RSlice<'_, BufferView<'_>>,
        attrs: RSlice<'_, f64>,
        mut outputs: RSliceMut<'_, BufferMut<'_>>,
    ) -> RResult<(), PluginError> {
        guard(K::NAME, op.as_str(), || {
            self.0.run(
                op.as_str(),
                inputs.as_slice(),
                attrs.as_slice(),
                outputs.as_mut_slice(),
            )
        })
    }
}

extern "C" fn factory<K: Kernel>(params: RStr<'_>) -> RResult<KernelBox, PluginError> {
    guard(K::NAME, "create", || {
        let k = K::create(params.as_str())?;
        Ok(KernelAbi_TO::from_value(
            Adapter(k),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of kernel type `K`.
pub fn declare<K: Kernel>() -> ComponentDecl {
    decl::<K>(Factory::Kernel(factory::<K>))
}
