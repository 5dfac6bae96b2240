//! Mixed precision: 2-D matrix products in bf16 or f16 with f32 accumulation, on f32 tensors.
//!
//! With [`Precision::Bf16`] and a kernel that offers `bf16_gemm` (or [`Precision::F16`] and
//! `f16_gemm`; see [`scoped_kernel_at`]), every 2-D f32 matmul of the op table — a linear
//! layer's product, the LM head — and the gradients of those products in backward round their
//! operands to the half format and sum the products in f32. Tensors stay f32 throughout:
//! parameters, gradients and optimizer state are the f32 master copies, and norms, softmax,
//! attention, the loss and every reduction run in f32 as before. That is PyTorch's CPU
//! autocast, less the casts around every op. f16's range ends at 65504: an operand beyond it
//! becomes ±inf, which is what a loss scaler (the trainer's) watches the gradients for.
//!
//! The right operand of a forward product is packed into the kernel's layout once and kept
//! while its values are unchanged: a parameter is keyed by its variable (itself, or the
//! variable it is a transpose of), and every in-place write to a declared tensor (an optimizer
//! update, an assignment, a checkpoint load) calls [`weights_changed`] for it, which drops its
//! packed copy; a store that is dropped forgets its tensors' copies. So each weight is packed once per optimizer step however many micro-steps and
//! evaluations use it, and the packed copies (half the size of the f32 weights) are the only
//! second copy of the weights. Backward packs the operands it needs per call: they are
//! gradients, or a weight in the other orientation, each used once per step.
//!
//! [`scoped_kernel_at`]: crate::scoped_kernel_at

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::autograd::Direct;
use super::dispatch::{self, ActiveKernel, Out};

type CResult<T> = candle_core::Result<T>;

/// The precision of a training step's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Matrix products in bf16 with f32 accumulation; everything else in f32.
    Bf16,
    /// Matrix products in f16 (IEEE half) with f32 accumulation; everything else in f32.
    F16,
}

impl Precision {
    /// Its name in configs and on the command line: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The kernel ops its products need, `[pack, product]`; `None` for f32.
    pub(crate) fn ops(self) -> Option<[&'static str; 2]> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(["bf16_gemm.pack", "bf16_gemm"]),
            Precision::F16 => Some(["f16_gemm.pack", "f16_gemm"]),
        }
    }
}

/// Packed right operands of forward products, by the variable they were packed from.
static CACHE: Mutex<Vec<Packed>> = Mutex::new(Vec::new());

struct Packed {
    /// candle's id of the variable packed.
    source: candle_core::TensorId,
    /// Whether the operand was the variable's transpose.
    transposed: bool,
    packed: Tensor,
}

/// The variable `var` was written in place (or is gone): its packed copies are stale.
pub(crate) fn weights_changed(var: &Tensor) {
    forget(&[var.id()]);
}

/// Drop the packed copies of the variables `ids`.
pub(crate) fn forget(ids: &[candle_core::TensorId]) {
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if !cache.is_empty() {
        cache.retain(|p| !ids.contains(&p.source));
    }
}

/// How many variables have a packed copy now.
pub fn packed_operands() -> usize {
    CACHE.lock().unwrap_or_else(PoisonError::into_inner).len()
}

/// A 2-D tensor as a kernel operand: a contiguous tensor and whether it holds the transpose.
fn operand(t: &Tensor) -> CResult<(Tensor, bool)> {
    if t.is_contiguous() {
        return Ok((t.clone(), false));
    }
    let tt = t.t()?;
    if tt.is_contiguous() {
        return Ok((tt, true));
    }
    Ok((t.contiguous()?, false))
}

