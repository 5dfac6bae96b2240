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
#[derive(Copy, Clone, Debug)]
pub struct BufferView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [usize],
    /// The bytes.
    pub data: &'a [u8],
}

/// An output buffer the kernel fills: contiguous, row-major, already allocated by the host.
#[derive(Debug)]
pub struct BufferMut<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [usize],
    /// The bytes.
    pub data: &'a mut [u8],
}

/// A [`BufferView`] as it crosses the ABI.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct BufferViewAbi<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: RSlice<'a, usize>,
    /// The bytes.
    pub data: RSlice<'a, u8>,
}

/// A [`BufferMut`] as it crosses the ABI.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct BufferMutAbi<'a> {
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
        inputs: RSlice<'_, BufferViewAbi<'_>>,
        attrs: RSlice<'_, f64>,
        outputs: RSliceMut<'_, BufferMutAbi<'_>>,
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
        inputs: RSlice<'_, BufferViewAbi<'_>>,
        attrs: RSlice<'_, f64>,
        mut outputs: RSliceMut<'_, BufferMutAbi<'_>>,
    ) -> RResult<(), PluginError> {
        guard(K::NAME, op.as_str(), || {
            let inputs: Vec<BufferView<'_>> = inputs
                .iter()
                .map(|b| BufferView {
                    dtype: b.dtype,
                    shape: b.shape.as_slice(),
                    data: b.data.as_slice(),
                })
                .collect();
            let mut outputs: Vec<BufferMut<'_>> = outputs
                .iter_mut()
                .map(|b| BufferMut {
                    dtype: b.dtype,
                    shape: b.shape.as_slice(),
                    data: b.data.as_mut_slice(),
                })
                .collect();
            self.0
                .run(op.as_str(), &inputs, attrs.as_slice(), &mut outputs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::Factory;

    /// Doubles f32 values: enough to see plain slices in and results out through the adapter.
    struct Double;

    impl Describe for Double {
        const NAME: &'static str = "double";
        const VERSION: &'static str = "0.0.0";
        const DESCRIPTION: &'static str = "doubles f32 values";
    }

    impl Kernel for Double {
        fn create(_: &str) -> Result<Self> {
            Ok(Double)
        }
        fn device(&self) -> DeviceKind {
            DeviceKind::Cpu
        }
        fn ops(&self) -> Vec<String> {
            vec!["double.fwd".into()]
        }
        fn run(
            &self,
            op: &str,
            inputs: &[BufferView<'_>],
            attrs: &[f64],
            outputs: &mut [BufferMut<'_>],
        ) -> Result<()> {
            let ([input], [output]) = (inputs, outputs) else {
                crate::bail!("{op}: one input and one output");
            };
            assert_eq!(
                (input.shape, output.shape, attrs),
                (&[2usize][..], &[2usize][..], &[][..])
            );
            for (o, i) in output
                .data
                .chunks_exact_mut(4)
                .zip(input.data.chunks_exact(4))
            {
                let x = f32::from_ne_bytes([i[0], i[1], i[2], i[3]]);
                o.copy_from_slice(&(2.0 * x).to_ne_bytes());
            }
            Ok(())
        }
    }

    #[test]
    fn the_adapter_hands_kernels_plain_slices_and_keeps_their_output() {
        let Factory::Kernel(factory) = declare::<Double>().factory else {
            panic!("a kernel declares a kernel factory");
        };
        let kernel = factory(RStr::from("")).unwrap();
        assert_eq!(kernel.ops().into_vec(), vec![RString::from("double.fwd")]);
        let shape = [2usize];
        let input: Vec<u8> = [1.5f32, -3.0]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        let mut output = vec![0u8; 8];
        let inputs = [BufferViewAbi {
            dtype: DType::F32,
            shape: RSlice::from_slice(&shape),
            data: RSlice::from_slice(&input),
        }];
        let mut outputs = [BufferMutAbi {
            dtype: DType::F32,
            shape: RSlice::from_slice(&shape),
            data: RSliceMut::from_mut_slice(&mut output),
        }];
        kernel
            .run(
                RStr::from("double.fwd"),
                RSlice::from_slice(&inputs),
                RSlice::from_slice(&[]),
                RSliceMut::from_mut_slice(&mut outputs),
            )
            .unwrap();
        let doubled: Vec<f32> = output
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(doubled, vec![3.0, -6.0]);
    }
}
