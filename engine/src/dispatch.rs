//! Dispatch of fusable ops to the active kernel, forward and backward.
//!
//! A kernel component works on raw host buffers (`codex_plugin_api::kernel`); candle knows
//! nothing of it. Each fusable op is therefore a candle custom op whose `cpu_fwd` hands the
//! input storage to the kernel's `<op>.fwd` and whose `bwd` calls `<op>.bwd` on the saved
//! tensors, so the op takes part in candle's autograd like any primitive. Statistics the
//! backward pass needs (layer-norm mean and rstd, attention and cross-entropy log-sum-exp)
//! are kept in the op object itself, which candle keeps alive in the graph until backward.
//!
//! The entry points (`softmax`, `layer_norm`, ...) return `Ok(None)` whenever the kernel
//! cannot take the call — no kernel active for the device, an op the kernel lacks, a dtype
//! other than f32/bf16, a shape outside the kernel's signature — and the caller in `nn`/`ops`
//! then composes the op from primitives. So a kernel never changes what a model may do, only
//! how fast it runs; `tests/kernels.rs` checks values and gradients of both paths agree.
//!
//! Which kernel is active is per device family (only the CPU family can hold one: kernels take
//! host buffers) and is set process-wide with [`set_kernel`] or for the calling thread only
//! with [`scoped_kernel`]; the thread setting wins. A custom op holds the kernel it was built
//! with, so a backward pass uses the same kernel as its forward pass whatever is active then.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use abi_stable::std_types::{RSlice, RSliceMut, RStr};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp1, Layout, Shape, Storage,
    Tensor,
};
// The ABI forms of the kernel buffers, under their authoring names: this file only builds them.
use codex_plugin_api::kernel::{BufferMutAbi as BufferMut, BufferViewAbi as BufferView, KernelBox};
use codex_plugin_api::tensor::AdamWHyper;
use codex_plugin_api::{DeviceKind, GeluForm};
use half::{bf16, f16};
use rayon::prelude::*;

use super::autograd::Direct;
use super::mixed::{self, Precision};
use super::packed::Packing;
use super::profile::{self, Kind};
use super::{Result, TensorError};

type CResult<T> = candle_core::Result<T>;

/// A kernel made active, with the op names it implements.
pub(crate) struct ActiveKernel {
    kernel: KernelBox,
    ops: Vec<String>,
    /// The precision 2-D f32 matrix products run in (`mixed`): the run's, where the kernel
    /// offers its products, else f32.
    products: Precision,
}

impl ActiveKernel {
    fn has(&self, op: &str) -> bool {
        self.ops.iter().any(|o| o == op)
    }

    /// The precision 2-D f32 matrix products run in through this kernel.
    pub(crate) fn products(&self) -> Precision {
        self.products
    }

    /// Run one kernel op; errors become candle errors naming the op, so they surface through
    /// candle's forward and backward like any other failure.
    pub(crate) fn run(
        &self,
        op: &'static str,
        inputs: &[BufferView<'_>],
        attrs: &[f64],
        outputs: &mut [BufferMut<'_>],
    ) -> CResult<()> {
        profile::timed(Kind::Kernel, op, || {
            self.kernel
                .run(
                    RStr::from(op),
                    RSlice::from_slice(inputs),
                    RSlice::from_slice(attrs),
                    RSliceMut::from_mut_slice(outputs),
                )
                .into_result()
                .map_err(|e| candle_core::Error::Msg(format!("kernel op {op}: {e}")))
        })
    }
}

static GLOBAL_CPU: RwLock<Option<Arc<ActiveKernel>>> = RwLock::new(None);

thread_local! {
    /// `Some(setting)` while a [`KernelScope`] is alive on this thread.
    static LOCAL_CPU: RefCell<Option<Option<Arc<ActiveKernel>>>> = const { RefCell::new(None) };
}

fn activate(
    device: &Device,
    kernel: Option<KernelBox>,
    precision: Precision,
) -> Result<Option<Arc<ActiveKernel>>> {
    let Some(kernel) = kernel else {
        return Ok(None);
    };
    let family = kernel.device();
    if family != DeviceKind::Cpu {
        return Err(TensorError::Invalid(format!(
            "the kernel runs on {family:?} devices, but the host can only dispatch to cpu \
             kernels (they take host buffers); leave `kernel` unset for this device"
        )));
    }
    if !device.is_cpu() {
        return Err(TensorError::Invalid(format!(
            "a cpu kernel cannot run ops on {device:?}; leave `kernel` unset or use device `cpu`"
        )));
    }
    let ops: Vec<String> = kernel.ops().into_iter().map(|s| s.into_string()).collect();
    let offered = precision
        .ops()
        .is_some_and(|needed| needed.iter().all(|op| ops.iter().any(|o| o == op)));
    let products = if offered { precision } else { Precision::F32 };
    Ok(Some(Arc::new(ActiveKernel {
        kernel,
        ops,
        products,
    })))
}

/// Make `kernel` the active kernel for `device`'s family in the whole process (`None`: plain
/// ops). Threads inside a [`scoped_kernel`] keep their own setting.
///
/// Fails if the kernel is not for that device family, or the family is not the CPU.
pub fn set_kernel(device: &Device, kernel: Option<KernelBox>) -> Result<()> {
    let active = activate(device, kernel, Precision::F32)?;
    *GLOBAL_CPU.write().unwrap_or_else(PoisonError::into_inner) = active;
    Ok(())
}

/// Restores the calling thread's previous kernel setting when dropped.
#[must_use = "the kernel is active only while the scope is alive"]
pub struct KernelScope {
    previous: Option<Option<Arc<ActiveKernel>>>,
}

impl std::fmt::Debug for KernelScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelScope").finish_non_exhaustive()
    }
}