/// The pack and product ops of `k`'s half precision, the packed dtype and its row group.
fn half_ops(k: &ActiveKernel) -> CResult<([&'static str; 2], DType, usize)> {
    let precision = k.products();
    let Some(ops) = precision.ops() else {
        candle_core::bail!("mixed precision: the kernel multiplies in f32");
    };
    Ok(match precision {
        Precision::F16 => (ops, DType::F16, 1),
        _ => (ops, DType::BF16, 2),
    })
}

/// `b: [k, n]` packed by the kernel.
fn pack(k: &ActiveKernel, b: &Tensor) -> CResult<Tensor> {
    let (src, transposed) = operand(b)?;
    let (kk, n) = b.dims2()?;
    let ([pack_op, _], dtype, group) = half_ops(k)?;
    let len = codex_kernels_layout::packed_len(kk, n, group);
    let mut out = [Out::new(dtype, &[len])?];
    dispatch::run_on_tensors(
        k,
        pack_op,
        &[&src],
        &[if transposed { 1.0 } else { 0.0 }],
        &mut out,
    )?;
    let [out] = out;
    out.into_tensor()
}

/// `b` packed, from the cache when `key` names the variable `b` is (or is the transpose of).
fn pack_cached(k: &ActiveKernel, b: &Tensor, key: Option<(&Tensor, bool)>) -> CResult<Tensor> {
    let Some((var, transposed)) = key else {
        return pack(k, b);
    };
    let found = CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|p| p.source == var.id() && p.transposed == transposed)
        .map(|p| p.packed.clone());
    if let Some(packed) = found {
        return Ok(packed);
    }
    // Packed outside the lock; a weight is only written between steps, on this thread.
    let packed = pack(k, b)?;
    CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Packed {
            source: var.id(),
            transposed,
            packed: packed.clone(),
        });
    Ok(packed)
}

/// `a · b` for `a: [m, k]` and `b` packed for `[k, n]`.
fn gemm(k: &ActiveKernel, a: &Tensor, packed: &Tensor, n: usize) -> CResult<Tensor> {
    let (src, transposed) = operand(a)?;
    let (m, _) = a.dims2()?;
    let ([_, product_op], _, _) = half_ops(k)?;
    let mut out = [Out::f32(&[m, n])];
    dispatch::run_on_tensors(
        k,
        product_op,
        &[&src, packed],
        &[if transposed { 1.0 } else { 0.0 }, n as f64],
        &mut out,
    )?;
    let [out] = out;
    out.into_tensor()
}

/// The gradients of `x · w` for the output gradient `dy`, both products in the kernel's half
/// precision: `x`'s where it takes part in the graph, `w`'s with `want_dw`. With `transposed`, the product was `x · wᵀ` and `w`'s gradient comes in `w`'s own
/// layout, `dyᵀ · x`.
pub(crate) fn matmul_grads(
    k: &ActiveKernel,
    x: &Tensor,
    w: &Tensor,
    transposed: bool,
    want_dw: bool,
    dy: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let want_dx = x.track_op();
    let (w, x, dy) = (w.detach(), x.detach(), dy.contiguous()?);
    let dx = if want_dx {
        // dy · wᵀ, or dy · w for a product by wᵀ.
        let (rhs, n) = if transposed {
            (w.clone(), w.dim(1)?)
        } else {
            (w.t()?, w.dim(0)?)
        };
        Some(gemm(k, &dy, &pack(k, &rhs)?, n)?)
    } else {
        None
    };
    let dw = if !want_dw {
        None
    } else if transposed {
        Some(gemm(k, &dy.t()?, &pack(k, &x)?, x.dim(1)?)?)
    } else {
        Some(gemm(k, &x.t()?, &pack(k, &dy)?, dy.dim(1)?)?)
    };
    Ok((dx, dw))
}

/// The kernel that runs half-precision products for `a · b` from the calling thread, if the
/// products are to be in half precision: precision bf16 or f16, a kernel offering them, 2-D
/// f32 operands on the cpu.
pub(crate) fn kernel_for(a: &Tensor, b: &Tensor) -> Option<Arc<ActiveKernel>> {
    let fits = a.rank() == 2
        && b.rank() == 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims()[1] == b.dims()[0];
    if !fits {
        return None;
    }
    dispatch::active(a.device()).filter(|k| k.products() != Precision::F32)
}

/// `a · b` in half precision with f32 accumulation, with its own backward in half precision.
/// `key` names the variable `b` is (`false`) or is the transpose of (`true`), whose packed
/// copy is kept. `b_of` is the 2-D tensor `b` is the transpose of, if it is one: the node then
/// takes it as its operand, so that its gradient comes in its own layout rather than through
/// a transpose.
pub(crate) fn matmul(
    k: Arc<ActiveKernel>,
    a: &Tensor,
    b: &Tensor,
    key: Option<(&Tensor, bool)>,
    b_of: Option<&Tensor>,
    direct: Option<Direct>,
) -> CResult<Tensor> {
    let n = b.dim(1)?;
    let packed = pack_cached(&k, b, key)?;
    let a = if a.is_contiguous() {
        a.clone()
    } else {
        a.contiguous()?
    };
    let (rhs, transposed) = match b_of {
        Some(w) => (w, true),
        None => (b, false),
    };
    let rhs = if direct.is_some() {
        rhs.detach()
    } else {
        rhs.clone()
    };
    a.apply_op2(
        &rhs,
        HalfMatmul {
            k,
            packed,
            n,
            transposed,
            direct,
        },
    )
}