impl Drop for KernelScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        LOCAL_CPU.with(|l| *l.borrow_mut() = previous);
    }
}

/// Make `kernel` (or plain ops, for `None`) active for `device`'s family on the calling thread
/// only, until the returned scope is dropped. Training runs and tests use this so that runs
/// sharing a process do not see each other's kernels.
pub fn scoped_kernel(device: &Device, kernel: Option<KernelBox>) -> Result<KernelScope> {
    scoped_kernel_at(device, kernel, Precision::F32)
}

/// [`scoped_kernel`] with the precision of matrix products: with [`Precision::Bf16`] and a
/// kernel that offers `bf16_gemm` (or [`Precision::F16`] and `f16_gemm`), 2-D f32 products
/// run in that precision with f32 accumulation (see [`Precision`]); without such a kernel
/// they stay f32 ([`products_precision`] tells which).
pub fn scoped_kernel_at(
    device: &Device,
    kernel: Option<KernelBox>,
    precision: Precision,
) -> Result<KernelScope> {
    let active = activate(device, kernel, precision)?;
    let previous = LOCAL_CPU.with(|l| l.borrow_mut().replace(active));
    Ok(KernelScope { previous })
}

/// The calling thread's own kernel setting, to carry to another thread with [`carry_kernel`].
pub(crate) struct ThreadKernel(Option<Option<Arc<ActiveKernel>>>);

/// The calling thread's kernel setting (from a [`scoped_kernel`]), if it has one.
pub(crate) fn thread_kernel() -> ThreadKernel {
    ThreadKernel(LOCAL_CPU.with(|l| l.borrow().clone()))
}

/// Give the calling thread the setting `from` another thread, until the scope is dropped.
pub(crate) fn carry_kernel(from: ThreadKernel) -> KernelScope {
    let previous = LOCAL_CPU.with(|l| std::mem::replace(&mut *l.borrow_mut(), from.0));
    KernelScope { previous }
}

/// The kernel that runs ops on `device` from the calling thread, if any.
pub(crate) fn active(device: &Device) -> Option<Arc<ActiveKernel>> {
    if !device.is_cpu() {
        return None;
    }
    if let Some(local) = LOCAL_CPU.with(|l| l.borrow().clone()) {
        return local;
    }
    GLOBAL_CPU
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Whether 2-D matrix products on `device` run in bf16 from the calling thread.
pub fn bf16_active(device: &Device) -> bool {
    products_precision(device) == Precision::Bf16
}

/// The precision 2-D matrix products on `device` run in from the calling thread.
pub fn products_precision(device: &Device) -> Precision {
    active(device).map_or(Precision::F32, |k| k.products())
}

/// Whether a kernel runs ops on `device` from the calling thread.
pub fn kernel_active(device: &Device) -> bool {
    active(device).is_some()
}

/// The kernel for `op` on `x`'s device, if one is active, implements `op`, and takes `x`'s
/// dtype.
fn kernel_for(x: &Tensor, op: &str) -> Option<Arc<ActiveKernel>> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return None;
    }
    active(x.device()).filter(|k| k.has(op))
}

// -- buffers ----------------------------------------------------------------------------------

fn api_dtype(d: DType) -> CResult<codex_plugin_api::DType> {
    Ok(match d {
        DType::F32 => codex_plugin_api::DType::F32,
        DType::BF16 => codex_plugin_api::DType::BF16,
        DType::F16 => codex_plugin_api::DType::F16,
        DType::U32 => codex_plugin_api::DType::U32,
        other => candle_core::bail!("kernel buffers are f32, bf16, f16 or u32, found {other:?}"),
    })
}

/// The contiguous bytes of a storage, as a kernel input.
pub(crate) fn view<'a>(s: &'a CpuStorage, l: &'a Layout) -> CResult<BufferView<'a>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!(
            "kernel inputs must be contiguous, found strides {:?}",
            l.stride()
        );
    };
    let (dtype, data): (_, &[u8]) = match s {
        CpuStorage::F32(v) => (DType::F32, bytemuck::cast_slice(&v[start..end])),
        CpuStorage::BF16(v) => (DType::BF16, bytemuck::cast_slice(&v[start..end])),
        CpuStorage::F16(v) => (DType::F16, bytemuck::cast_slice(&v[start..end])),
        CpuStorage::U32(v) => (DType::U32, bytemuck::cast_slice(&v[start..end])),
        other => candle_core::bail!(
            "kernel buffers are f32, bf16, f16 or u32, found {:?}",
            other.dtype()
        ),
    };
    Ok(BufferView {
        dtype: api_dtype(dtype)?,
        shape: RSlice::from_slice(l.dims()),
        data: RSlice::from_slice(data),
    })
}