/// A product computed in half precision, as a node of candle's graph, with both gradients
/// in half precision.
struct HalfMatmul {
    k: Arc<ActiveKernel>,
    /// The right operand, packed.
    packed: Tensor,
    n: usize,
    /// Whether the node's right operand is `w` for a product by `wᵀ`.
    transposed: bool,
    /// Where the weight's gradient goes, if the node sends it itself (the right operand is
    /// then detached).
    direct: Option<Direct>,
}

impl CustomOp2 for HalfMatmul {
    fn name(&self) -> &'static str {
        match self.k.products() {
            Precision::F16 => "f16_matmul",
            _ => "bf16_matmul",
        }
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        _bs: &CpuStorage,
        _bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (guard, pl) = self.packed.storage_and_layout();
        let Storage::Cpu(ps) = &*guard else {
            candle_core::bail!("{}: a cpu kernel needs tensors on the cpu", self.name());
        };
        let m = al.dims()[0];
        let ([_, product_op], _, _) = half_ops(&self.k)?;
        let mut out = Out::f32(&[m, self.n]);
        self.k.run(
            product_op,
            &[dispatch::view(as_, al)?, dispatch::view(ps, pl)?],
            &[0.0, self.n as f64],
            &mut [out.buffer()],
        )?;
        Ok(out.into_storage())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let want_db = self.direct.is_some() || b.track_op();
        let (da, db) = matmul_grads(&self.k, a, b, self.transposed, want_db, dy)?;
        Ok(match (&self.direct, db) {
            (Some(d), Some(db)) => {
                d.send(db);
                (da, None)
            }
            (_, db) => (da, db),
        })
    }
}

/// The packed layout's size, as the `cpu` kernel documents it for `bf16_gemm.pack` and
/// `f16_gemm.pack`.
mod codex_kernels_layout {
    /// Half values for `b: [k, n]`: panels of 32 columns, rows in groups of `group` (bf16
    /// pairs them, f16 does not).
    pub(super) fn packed_len(k: usize, n: usize, group: usize) -> usize {
        n.div_ceil(32) * 32 * k.div_ceil(group) * group
    }
}

/// The rate of `[m, k] · [k, n]` products on the cpu, in FLOP/s, at `precision`, measured for
/// about `seconds` (the best of repeated products): the matmul peak a training step's model
/// FLOP/s compare with. bf16 and f16 need the calling thread's kernel to offer their products
/// ([`products_precision`](crate::products_precision)); the right operand is packed once, as
/// a weight is.
pub fn matmul_rate(
    precision: Precision,
    (m, k, n): (usize, usize, usize),
    seconds: f64,
) -> crate::Result<f64> {
    use rand::{Rng, SeedableRng};
    let device = candle_core::Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut draw =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let a = Tensor::from_vec(draw(m * k), (m, k), &device)?;
    let b = Tensor::from_vec(draw(k * n), (k, n), &device)?;
    let product: Box<dyn Fn() -> CResult<Tensor>> = match precision {
        Precision::F32 => Box::new(|| a.matmul(&b)),
        Precision::Bf16 | Precision::F16 => {
            let Some(kernel) = dispatch::active(&device).filter(|k| k.products() == precision)
            else {
                return Err(crate::TensorError::Invalid(format!(
                    "{} products need a kernel that offers them on this CPU",
                    precision.name()
                )));
            };
            let packed = pack(&kernel, &b)?;
            Box::new(move || gemm(&kernel, &a, &packed, n))
        }
    };
    product()?;
    let start = std::time::Instant::now();
    let mut best = f64::INFINITY;
    while start.elapsed().as_secs_f64() < seconds {
        let t = std::time::Instant::now();
        product()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    if !best.is_finite() {
        let t = std::time::Instant::now();
        product()?;
        best = t.elapsed().as_secs_f64();
    }
    Ok(2.0 * (m * k * n) as f64 / best)
}