/// Storage `s` laid out by `l`, made contiguous: borrowed when it already is, else copied.
fn dense<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<(Cow<'a, CpuStorage>, Layout)> {
    if l.is_contiguous() {
        return Ok((Cow::Borrowed(s), l.clone()));
    }
    // SAFETY: `copy_strided_src` writes every element of the layout's shape, which is all of
    // `dst`, before anything reads it (candle's own `contiguous` allocates the same way).
    let mut dst =
        unsafe { candle_core::cpu_backend::CpuDevice.alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((Cow::Owned(dst), Layout::contiguous(l.shape())))
}

/// An output buffer the host allocates for a kernel.
pub(crate) enum OutData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

pub(crate) struct Out {
    shape: Vec<usize>,
    data: OutData,
}

impl Out {
    pub(crate) fn new(dtype: DType, shape: &[usize]) -> CResult<Out> {
        let n: usize = shape.iter().product();
        let data = match dtype {
            DType::F32 => OutData::F32(vec![0.0; n]),
            DType::BF16 => OutData::Bf16(vec![bf16::ZERO; n]),
            DType::F16 => OutData::F16(vec![f16::ZERO; n]),
            other => candle_core::bail!("kernel outputs are f32, bf16 or f16, found {other:?}"),
        };
        Ok(Out {
            shape: shape.to_vec(),
            data,
        })
    }

    pub(crate) fn f32(shape: &[usize]) -> Out {
        Out {
            shape: shape.to_vec(),
            data: OutData::F32(vec![0.0; shape.iter().product()]),
        }
    }

    pub(crate) fn buffer(&mut self) -> BufferMut<'_> {
        let (dtype, data): (_, &mut [u8]) = match &mut self.data {
            OutData::F32(v) => (codex_plugin_api::DType::F32, bytemuck::cast_slice_mut(v)),
            OutData::Bf16(v) => (codex_plugin_api::DType::BF16, bytemuck::cast_slice_mut(v)),
            OutData::F16(v) => (codex_plugin_api::DType::F16, bytemuck::cast_slice_mut(v)),
        };
        BufferMut {
            dtype,
            shape: RSlice::from_slice(&self.shape),
            data: RSliceMut::from_mut_slice(data),
        }
    }

    pub(crate) fn into_storage(self) -> (CpuStorage, Shape) {
        let shape = Shape::from(self.shape);
        match self.data {
            OutData::F32(v) => (CpuStorage::F32(v), shape),
            OutData::Bf16(v) => (CpuStorage::BF16(v), shape),
            OutData::F16(v) => (CpuStorage::F16(v), shape),
        }
    }

    pub(crate) fn into_tensor(self) -> CResult<Tensor> {
        let shape = self.shape;
        match self.data {
            OutData::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            OutData::Bf16(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            OutData::F16(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        }
    }
}

/// Run `op` on whole tensors (made contiguous first), filling `outs`.
pub(crate) fn run_on_tensors(
    k: &ActiveKernel,
    op: &'static str,
    inputs: &[&Tensor],
    attrs: &[f64],
    outs: &mut [Out],
) -> CResult<()> {
    let owned = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<CResult<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(s) = &**storage else {
            candle_core::bail!("{op}: a cpu kernel needs tensors on the cpu");
        };
        views.push(view(s, layout)?);
    }
    let mut bufs: Vec<BufferMut<'_>> = outs.iter_mut().map(Out::buffer).collect();
    k.run(op, &views, attrs, &mut bufs)
}

fn lead(dims: &[usize]) -> &[usize] {
    &dims[..dims.len().saturating_sub(1)]
}

fn saved(slot: &Mutex<Option<Tensor>>, op: &str) -> CResult<Tensor> {
    slot.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: backward before forward")))
}

fn keep(slot: &Mutex<Option<Tensor>>, t: Tensor) {
    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(t);
}

// -- softmax ----------------------------------------------------------------------------------

struct Softmax(Arc<ActiveKernel>);

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax_last_dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let mut y = Out::new(s.dtype(), l.dims())?;
        self.0.run(
            "softmax_last_dim.fwd",
            &[view(s, l)?],
            &[],
            &mut [y.buffer()],
        )?;
        Ok(y.into_storage())
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let mut dx = [Out::new(y.dtype(), y.dims())?];
        run_on_tensors(&self.0, "softmax_last_dim.bwd", &[y, dy], &[], &mut dx)?;
        let [dx] = dx;
        Ok(Some(dx.into_tensor()?))
    }
}

/// Softmax over `dim` through the kernel (over the last dimension; another `dim` is swapped
/// to the end and back).
pub(crate) fn softmax(x: &Tensor, dim: usize) -> Result<Option<Tensor>> {
    let Some(k) = kernel_for(x, "softmax_last_dim.fwd") else {
        return Ok(None);
    };
    if !k.has("softmax_last_dim.bwd") || x.elem_count() == 0 {
        return Ok(None);
    }
    let last = x.rank() - 1;
    if dim == last {
        return Ok(Some(x.contiguous()?.apply_op1(Softmax(k))?));
    }
    let moved = x.transpose(dim, last)?.contiguous()?;
    Ok(Some(moved.apply_op1(Softmax(k))?.transpose(dim, last)?))
}

// -- GELU -------------------------------------------------------------------------------------

struct Gelu {
    k: Arc<ActiveKernel>,
    form: GeluForm,
}

impl Gelu {
    fn ops(form: GeluForm) -> (&'static str, &'static str) {
        match form {
            GeluForm::Erf => ("gelu_erf.fwd", "gelu_erf.bwd"),
            GeluForm::Tanh => ("gelu_tanh.fwd", "gelu_tanh.bwd"),
        }
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let mut y = Out::new(s.dtype(), l.dims())?;
        self.k.run(
            Gelu::ops(self.form).0,
            &[view(s, l)?],
            &[],
            &mut [y.buffer()],
        )?;
        Ok(y.into_storage())
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let mut dx = [Out::new(x.dtype(), x.dims())?];
        run_on_tensors(&self.k, Gelu::ops(self.form).1, &[x, dy], &[], &mut dx)?;
        let [dx] = dx;
        Ok(Some(dx.into_tensor()?))
    }
}

/// GELU through the kernel.
pub(crate) fn gelu(x: &Tensor, form: GeluForm) -> Result<Option<Tensor>> {
    let (fwd, bwd) = Gelu::ops(form);
    let Some(k) = kernel_for(x, fwd) else {
        return Ok(None);
    };
    if !k.has(bwd) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Gelu { k, form })?))
}

// -- layer norm and RMS norm ------------------------------------------------------------------

struct LayerNorm {
    k: Arc<ActiveKernel>,
    eps: f64,
    mean: Mutex<Option<Tensor>>,
    rstd: Mutex<Option<Tensor>>,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let mut y = Out::new(xs.dtype(), xl.dims())?;
        let mut mean = Out::f32(lead(xl.dims()));
        let mut rstd = Out::f32(lead(xl.dims()));
        self.k.run(
            "layer_norm.fwd",
            &[view(xs, xl)?, view(ws, wl)?, view(bs, bl)?],
            &[self.eps],
            &mut [y.buffer(), mean.buffer(), rstd.buffer()],
        )?;
        keep(&self.mean, mean.into_tensor()?);
        keep(&self.rstd, rstd.into_tensor()?);
        Ok(y.into_storage())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (mean, rstd) = (
            saved(&self.mean, "layer_norm")?,
            saved(&self.rstd, "layer_norm")?,
        );
        let mut outs = [
            Out::new(x.dtype(), x.dims())?,
            Out::new(w.dtype(), w.dims())?,
            Out::new(b.dtype(), b.dims())?,
        ];
        run_on_tensors(
            &self.k,
            "layer_norm.bwd",
            &[dy, x, w, &mean, &rstd],
            &[],
            &mut outs,
        )?;
        let [dx, dw, db] = outs;
        Ok((
            Some(dx.into_tensor()?),
            Some(dw.into_tensor()?),
            Some(db.into_tensor()?),
        ))
    }
}

fn norm_kernel(x: &Tensor, params: &[&Tensor], op: &str) -> Option<Arc<ActiveKernel>> {
    if x.rank() == 0 || x.elem_count() == 0 {
        return None;
    }
    if params
        .iter()
        .any(|p| !matches!(p.dtype(), DType::F32 | DType::BF16))
    {
        return None;
    }
    kernel_for(x, &format!("{op}.fwd")).filter(|k| k.has(&format!("{op}.bwd")))
}

/// Layer norm over the last dimension through the kernel (shapes already checked).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let Some(k) = norm_kernel(x, &[w, b], "layer_norm") else {
        return Ok(None);
    };
    let op = LayerNorm {
        k,
        eps,
        mean: Mutex::new(None),
        rstd: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

struct RmsNorm {
    k: Arc<ActiveKernel>,
    eps: f64,
    rstd: Mutex<Option<Tensor>>,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let mut y = Out::new(xs.dtype(), xl.dims())?;
        let mut rstd = Out::f32(lead(xl.dims()));
        self.k.run(
            "rms_norm.fwd",
            &[view(xs, xl)?, view(ws, wl)?],
            &[self.eps],
            &mut [y.buffer(), rstd.buffer()],
        )?;
        keep(&self.rstd, rstd.into_tensor()?);
        Ok(y.into_storage())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let rstd = saved(&self.rstd, "rms_norm")?;
        let mut outs = [
            Out::new(x.dtype(), x.dims())?,
            Out::new(w.dtype(), w.dims())?,
        ];
        run_on_tensors(&self.k, "rms_norm.bwd", &[dy, x, w, &rstd], &[], &mut outs)?;
        let [dx, dw] = outs;
        Ok((Some(dx.into_tensor()?), Some(dw.into_tensor()?)))
    }
}

/// RMS norm over the last dimension through the kernel (shapes already checked).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let Some(k) = norm_kernel(x, &[w], "rms_norm") else {
        return Ok(None);
    };
    let op = RmsNorm {
        k,
        eps,
        rstd: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, op)?))
}

// -- cross-entropy ----------------------------------------------------------------------------

/// What the cross-entropy forward pass leaves for its caller and its backward pass.
#[derive(Default)]
struct CeSaved {
    lse: Option<Tensor>,
    tokens: Option<Tensor>,
    correct: Option<Tensor>,
}

struct CrossEntropy {
    k: Arc<ActiveKernel>,
    ignore_index: u32,
    saved: Arc<Mutex<CeSaved>>,
}

impl CrossEntropy {
    /// The loss of `logits` (storage and layout) against `targets`; keeps what backward needs.
    fn forward(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let rows = lead(ll.dims());
        let mut loss = Out::f32(&[]);
        let mut tokens = Out::f32(&[]);
        let mut correct = Out::f32(&[]);
        let mut lse = Out::f32(rows);
        self.k.run(
            "cross_entropy.fwd",
            &[view(ls, ll)?, view(ts, tl)?],
            &[f64::from(self.ignore_index)],
            &mut [
                loss.buffer(),
                tokens.buffer(),
                correct.buffer(),
                lse.buffer(),
            ],
        )?;
        let mut s = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        s.lse = Some(lse.into_tensor()?);
        s.tokens = Some(tokens.into_tensor()?);
        s.correct = Some(correct.into_tensor()?);
        Ok(loss.into_storage())
    }

    /// The gradient of the loss with respect to the logits, scaled by `dloss`.
    fn dlogits(&self, logits: &Tensor, targets: &Tensor, dloss: &Tensor) -> CResult<Tensor> {
        let lse = self
            .saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lse
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("cross_entropy: backward before forward".into())
            })?;
        let scale = dloss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut dl = [Out::new(logits.dtype(), logits.dims())?];
        run_on_tensors(
            &self.k,
            "cross_entropy.bwd",
            &[logits, targets, &lse],
            &[f64::from(self.ignore_index), scale],
            &mut dl,
        )?;
        let [dl] = dl;
        dl.into_tensor()
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.forward(ls, ll, ts, tl)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.dlogits(logits, targets, dloss)?), None))
    }
}

/// Cross-entropy of logits `x · w` taken over by one op on `x` and `w`: its backward turns the
/// logits' gradient straight into theirs, so the `[rows, vocab]` matmul output never gets a
/// gradient of its own (candle would zero-fill one and add into it).
struct LinearCrossEntropy {
    ce: CrossEntropy,
    /// The logits the matmul already computed, detached.
    logits: Tensor,
    /// The kernel the product ran in half precision with, if it did.
    half: Option<Arc<ActiveKernel>>,
    /// Whether the weight operand is `w` for logits `x · wᵀ`.
    transposed: bool,
    /// Where the weight's gradient goes, if the op sends it itself.
    direct: Option<Direct>,
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }

    fn cpu_fwd(
        &self,
        _xs: &CpuStorage,
        _xl: &Layout,
        _ws: &CpuStorage,
        _wl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (guard, ll) = self.logits.storage_and_layout();
        let Storage::Cpu(ls) = &*guard else {
            candle_core::bail!("cross_entropy: a cpu kernel needs logits on the cpu");
        };
        self.ce.forward(ls, ll, ts, tl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dl = self.ce.dlogits(&self.logits, targets, dloss)?;
        let (dx, dw) = matmul_grads(
            self.half.as_deref(),
            x,
            w,
            self.transposed,
            self.direct.as_ref(),
            &dl,
        )?;
        Ok((dx, dw, None))
    }
}

/// The gradients of `x · w` (with `transposed`, of `x · wᵀ`, `w`'s gradient in `w`'s own
/// layout) for the output gradient `dy`, each only for an operand that takes part in the
/// graph (a frozen weight gets none); in half precision with `half` (the kernel the forward
/// product ran in half precision with).
///
/// With `direct`, `w` came in detached and its gradient goes to its slot ([`Direct`]); the
/// result then has none for it.
fn matmul_grads(
    half: Option<&ActiveKernel>,
    x: &Tensor,
    w: &Tensor,
    transposed: bool,
    direct: Option<&Direct>,
    dy: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let want_dw = direct.is_some() || w.track_op();
    let (dx, dw) = match half {
        Some(k) => mixed::matmul_grads(k, x, w, transposed, want_dw, dy)?,
        None => {
            let w_ = w.detach();
            let dx = if !x.track_op() {
                None
            } else if transposed {
                Some(dy.matmul(&w_)?)
            } else {
                Some(dy.matmul(&w_.t()?)?)
            };
            let dw = if !want_dw {
                None
            } else if transposed {
                Some(dy.t()?.matmul(&x.detach())?)
            } else {
                Some(x.detach().t()?.matmul(dy)?)
            };
            (dx, dw)
        }
    };
    Ok(match (direct, dw) {
        (Some(d), Some(dw)) => {
            d.send(dw);
            (dx, None)
        }
        (_, dw) => (dx, dw),
    })
}

/// The operands of a 2-D product `x · w` that a later op fuses with: `w_of` is the 2-D tensor
/// `w` is the transpose of, if it is one (a weight stored `[out, in]`, a tied embedding as the
/// LM head). The fused op then takes `w_of` as its operand and gives it its gradient in its
/// own layout: through the transpose, candle would zero-fill a gradient of `w_of`'s size and
/// add the transposed one into it element by element.
///
/// `direct` is where `w`'s gradient goes when `w` is (a view of) a trainable weight: the fused
/// op then takes its operand detached and sends the gradient itself ([`Direct`]).
#[derive(Clone)]
pub(crate) struct Product {
    pub(crate) x: Tensor,
    pub(crate) w: Tensor,
    pub(crate) w_of: Option<Tensor>,
    pub(crate) direct: Option<Direct>,
}

impl Product {
    /// The fused op's weight operand and whether it is the product's transpose.
    fn operand(&self) -> (Tensor, bool) {
        let (w, transposed) = match &self.w_of {
            Some(w) => (w, true),
            None => (&self.w, false),
        };
        let w = if self.direct.is_some() {
            w.detach()
        } else {
            w.clone()
        };
        (w, transposed)
    }
}

/// Cross-entropy through the kernel: `(loss_sum, tokens, correct)`, f32 scalars. Shapes and
/// dtypes already checked (`logits [n, v]`, u32 `targets [n]`).
///
/// With `product = Some((x, w))`, `logits` is `x · w` and the op runs on `x` and `w` instead
/// ([`LinearCrossEntropy`]).
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
    product: Option<&Product>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(k) = kernel_for(logits, "cross_entropy.fwd") else {
        return Ok(None);
    };
    if !k.has("cross_entropy.bwd") || logits.elem_count() == 0 {
        return Ok(None);
    }
    let saved = Arc::new(Mutex::new(CeSaved::default()));
    let ce = CrossEntropy {
        k,
        ignore_index,
        saved: saved.clone(),
    };
    let targets = targets.contiguous()?;
    let loss = match product {
        Some(p) if logits.is_contiguous() => {
            let (w, transposed) = p.operand();
            let op = LinearCrossEntropy {
                ce,
                logits: logits.detach(),
                half: mixed::kernel_for(&p.x, &p.w),
                transposed,
                direct: p.direct.clone(),
            };
            p.x.apply_op3(&w, &targets, op)?
        }
        _ => logits.contiguous()?.apply_op2(&targets, ce)?,
    };
    let s = saved.lock().unwrap_or_else(PoisonError::into_inner);
    match (&s.tokens, &s.correct) {
        (Some(tokens), Some(correct)) => Ok(Some((loss, tokens.clone(), correct.clone()))),
        _ => Err(TensorError::Invalid(
            "cross_entropy: the kernel left no token counts".into(),
        )),
    }
}

// -- attention --------------------------------------------------------------------------------

struct Attention {
    k: Arc<ActiveKernel>,
    scale: f64,
    lse: Mutex<Option<Tensor>>,
    /// u32 `[b, t]`, where each query's example starts in its row, when the rows are packed
    /// (`packed_attention` then, which confines each query to its example).
    starts: Option<Tensor>,
}

impl Attention {
    fn new(k: Arc<ActiveKernel>, scale: f64, packing: Option<&Packing>) -> Self {
        Attention {
            k,
            scale,
            lse: Mutex::new(None),
            starts: packing.map(|p| p.starts().clone()),
        }
    }

    /// The kernel op for `pass` (`fwd` or `bwd`).
    fn op(&self, pass: Pass) -> &'static str {
        match (&self.starts, pass) {
            (None, Pass::Fwd) => "causal_attention.fwd",
            (None, Pass::Bwd) => "causal_attention.bwd",
            (Some(_), Pass::Fwd) => "packed_attention.fwd",
            (Some(_), Pass::Bwd) => "packed_attention.bwd",
        }
    }

    /// The active kernel for attention on `q`, when it has both passes of the op needed.
    fn kernel(q: &Tensor, packing: Option<&Packing>) -> Option<Arc<ActiveKernel>> {
        let (fwd, bwd) = match packing {
            None => ("causal_attention.fwd", "causal_attention.bwd"),
            Some(_) => ("packed_attention.fwd", "packed_attention.bwd"),
        };
        kernel_for(q, fwd).filter(|k| k.has(bwd))
    }
}

#[derive(Clone, Copy)]
enum Pass {
    Fwd,
    Bwd,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal_attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let ((qs, ql), (ks, kl), (vs, vl)) = (dense(qs, ql)?, dense(ks, kl)?, dense(vs, vl)?);
        let mut out = Out::new(qs.dtype(), ql.dims())?;
        let mut lse = Out::f32(lead(ql.dims()));
        let starts = self.starts.as_ref().map(|s| s.storage_and_layout());
        let mut ins = vec![view(&qs, &ql)?, view(&ks, &kl)?, view(&vs, &vl)?];
        if let Some((storage, layout)) = &starts {
            let Storage::Cpu(s) = &**storage else {
                candle_core::bail!("packed_attention: the rows' layout is not on the cpu");
            };
            ins.push(view(s, layout)?);
        }
        self.k.run(
            self.op(Pass::Fwd),
            &ins,
            &[self.scale],
            &mut [out.buffer(), lse.buffer()],
        )?;
        keep(&self.lse, lse.into_tensor()?);
        Ok(out.into_storage())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = saved(&self.lse, "causal_attention")?;
        let mut outs = [
            Out::new(q.dtype(), q.dims())?,
            Out::new(k.dtype(), k.dims())?,
            Out::new(v.dtype(), v.dims())?,
        ];
        let mut ins = vec![q, k, v, out, &lse, dout];
        ins.extend(&self.starts);
        run_on_tensors(&self.k, self.op(Pass::Bwd), &ins, &[self.scale], &mut outs)?;
        let [dq, dk, dv] = outs;
        Ok((
            Some(dq.into_tensor()?),
            Some(dk.into_tensor()?),
            Some(dv.into_tensor()?),
        ))
    }
}

/// Causal attention through the kernel: q `[.., t, d]`, k and v `[.., s, d]` with `s ≥ t`
/// (the mask aligned to the last key), one dtype; confined to each example of packed rows
/// when `packing` is given.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    packing: Option<&Packing>,
) -> Result<Option<Tensor>> {
    let r = q.rank();
    if !causal || r < 2 || q.elem_count() == 0 {
        return Ok(None);
    }
    let (qd, kd) = (q.dims(), k.dims());
    let keys_fit = kd.len() == r
        && kd[..r - 2] == qd[..r - 2]
        && kd[r - 1] == qd[r - 1]
        && kd[r - 2] >= qd[r - 2];
    if !keys_fit || v.dims() != kd {
        return Ok(None);
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Ok(None);
    }
    let Some(kernel) = Attention::kernel(q, packing) else {
        return Ok(None);
    };
    let op = Attention::new(kernel, scale, packing);
    // Strided q, k and v (heads split off a projection by a reshape and a transpose) go in as
    // they are: the op gathers them itself, where `contiguous` would add three copies to the
    // graph, each with a gradient of its own in backward.
    Ok(Some(q.apply_op3(k, v, op)?))
}

/// Causal attention on heads kept inside their `[b·t, h·d]` projections: the op gathers the
/// `[b, h, t, d]` heads itself and scatters their gradients back into rows, so the reshape and
/// transpose that split them off (`fusion`) get no gradients of their own.
struct AttentionRows {
    inner: Attention,
    /// `[b, t, h, d]`.
    dims: [usize; 4],
}

impl AttentionRows {
    /// The `[b, h, t, d]` heads of rows laid out by `l`, as a strided layout over them.
    fn heads(&self, l: &Layout) -> Layout {
        let [b, t, h, d] = self.dims;
        Layout::new(
            Shape::from(vec![b, h, t, d]),
            vec![t * h * d, d, h * d, 1],
            l.start_offset(),
        )
    }

    fn split(&self, rows: &Tensor) -> CResult<Tensor> {
        let [b, t, h, d] = self.dims;
        rows.detach().reshape((b, t, h, d))?.transpose(1, 2)
    }

    fn join(&self, g: Tensor) -> CResult<Tensor> {
        let [b, t, h, d] = self.dims;
        g.transpose(1, 2)?.reshape((b * t, h * d))
    }
}

impl CustomOp3 for AttentionRows {
    fn name(&self) -> &'static str {
        "causal_attention_rows"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (q, k, v) = (self.heads(ql), self.heads(kl), self.heads(vl));
        self.inner.cpu_fwd(qs, &q, ks, &k, vs, &v)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (self.split(q)?, self.split(k)?, self.split(v)?);
        let grads = self.inner.bwd(&q, &k, &v, out, dout)?;
        let join = |g: Option<Tensor>| g.map(|g| self.join(g)).transpose();
        Ok((join(grads.0)?, join(grads.1)?, join(grads.2)?))
    }
}

/// Causal attention over the heads of `[b·t, h·d]` projections `q`, `k` and `v` (contiguous,
/// one dtype), `dims = [b, t, h, d]`: the `[b, h, t, d]` result of the kernel, or `None`.
pub(crate) fn attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: [usize; 4],
    scale: f64,
    packing: Option<&Packing>,
) -> Result<Option<Tensor>> {
    let [b, t, h, d] = dims;
    let rows = [b * t, h * d];
    if [q, k, v]
        .iter()
        .any(|x| x.dims() != rows || !x.is_contiguous())
        || q.elem_count() == 0
    {
        return Ok(None);
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Ok(None);
    }
    let Some(kernel) = Attention::kernel(q, packing) else {
        return Ok(None);
    };
    let op = AttentionRows {
        inner: Attention::new(kernel, scale, packing),
        dims,
    };
    Ok(Some(q.apply_op3(k, v, op)?))
}

// -- bias add and sums over leading dimensions --------------------------------------------------

/// `a [.., s..] + b [s..]`: candle's own backward sums the gradient over the leading
/// dimensions on a single thread; this one asks the kernel's `sum_rows`.
struct BiasAdd(Arc<ActiveKernel>);

fn add_rows<T: Copy + std::ops::Add<Output = T> + Send + Sync>(
    a: &[T],
    b: &[T],
) -> CResult<Vec<T>> {
    let inner = b.len();
    if inner == 0 || !a.len().is_multiple_of(inner) {
        candle_core::bail!(
            "bias_add: {} values are not rows of the bias's {inner}",
            a.len()
        );
    }
    let mut out: Vec<T> = Vec::with_capacity(a.len());
    // Rows per task: enough work per task to amortise rayon's scheduling.
    let rows = (16_384 / inner).max(1);
    out.spare_capacity_mut()
        .par_chunks_mut(rows * inner)
        .zip(a.par_chunks(rows * inner))
        .for_each(|(o, a)| {
            for (o, a) in o.chunks_exact_mut(inner).zip(a.chunks_exact(inner)) {
                for ((o, &av), &bv) in o.iter_mut().zip(a).zip(b) {
                    o.write(av + bv);
                }
            }
        });
    // SAFETY: `a.len()` is a whole number of rows of `inner` (checked above), and the loop
    // wrote every element of every row.
    unsafe { out.set_len(a.len()) };
    Ok(out)
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias_add"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("bias_add: inputs must be contiguous");
        };
        let out = match (as_, bs) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(add_rows(&a[a0..a1], &b[b0..b1])?)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(add_rows(&a[a0..a1], &b[b0..b1])?)
            }
            _ => candle_core::bail!("bias_add: both inputs must be f32 or both bf16"),
        };
        Ok((out, al.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let mut db = [Out::new(b.dtype(), b.dims())?];
        run_on_tensors(&self.0, "sum_rows", &[dy], &[], &mut db)?;
        let [db] = db;
        Ok((Some(dy.clone()), Some(db.into_tensor()?)))
    }
}

/// `x · w + b` taken over by one op on `x`, `w` and `b`, for the same reason as
/// [`LinearCrossEntropy`]: the matmul output `a` never gets a gradient of its own.
struct LinearBias {
    k: Arc<ActiveKernel>,
    /// `x · w` as the matmul computed it, detached and contiguous; taken by the forward pass.
    /// The op lives in candle's graph until backward, which does not need it: kept, it would
    /// hold every linear layer's product alive through the step.
    a: Mutex<Option<Tensor>>,
    /// The kernel the product ran in half precision with, if it did.
    half: Option<Arc<ActiveKernel>>,
    /// Whether the weight operand is `w` for `x · wᵀ`.
    transposed: bool,
    /// Where the weight's gradient goes, if the op sends it itself.
    direct: Option<Direct>,
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear_bias"
    }

    fn cpu_fwd(
        &self,
        _xs: &CpuStorage,
        _xl: &Layout,
        _ws: &CpuStorage,
        _wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let Some(a) = self.a.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            candle_core::bail!("linear_bias: the product was already added to");
        };
        let (guard, al) = a.storage_and_layout();
        let Storage::Cpu(as_) = &*guard else {
            candle_core::bail!("bias_add: a cpu kernel needs tensors on the cpu");
        };
        BiasAdd(self.k.clone()).cpu_fwd(as_, al, bs, bl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let db = if b.track_op() {
            let mut db = [Out::new(b.dtype(), b.dims())?];
            run_on_tensors(&self.k, "sum_rows", &[dy], &[], &mut db)?;
            let [db] = db;
            Some(db.into_tensor()?)
        } else {
            None
        };
        let (dx, dw) = matmul_grads(
            self.half.as_deref(),
            x,
            w,
            self.transposed,
            self.direct.as_ref(),
            dy,
        )?;
        Ok((dx, dw, db))
    }
}

/// `a + b` where `a = x · w` (2-D, the product `p`) and `b` is a bias over `a`'s columns, through
/// [`LinearBias`]; `None` where [`bias_add`] or plain ops must take it.
pub(crate) fn linear_bias(p: &Product, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if a.rank() != 2 || b.dims() != [a.dims()[1]] || a.dtype() != b.dtype() {
        return Ok(None);
    }
    if !a.is_contiguous() || a.elem_count() == 0 {
        return Ok(None);
    }
    let Some(k) = kernel_for(a, "sum_rows") else {
        return Ok(None);
    };
    let (w, transposed) = p.operand();
    let op = LinearBias {
        k,
        a: Mutex::new(Some(a.detach())),
        half: mixed::kernel_for(&p.x, &p.w),
        transposed,
        direct: p.direct.clone(),
    };
    Ok(Some(p.x.apply_op3(&w, &b.contiguous()?, op)?))
}

/// `a + b` through [`BiasAdd`] when one operand's shape is a proper suffix of the other's
/// (a bias, a position table), both f32 or both bf16, and the kernel has `sum_rows`.
pub(crate) fn bias_add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let (big, small) = if a.rank() >= b.rank() { (a, b) } else { (b, a) };
    if small.rank() == 0 || small.rank() >= big.rank() || big.elem_count() == 0 {
        return Ok(None);
    }
    if big.dims()[big.rank() - small.rank()..] != *small.dims() || big.dtype() != small.dtype() {
        return Ok(None);
    }
    let Some(k) = kernel_for(big, "sum_rows") else {
        return Ok(None);
    };
    Ok(Some(
        big.contiguous()?
            .apply_op2(&small.contiguous()?, BiasAdd(k))?,
    ))
}

struct SumRows {
    k: Arc<ActiveKernel>,
    keep: usize,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = l.dims();
        let mut y = Out::new(s.dtype(), &dims[dims.len() - self.keep..])?;
        self.k
            .run("sum_rows", &[view(s, l)?], &[], &mut [y.buffer()])?;
        Ok(y.into_storage())
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(dy.broadcast_as(x.shape())?))
    }
}

/// The sum over the leading dimensions `0..n` of `x` (`n < rank`), through the kernel; the
/// result keeps the trailing dimensions.
pub(crate) fn sum_leading(x: &Tensor, n: usize) -> Result<Option<Tensor>> {
    if n == 0 || n >= x.rank() || x.elem_count() == 0 {
        return Ok(None);
    }
    let Some(k) = kernel_for(x, "sum_rows") else {
        return Ok(None);
    };
    let keep = x.rank() - n;
    Ok(Some(x.contiguous()?.apply_op1(SumRows { k, keep })?))
}

// -- AdamW ------------------------------------------------------------------------------------

fn f32_slice<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> CResult<&'a mut [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("adamw.step: {what} is not contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        other => candle_core::bail!("adamw.step: {what} must be f32, found {:?}", other.dtype()),
    }
}

fn f32_buffer<'a>(shape: &'a [usize], data: &'a mut [f32]) -> BufferMut<'a> {
    BufferMut {
        dtype: codex_plugin_api::DType::F32,
        shape: RSlice::from_slice(shape),
        data: RSliceMut::from_mut_slice(bytemuck::cast_slice_mut(data)),
    }
}

/// The three in-place updates nest: candle hands out one mutable storage per in-place op, so
/// the parameter's op opens the first moment's, whose op opens the second moment's, whose op
/// calls the kernel with all three.
struct AdamWParam<'a> {
    k: &'a ActiveKernel,
    grad: &'a Tensor,
    m: &'a Tensor,
    v: &'a Tensor,
    attrs: [f64; 6],
}

struct AdamWM<'a, 'p> {
    outer: &'a AdamWParam<'a>,
    param: RefCell<&'p mut [f32]>,
    shape: &'p [usize],
}

struct AdamWV<'a, 'p, 'm> {
    outer: &'a AdamWM<'a, 'p>,
    m: RefCell<&'m mut [f32]>,
}

impl InplaceOp1 for AdamWParam<'_> {
    fn name(&self) -> &'static str {
        "adamw.step"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> CResult<()> {
        let param = f32_slice(s, l, "the parameter")?;
        let inner = AdamWM {
            outer: self,
            param: RefCell::new(param),
            shape: l.dims(),
        };
        self.m.inplace_op1(&inner)
    }
}

impl InplaceOp1 for AdamWM<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw.step"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> CResult<()> {
        let m = f32_slice(s, l, "exp_avg")?;
        let inner = AdamWV {
            outer: self,
            m: RefCell::new(m),
        };
        self.outer.v.inplace_op1(&inner)
    }
}

impl InplaceOp1 for AdamWV<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "adamw.step"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> CResult<()> {
        let v = f32_slice(s, l, "exp_avg_sq")?;
        let top = self.outer.outer;
        let mut param = self.outer.param.borrow_mut();
        let mut m = self.m.borrow_mut();
        let shape = self.outer.shape;
        let (g, gl) = top.grad.storage_and_layout();
        let Storage::Cpu(g) = &*g else {
            candle_core::bail!("adamw.step: the gradient is not on the cpu");
        };
        let grad = view(g, gl)?;
        let mut outs = [
            f32_buffer(shape, &mut param),
            f32_buffer(shape, &mut m),
            f32_buffer(shape, v),
        ];
        top.k.run("adamw.step", &[grad], &top.attrs, &mut outs)
    }
}

/// One AdamW step in place through the kernel: `param`, `m` and `v` are the declared f32
/// tensors' storage (not copies), `grad` the gradient. `None` when the kernel cannot take it.
pub(crate) fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: AdamWHyper,
) -> Result<Option<()>> {
    let Some(k) = kernel_for(grad, "adamw.step") else {
        return Ok(None);
    };
    let all_f32 = [param, m, v].iter().all(|t| t.dtype() == DType::F32);
    let contiguous = [param, m, v].iter().all(|t| t.is_contiguous());
    if !all_f32 || !contiguous || !param.device().is_cpu() {
        return Ok(None);
    }
    let grad = grad.contiguous()?;
    let op = AdamWParam {
        k: &k,
        grad: &grad,
        m,
        v,
        attrs: [h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step as f64],
    };
    param.inplace_op1(&op)?;
    mixed::weights_changed(param);
    Ok(Some(()))
}
