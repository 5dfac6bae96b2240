//! The fused element-wise update: a program from `codex_plugin_api::elementwise`, evaluated in
//! one pass over the elements, its results written into declared tensors in place.
//!
//! The program is checked whole against the call before anything is read or written (every
//! code known, the stack never runs dry and ends empty, every index in range, every target
//! written exactly once, targets declared, float and of one shape, inputs of that shape or one
//! element). Then, on the CPU, the targets' storage is written in place, as `adamw_update` does:
//! candle lends out a storage mutably only inside an in-place op, so the targets' in-place ops
//! nest, one inside the other, and the innermost runs the program with every target's slice and
//! every input's. Storage locks are taken once per storage, in address order (candle's own
//! order), so a storage shared by two inputs, or by an input and a target, is never locked
//! twice. An input that shares a target's storage with the same layout is read from the
//! target's slice itself; everything the program reads of a block is read before the block's
//! results are written, so such an input gives its value from before the call. An input that
//! shares a target's storage in another layout (a transposed view, say) is copied first.
//!
//! The interpreter runs each instruction over a block of elements before the next, so the
//! dispatch is paid once per block and the block's values stay in the first-level cache; large
//! tensors are cut into chunks that run on rayon's pool. Values are f32 (or f64, when a tensor
//! operand is f64) and each instruction is the same arithmetic candle does for the composed
//! op, so the result equals the composition bit for bit.
//!
//! Elsewhere — another device, or a target candle cannot lend contiguously — the program is
//! composed from candle ops on whole tensors and the results assigned, with the same results.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use codex_plugin_api::elementwise::{ElemInstr, ElemOp};
use codex_plugin_api::{TensorId, API_VERSION};
use half::{bf16, f16};
use rayon::prelude::*;

use super::handles::{self, Leaf};
use super::{autograd, Result, TensorError};

type CResult<T> = candle_core::Result<T>;

/// The deepest stack a program may use; deeper programs are refused (split them).
const MAX_DEPTH: usize = 64;
/// Elements each instruction runs over before the next instruction runs.
const BLOCK: usize = 256;
/// Elements per task on rayon's pool; smaller tensors run on the calling thread.
const CHUNK: usize = 1 << 15;

fn invalid(message: String) -> TensorError {
    TensorError::Invalid(message)
}

/// An instruction that passed [`check`], in the engine's own exhaustive terms.
#[derive(Clone, Copy, Debug)]
enum Instr {
    Input(usize),
    Scalar(usize),
    Const(f64),
    Store(usize),
    Unary(Un),
    Binary(Bin),
    Ternary(Tern),
}

#[derive(Clone, Copy, Debug)]
enum Un {
    Neg,
    Abs,
    Sign,
    Sqr,
    Sqrt,
    Rsqrt,
    Recip,
    Exp,
    Log,
    Tanh,
}

#[derive(Clone, Copy, Debug)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug)]
enum Tern {
    Clamp,
    Select,
}

impl Instr {
    /// The engine's form of `op`; `None` for an instruction this engine does not run.
    fn of(op: ElemOp) -> Option<Instr> {
        Some(match op {
            ElemOp::Input(i) => Instr::Input(i as usize),
            ElemOp::Scalar(k) => Instr::Scalar(k as usize),
            ElemOp::Const(v) => Instr::Const(v),
            ElemOp::Store(j) => Instr::Store(j as usize),
            ElemOp::Neg => Instr::Unary(Un::Neg),
            ElemOp::Abs => Instr::Unary(Un::Abs),
            ElemOp::Sign => Instr::Unary(Un::Sign),
            ElemOp::Sqr => Instr::Unary(Un::Sqr),
            ElemOp::Sqrt => Instr::Unary(Un::Sqrt),
            ElemOp::Rsqrt => Instr::Unary(Un::Rsqrt),
            ElemOp::Recip => Instr::Unary(Un::Recip),
            ElemOp::Exp => Instr::Unary(Un::Exp),
            ElemOp::Log => Instr::Unary(Un::Log),
            ElemOp::Tanh => Instr::Unary(Un::Tanh),
            ElemOp::Add => Instr::Binary(Bin::Add),
            ElemOp::Sub => Instr::Binary(Bin::Sub),
            ElemOp::Mul => Instr::Binary(Bin::Mul),
            ElemOp::Div => Instr::Binary(Bin::Div),
            ElemOp::Maximum => Instr::Binary(Bin::Maximum),
            ElemOp::Minimum => Instr::Binary(Bin::Minimum),
            ElemOp::Eq => Instr::Binary(Bin::Eq),
            ElemOp::Ne => Instr::Binary(Bin::Ne),
            ElemOp::Lt => Instr::Binary(Bin::Lt),
            ElemOp::Le => Instr::Binary(Bin::Le),
            ElemOp::Gt => Instr::Binary(Bin::Gt),
            ElemOp::Ge => Instr::Binary(Bin::Ge),
            ElemOp::Clamp => Instr::Ternary(Tern::Clamp),
            ElemOp::Select => Instr::Ternary(Tern::Select),
            _ => return None,
        })
    }
}

/// A program that passed [`check`]: its instructions and the stack depth it needs.
struct Checked {
    instrs: Vec<Instr>,
    depth: usize,
}

/// Check `program` against a call with the given numbers of inputs, scalars and targets.
fn check(program: &[ElemInstr], inputs: usize, scalars: usize, targets: usize) -> Result<Checked> {
    if targets == 0 {
        return Err(invalid(
            "no targets: give the declared tensors the program writes".into(),
        ));
    }
    let mut instrs = Vec::with_capacity(program.len());
    let mut written = vec![false; targets];
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (i, instr) in program.iter().enumerate() {
        let Some(op) = instr.op() else {
            return Err(invalid(format!(
                "instruction {i} has the unknown code {}; this codex-ml runs the instructions \
                 of plugin API {API_VERSION}",
                instr.code
            )));
        };
        let Some(instr) = Instr::of(op) else {
            return Err(invalid(format!(
                "instruction {i} ({op}) is not one this codex-ml runs"
            )));
        };
        let out_of_range = |what: &str, k: usize, have: usize| {
            invalid(format!(
                "instruction {i} ({op}) reads {what} {k}, but the call has {have} {what}s"
            ))
        };
        match instr {
            Instr::Input(k) if k >= inputs => return Err(out_of_range("input", k, inputs)),
            Instr::Scalar(k) if k >= scalars => return Err(out_of_range("scalar", k, scalars)),
            Instr::Store(j) => match written.get_mut(j) {
                None => {
                    return Err(invalid(format!(
                        "instruction {i} ({op}) writes target {j}, but the call has {targets} \
                         targets"
                    )))
                }
                Some(true) => {
                    return Err(invalid(format!(
                        "instruction {i} ({op}) writes target {j} a second time"
                    )))
                }
                Some(w) => *w = true,
            },
            _ => {}
        }
        if depth < op.pops() {
            return Err(invalid(format!(
                "instruction {i} ({op}) takes {} values from the stack, which holds {depth}",
                op.pops()
            )));
        }
        depth = depth - op.pops() + op.pushes();
        deepest = deepest.max(depth);
        if deepest > MAX_DEPTH {
            return Err(invalid(format!(
                "at instruction {i} the program needs more than {MAX_DEPTH} values on the \
                 stack; split it into several updates"
            )));
        }
        instrs.push(instr);
    }
    if depth != 0 {
        return Err(invalid(format!(
            "the program leaves {depth} values on the stack; every value it computes must be \
             used or stored"
        )));
    }
    if let Some(j) = written.iter().position(|w| !w) {
        return Err(invalid(format!(
            "the program never writes target {j}; every target is written exactly once"
        )));
    }
    Ok(Checked {
        instrs,
        depth: deepest,
    })
}

/// Run `program` over `inputs` and `scalars`, writing `targets` in place.
pub(crate) fn update(
    program: &[ElemInstr],
    inputs: &[TensorId],
    scalars: &[f64],
    targets: &[TensorId],
) -> Result<()> {
    let checked = check(program, inputs.len(), scalars.len(), targets.len())?;
    let leaves = targets
        .iter()
        .enumerate()
        .map(|(j, &id)| {
            handles::leaf(id)?.ok_or_else(|| {
                invalid(format!(
                    "target {j} (handle {}) is not a declared parameter or state tensor: only \
                     those are updated in place",
                    id.0
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for leaf in &leaves {
        super::mixed::weights_changed(leaf.var.as_tensor());
    }
    let first = &leaves[0];
    let shape = first.var.dims().to_vec();
    let device = first.var.device().clone();
    for (j, leaf) in leaves.iter().enumerate() {
        if let Some(k) = leaves[..j].iter().position(|l| Arc::ptr_eq(l, leaf)) {
            return Err(invalid(format!(
                "targets {k} and {j} are both `{}`; list each target once",
                leaf.name
            )));
        }
        if leaf.var.dims() != shape.as_slice() {
            return Err(invalid(format!(
                "target {j} (`{}`) has shape {:?} and target 0 (`{}`) {shape:?}; the targets \
                 share one shape",
                leaf.name,
                leaf.var.dims(),
                first.name
            )));
        }
        if !leaf.var.dtype().is_float() {
            return Err(invalid(format!(
                "target {j} (`{}`) is {:?}; targets are f32, f64, bf16 or f16",
                leaf.name,
                leaf.var.dtype()
            )));
        }
        if !leaf.var.device().same_device(&device) {
            return Err(invalid(format!(
                "target {j} (`{}`) is on {:?} and target 0 on {device:?}",
                leaf.name,
                leaf.var.device()
            )));
        }
    }
    let xs = inputs
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let x = handles::tensor(id)?;
            if x.dims() != shape.as_slice() && x.elem_count() != 1 {
                return Err(invalid(format!(
                    "input {i} has shape {:?} and the targets {shape:?}; an input has the \
                     targets' shape or one element",
                    x.dims()
                )));
            }
            if !x.device().same_device(&device) {
                return Err(invalid(format!(
                    "input {i} is on {:?} and the targets on {device:?}",
                    x.device()
                )));
            }
            Ok(x)
        })
        .collect::<Result<Vec<_>>>()?;
    let wide = leaves.iter().any(|l| l.var.dtype() == DType::F64)
        || xs.iter().any(|x| x.dtype() == DType::F64);
    let cpu = device.is_cpu() && leaves.iter().all(|l| l.var.is_contiguous());
    #[cfg(test)]
    let cpu = cpu && !COMPOSE.with(std::cell::Cell::get);
    if cpu {
        in_place(&checked, &leaves, &xs, scalars, wide)
    } else {
        composed(&checked, &leaves, &xs, scalars, wide)
    }
}

#[cfg(test)]
thread_local! {
    /// Compose on the CPU too (the unit tests compare the two paths).
    static COMPOSE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// -- the CPU path -----------------------------------------------------------------------------

/// An identity for a tensor's storage: tensors that share one (views, clones, a declared
/// tensor and its handles) have the same key. candle keeps its own key private; the address of
/// the storage behind the lock is the same thing.
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    std::ptr::from_ref::<Storage>(&storage).addr()
}

/// Where an input's values come from during the pass.
#[derive(Clone, Copy)]
enum Source {
    /// A one-element input, read before the pass.
    Value(f64),
    /// The slice of a target it shares storage and layout with.
    Target(usize),
    /// Storage locked for reading (an index into the read locks), from this offset.
    Read(usize, usize),
}

/// One storage lock to take: a target's, for writing, or an input's, for reading.
enum Lock<'t> {
    Write(&'t Tensor, usize),
    Read(&'t Tensor, usize),
}

/// A storage as lent inside the nest of locks.
enum Held<'a> {
    Write(&'a mut CpuStorage),
    Read(&'a CpuStorage),
}

type Body<'b> = dyn FnMut(Vec<Held<'_>>) -> CResult<()> + 'b;

/// Take the locks of `plan` one inside the other and run `body` with every storage.
fn nest(plan: &[Lock<'_>], held: Vec<Held<'_>>, body: &mut Body<'_>) -> CResult<()> {
    let Some((lock, rest)) = plan.split_first() else {
        return body(held);
    };
    match lock {
        Lock::Write(t, _) => {
            let op = Nested {
                rest,
                held: std::cell::RefCell::new(Some(held)),
                body: std::cell::RefCell::new(body),
            };
            t.inplace_op1(&op)
        }
        Lock::Read(t, _) => {
            let (storage, _) = t.storage_and_layout();
            let Storage::Cpu(s) = &*storage else {
                candle_core::bail!("elementwise_update: an input is not on the cpu");
            };
            let mut held = held;
            held.push(Held::Read(s));
            nest(rest, held, body)
        }
    }
}

/// The in-place op that holds one target's storage while the rest of the nest runs.
struct Nested<'p, 't, 'h, 'b, 'c> {
    rest: &'p [Lock<'t>],
    held: std::cell::RefCell<Option<Vec<Held<'h>>>>,
    body: std::cell::RefCell<&'c mut Body<'b>>,
}

impl InplaceOp1 for Nested<'_, '_, '_, '_, '_> {
    fn name(&self) -> &'static str {
        "elementwise_update"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> CResult<()> {
        let Some(mut held) = self.held.borrow_mut().take() else {
            candle_core::bail!("elementwise_update: a target's storage was lent twice");
        };
        held.push(Held::Write(s));
        let mut body = self.body.borrow_mut();
        nest(self.rest, held, &mut **body)
    }
}

fn in_place(
    checked: &Checked,
    leaves: &[Arc<Leaf>],
    xs: &[Tensor],
    scalars: &[f64],
    wide: bool,
) -> Result<()> {
    let targets: Vec<Tensor> = leaves.iter().map(|l| l.var.as_tensor().clone()).collect();
    let target_keys: Vec<usize> = targets.iter().map(storage_key).collect();
    let n = targets[0].elem_count();
    // Inputs that must be copied before the locks are taken live here.
    let mut owned: Vec<Tensor> = Vec::new();
    let mut read_keys: Vec<usize> = Vec::new();
    let mut sources = Vec::with_capacity(xs.len());
    for x in xs {
        if x.elem_count() == 1 && (x.dims() != targets[0].dims() || n == 1) {
            let v = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
            sources.push(Source::Value(v));
            continue;
        }
        let key = storage_key(x);
        if let Some(j) = target_keys.iter().position(|&k| k == key) {
            if x.layout() == targets[j].layout() {
                sources.push(Source::Target(j));
                continue;
            }
        }
        // A strided input (a transposed view, say) is read from a contiguous copy; so is a
        // view of a target that is not the target itself. candle's `copy` keeps the layout
        // and `contiguous` returns a contiguous tensor as it is, hence the two cases.
        let x = if !x.is_contiguous() {
            x.contiguous()?
        } else if target_keys.contains(&key) {
            x.copy()?
        } else {
            x.clone()
        };
        let key = storage_key(&x);
        let offset = x.layout().start_offset();
        let slot = match read_keys.iter().position(|&k| k == key) {
            Some(slot) => slot,
            None => {
                read_keys.push(key);
                owned.push(x);
                owned.len() - 1
            }
        };
        sources.push(Source::Read(slot, offset));
    }
    let mut plan: Vec<(usize, Lock<'_>)> = targets
        .iter()
        .enumerate()
        .map(|(j, t)| (target_keys[j], Lock::Write(t, j)))
        .chain(
            owned
                .iter()
                .enumerate()
                .map(|(slot, t)| (read_keys[slot], Lock::Read(t, slot))),
        )
        .collect();
    plan.sort_by_key(|(key, _)| *key);
    let order: Vec<Lock<'_>> = plan.into_iter().map(|(_, lock)| lock).collect();

    let mut body = |held: Vec<Held<'_>>| -> CResult<()> {
        let mut writes: Vec<Option<&mut CpuStorage>> = targets.iter().map(|_| None).collect();
        let mut reads: Vec<Option<&CpuStorage>> = owned.iter().map(|_| None).collect();
        for (lock, h) in order.iter().zip(held) {
            match (lock, h) {
                (Lock::Write(_, j), Held::Write(s)) => writes[*j] = Some(s),
                (Lock::Read(_, slot), Held::Read(s)) => reads[*slot] = Some(s),
                _ => candle_core::bail!("elementwise_update: the locks came back out of order"),
            }
        }
        let mut dsts = Vec::with_capacity(writes.len());
        for (j, s) in writes.into_iter().enumerate() {
            let Some(s) = s else {
                candle_core::bail!("elementwise_update: target {j} was not lent");
            };
            let start = targets[j].layout().start_offset();
            dsts.push(Dst::of(s, start, n)?);
        }
        let mut loads = Vec::with_capacity(sources.len());
        for source in &sources {
            loads.push(match *source {
                Source::Value(v) => Load::Value(v),
                Source::Target(j) => Load::Target(j),
                Source::Read(slot, offset) => {
                    let Some(s) = reads[slot] else {
                        candle_core::bail!("elementwise_update: an input was not lent");
                    };
                    Load::Slice(Src::of(s, offset, n)?)
                }
            });
        }
        if wide {
            run::<f64>(checked, &loads, scalars, dsts, n);
        } else {
            run::<f32>(checked, &loads, scalars, dsts, n);
        }
        Ok(())
    };
    Ok(nest(&order, Vec::new(), &mut body)?)
}

/// A target's elements, mutable.
enum Dst<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl<'a> Dst<'a> {
    fn of(s: &'a mut CpuStorage, start: usize, n: usize) -> CResult<Dst<'a>> {
        let range = start..start + n;
        Ok(match s {
            CpuStorage::F32(v) => Dst::F32(&mut v[range]),
            CpuStorage::F64(v) => Dst::F64(&mut v[range]),
            CpuStorage::BF16(v) => Dst::Bf16(&mut v[range]),
            CpuStorage::F16(v) => Dst::F16(&mut v[range]),
            other => candle_core::bail!(
                "elementwise_update: a target is {:?}, not a float",
                other.dtype()
            ),
        })
    }

    /// Cut into pieces of `CHUNK` elements.
    fn chunks(self) -> Vec<Dst<'a>> {
        match self {
            Dst::F32(v) => v.chunks_mut(CHUNK).map(Dst::F32).collect(),
            Dst::F64(v) => v.chunks_mut(CHUNK).map(Dst::F64).collect(),
            Dst::Bf16(v) => v.chunks_mut(CHUNK).map(Dst::Bf16).collect(),
            Dst::F16(v) => v.chunks_mut(CHUNK).map(Dst::F16).collect(),
        }
    }

    fn load<F: Num>(&self, start: usize, out: &mut [F]) {
        let range = start..start + out.len();
        match self {
            Dst::F32(v) => load(&v[range], out, F::from_f32),
            Dst::F64(v) => load(&v[range], out, F::from_f64),
            Dst::Bf16(v) => load(&v[range], out, F::from_bf16),
            Dst::F16(v) => load(&v[range], out, F::from_f16),
        }
    }

    fn store<F: Num>(&mut self, start: usize, values: &[F]) {
        let range = start..start + values.len();
        match self {
            Dst::F32(v) => store(&mut v[range], values, F::to_f32),
            Dst::F64(v) => store(&mut v[range], values, F::to_f64),
            Dst::Bf16(v) => store(&mut v[range], values, F::to_bf16),
            Dst::F16(v) => store(&mut v[range], values, F::to_f16),
        }
    }
}

/// An input's elements.
#[derive(Clone, Copy)]
enum Src<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    U8(&'a [u8]),
    U32(&'a [u32]),
    I64(&'a [i64]),
}

impl<'a> Src<'a> {
    fn of(s: &'a CpuStorage, start: usize, n: usize) -> CResult<Src<'a>> {
        let range = start..start + n;
        Ok(match s {
            CpuStorage::F32(v) => Src::F32(&v[range]),
            CpuStorage::F64(v) => Src::F64(&v[range]),
            CpuStorage::BF16(v) => Src::Bf16(&v[range]),
            CpuStorage::F16(v) => Src::F16(&v[range]),
            CpuStorage::U8(v) => Src::U8(&v[range]),
            CpuStorage::U32(v) => Src::U32(&v[range]),
            CpuStorage::I64(v) => Src::I64(&v[range]),
            other => candle_core::bail!(
                "elementwise_update: an input is {:?}, which the plugin api does not have",
                other.dtype()
            ),
        })
    }

    fn narrow(self, start: usize, len: usize) -> Src<'a> {
        let r = start..start + len;
        match self {
            Src::F32(v) => Src::F32(&v[r]),
            Src::F64(v) => Src::F64(&v[r]),
            Src::Bf16(v) => Src::Bf16(&v[r]),
            Src::F16(v) => Src::F16(&v[r]),
            Src::U8(v) => Src::U8(&v[r]),
            Src::U32(v) => Src::U32(&v[r]),
            Src::I64(v) => Src::I64(&v[r]),
        }
    }

    fn load<F: Num>(&self, start: usize, out: &mut [F]) {
        let range = start..start + out.len();
        match self {
            Src::F32(v) => load(&v[range], out, F::from_f32),
            Src::F64(v) => load(&v[range], out, F::from_f64),
            Src::Bf16(v) => load(&v[range], out, F::from_bf16),
            Src::F16(v) => load(&v[range], out, F::from_f16),
            Src::U8(v) => load(&v[range], out, |x| F::from_f32(f32::from(x))),
            Src::U32(v) => load(&v[range], out, |x| F::from_u32(x)),
            Src::I64(v) => load(&v[range], out, |x| F::from_i64(x)),
        }
    }
}

#[inline(always)]
fn load<T: Copy, F>(src: &[T], out: &mut [F], f: impl Fn(T) -> F) {
    for (o, &x) in out.iter_mut().zip(src) {
        *o = f(x);
    }
}

#[inline(always)]
fn store<T, F: Copy>(dst: &mut [T], values: &[F], f: impl Fn(F) -> T) {
    for (d, &x) in dst.iter_mut().zip(values) {
        *d = f(x);
    }
}

/// Where an input's values come from, inside the nest of locks.
#[derive(Clone, Copy)]
enum Load<'a> {
    Value(f64),
    Target(usize),
    Slice(Src<'a>),
}

/// The arithmetic of one compute type, written as candle writes it for its ops, so that each
/// instruction gives the bits of the composed op.
trait Num:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn from_bf16(v: bf16) -> Self;
    fn from_f16(v: f16) -> Self;
    fn from_u32(v: u32) -> Self;
    fn from_i64(v: i64) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn to_bf16(self) -> bf16;
    fn to_f16(self) -> f16;
    fn abs(self) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
}

impl Num for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn from_bf16(v: bf16) -> f32 {
        v.to_f32()
    }
    fn from_f16(v: f16) -> f32 {
        v.to_f32()
    }
    fn from_u32(v: u32) -> f32 {
        v as f32
    }
    fn from_i64(v: i64) -> f32 {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
    fn to_f16(self) -> f16 {
        f16::from_f32(self)
    }
    fn abs(self) -> f32 {
        f32::abs(self)
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
}

impl Num for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn from_f32(v: f32) -> f64 {
        f64::from(v)
    }
    fn from_bf16(v: bf16) -> f64 {
        v.to_f64()
    }
    fn from_f16(v: f16) -> f64 {
        v.to_f64()
    }
    fn from_u32(v: u32) -> f64 {
        f64::from(v)
    }
    fn from_i64(v: i64) -> f64 {
        v as f64
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn to_bf16(self) -> bf16 {
        bf16::from_f64(self)
    }
    fn to_f16(self) -> f16 {
        f16::from_f64(self)
    }
    fn abs(self) -> f64 {
        f64::abs(self)
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

/// 1 where `holds`, else 0.
#[inline(always)]
fn truth<F: Num>(holds: bool) -> F {
    if holds {
        F::ONE
    } else {
        F::ZERO
    }
}

/// Run the program over all `n` elements: in chunks on rayon's pool when there are several.
fn run<F: Num>(
    checked: &Checked,
    loads: &[Load<'_>],
    scalars: &[f64],
    dsts: Vec<Dst<'_>>,
    n: usize,
) {
    let scalars: Vec<F> = scalars.iter().map(|&s| F::from_f64(s)).collect();
    if n <= CHUNK {
        let mut dsts = dsts;
        run_chunk(checked, loads, &scalars, &mut dsts, n);
        return;
    }
    // Transpose target-major pieces into chunk-major lists of target pieces.
    let pieces: Vec<Vec<Dst<'_>>> = dsts.into_iter().map(Dst::chunks).collect();
    let mut chunks: Vec<Vec<Dst<'_>>> = Vec::new();
    for target in pieces {
        for (c, piece) in target.into_iter().enumerate() {
            if chunks.len() <= c {
                chunks.push(Vec::new());
            }
            chunks[c].push(piece);
        }
    }
    chunks
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut dsts)| {
            let start = c * CHUNK;
            let len = CHUNK.min(n - start);
            let loads: Vec<Load<'_>> = loads
                .iter()
                .map(|l| match *l {
                    Load::Slice(s) => Load::Slice(s.narrow(start, len)),
                    other => other,
                })
                .collect();
            run_chunk(checked, &loads, &scalars, &mut dsts, len);
        });
}

/// Run the program over `n` elements, `BLOCK` at a time.
fn run_chunk<F: Num>(
    checked: &Checked,
    loads: &[Load<'_>],
    scalars: &[F],
    dsts: &mut [Dst<'_>],
    n: usize,
) {
    let mut stack = vec![F::ZERO; checked.depth.max(1) * BLOCK];
    let mut outs = vec![F::ZERO; dsts.len() * BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let mut sp = 0;
        for &instr in &checked.instrs {
            match instr {
                Instr::Input(i) => {
                    let slot = &mut stack[sp * BLOCK..][..len];
                    match loads[i] {
                        Load::Value(v) => slot.fill(F::from_f64(v)),
                        Load::Target(j) => dsts[j].load(start, slot),
                        Load::Slice(s) => s.load(start, slot),
                    }
                    sp += 1;
                }
                Instr::Scalar(k) => {
                    stack[sp * BLOCK..][..len].fill(scalars[k]);
                    sp += 1;
                }
                Instr::Const(v) => {
                    stack[sp * BLOCK..][..len].fill(F::from_f64(v));
                    sp += 1;
                }
                Instr::Store(j) => {
                    sp -= 1;
                    outs[j * BLOCK..][..len].copy_from_slice(&stack[sp * BLOCK..][..len]);
                }
                Instr::Unary(op) => unary(op, &mut stack[(sp - 1) * BLOCK..][..len]),
                Instr::Binary(op) => {
                    let (lo, hi) = stack.split_at_mut((sp - 1) * BLOCK);
                    binary(op, &mut lo[(sp - 2) * BLOCK..][..len], &hi[..len]);
                    sp -= 1;
                }
                Instr::Ternary(op) => {
                    let (lo, hi) = stack.split_at_mut((sp - 2) * BLOCK);
                    let (b, c) = hi.split_at(BLOCK);
                    ternary(op, &mut lo[(sp - 3) * BLOCK..][..len], &b[..len], &c[..len]);
                    sp -= 2;
                }
            }
        }
        for (j, dst) in dsts.iter_mut().enumerate() {
            dst.store(start, &outs[j * BLOCK..][..len]);
        }
        start += len;
    }
}

#[inline(always)]
fn map1<F: Num>(x: &mut [F], f: impl Fn(F) -> F) {
    for v in x {
        *v = f(*v);
    }
}

fn unary<F: Num>(op: Un, x: &mut [F]) {
    match op {
        Un::Neg => map1(x, |v| -v),
        Un::Abs => map1(x, F::abs),
        Un::Sign => map1(x, |v| truth::<F>(v > F::ZERO) - truth::<F>(v < F::ZERO)),
        Un::Sqr => map1(x, |v| v * v),
        Un::Sqrt => map1(x, F::sqrt),
        Un::Rsqrt => map1(x, |v| F::ONE / v.sqrt()),
        Un::Recip => map1(x, |v| F::ONE / v),
        Un::Exp => map1(x, F::exp),
        Un::Log => map1(x, F::ln),
        Un::Tanh => map1(x, F::tanh),
    }
}

#[inline(always)]
fn map2<F: Num>(a: &mut [F], b: &[F], f: impl Fn(F, F) -> F) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = f(*x, y);
    }
}

fn binary<F: Num>(op: Bin, a: &mut [F], b: &[F]) {
    match op {
        Bin::Add => map2(a, b, |x, y| x + y),
        Bin::Sub => map2(a, b, |x, y| x - y),
        Bin::Mul => map2(a, b, |x, y| x * y),
        Bin::Div => map2(a, b, |x, y| x / y),
        Bin::Maximum => map2(a, b, |x, y| if x < y { y } else { x }),
        Bin::Minimum => map2(a, b, |x, y| if x > y { y } else { x }),
        Bin::Eq => map2(a, b, |x, y| truth(x == y)),
        Bin::Ne => map2(a, b, |x, y| truth(x != y)),
        Bin::Lt => map2(a, b, |x, y| truth(x < y)),
        Bin::Le => map2(a, b, |x, y| truth(x <= y)),
        Bin::Gt => map2(a, b, |x, y| truth(x > y)),
        Bin::Ge => map2(a, b, |x, y| truth(x >= y)),
    }
}

#[inline(always)]
fn map3<F: Num>(a: &mut [F], b: &[F], c: &[F], f: impl Fn(F, F, F) -> F) {
    for ((x, &y), &z) in a.iter_mut().zip(b).zip(c) {
        *x = f(*x, y, z);
    }
}

fn ternary<F: Num>(op: Tern, a: &mut [F], b: &[F], c: &[F]) {
    match op {
        // candle's clamp: the maximum with the low bound, then the minimum with the high one.
        Tern::Clamp => map3(a, b, c, |x, lo, hi| {
            let x = if x < lo { lo } else { x };
            if x > hi {
                hi
            } else {
                x
            }
        }),
        Tern::Select => map3(a, b, c, |m, t, f| if m != F::ZERO { t } else { f }),
    }
}

// -- elsewhere: composed from candle ops --------------------------------------------------------

/// A value on the stack of the composed evaluation; `fresh` when it is a tensor of its own
/// rather than an input's (which may be a target's storage, overwritten by the assignments).
struct Value {
    t: Tensor,
    fresh: bool,
}

fn composed(
    checked: &Checked,
    leaves: &[Arc<Leaf>],
    xs: &[Tensor],
    scalars: &[f64],
    wide: bool,
) -> Result<()> {
    let dtype = if wide { DType::F64 } else { DType::F32 };
    let shape = leaves[0].var.dims().to_vec();
    let device = leaves[0].var.device().clone();
    let constant = |v: f64| -> Result<Tensor> { Ok(Tensor::new(v, &device)?.to_dtype(dtype)?) };
    let mut stack: Vec<Value> = Vec::with_capacity(checked.depth);
    let mut outs: Vec<Option<Tensor>> = leaves.iter().map(|_| None).collect();
    let pop = |stack: &mut Vec<Value>| -> Result<Value> {
        stack
            .pop()
            .ok_or_else(|| invalid("the stack ran dry after the program was checked".into()))
    };
    for &instr in &checked.instrs {
        let t = match instr {
            Instr::Input(i) => {
                let x = xs[i].detach();
                let x = if x.elem_count() == 1 && x.dims() != shape.as_slice() {
                    x.reshape(())?
                } else {
                    x
                };
                stack.push(Value {
                    t: x.to_dtype(dtype)?,
                    fresh: false,
                });
                continue;
            }
            Instr::Scalar(k) => constant(scalars[k])?,
            Instr::Const(v) => constant(v)?,
            Instr::Store(j) => {
                let v = pop(&mut stack)?;
                let t = if v.fresh { v.t } else { v.t.copy()? };
                let t = if t.dims() == shape.as_slice() {
                    t
                } else {
                    t.broadcast_as(shape.as_slice())?
                };
                outs[j] = Some(t);
                continue;
            }
            Instr::Unary(op) => composed_unary(op, &pop(&mut stack)?.t)?,
            Instr::Binary(op) => {
                let b = pop(&mut stack)?.t;
                let a = pop(&mut stack)?.t;
                composed_binary(op, &a, &b, dtype)?
            }
            Instr::Ternary(op) => {
                let c = pop(&mut stack)?.t;
                let b = pop(&mut stack)?.t;
                let a = pop(&mut stack)?.t;
                composed_ternary(op, &a, &b, &c, &constant(0.0)?)?
            }
        };
        stack.push(Value { t, fresh: true });
    }
    // Every result is computed before the first target changes.
    for (leaf, out) in leaves.iter().zip(outs) {
        let out = out.ok_or_else(|| invalid("a target was not written".into()))?;
        autograd::assign_leaf(leaf, &out)?;
    }
    Ok(())
}

fn composed_unary(op: Un, x: &Tensor) -> Result<Tensor> {
    Ok(match op {
        Un::Neg => x.neg()?,
        Un::Abs => x.abs()?,
        Un::Sign => x.sign()?,
        Un::Sqr => x.sqr()?,
        Un::Sqrt => x.sqrt()?,
        Un::Rsqrt => x.sqrt()?.recip()?,
        Un::Recip => x.recip()?,
        Un::Exp => x.exp()?,
        Un::Log => x.log()?,
        Un::Tanh => x.tanh()?,
    })
}

fn composed_binary(op: Bin, a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(match op {
        Bin::Add => a.broadcast_add(b)?,
        Bin::Sub => a.broadcast_sub(b)?,
        Bin::Mul => a.broadcast_mul(b)?,
        Bin::Div => a.broadcast_div(b)?,
        Bin::Maximum => a.broadcast_maximum(b)?,
        Bin::Minimum => a.broadcast_minimum(b)?,
        Bin::Eq => a.broadcast_eq(b)?.to_dtype(dtype)?,
        Bin::Ne => a.broadcast_ne(b)?.to_dtype(dtype)?,
        Bin::Lt => a.broadcast_lt(b)?.to_dtype(dtype)?,
        Bin::Le => a.broadcast_le(b)?.to_dtype(dtype)?,
        Bin::Gt => a.broadcast_gt(b)?.to_dtype(dtype)?,
        Bin::Ge => a.broadcast_ge(b)?.to_dtype(dtype)?,
    })
}

fn composed_ternary(op: Tern, a: &Tensor, b: &Tensor, c: &Tensor, zero: &Tensor) -> Result<Tensor> {
    Ok(match op {
        Tern::Clamp => a.broadcast_maximum(b)?.broadcast_minimum(c)?,
        Tern::Select => super::ops::select(&a.broadcast_ne(zero)?, b, c)?,
    })
}

#[cfg(test)]
mod tests {
    use codex_plugin_api::{DType as ApiDType, Expr, Init, ParamRole, Program};

    use super::*;
    use crate::store::{ParamStore, TensorGroup};

    /// Every instruction, over inputs `[p, g, m, c, mask]` (`c` one element, `mask` u8) and
    /// scalars `[s0, s1]`, writing targets `[p, m]`.
    fn every_instruction() -> Program {
        let (p, g, m) = (Expr::input(0), Expr::input(1), Expr::input(2));
        let (c, mask) = (Expr::input(3), Expr::input(4));
        let (s0, s1) = (Expr::scalar(0), Expr::scalar(1));
        let tests = g.clone().lt(&m) - g.clone().ge(&p)
            + g.clone().le(0.0) * 2.0
            + g.clone().eq(&m)
            + g.clone().ne(&p) * 0.5
            + g.clone().gt(&c) / 4.0;
        let branch = (m.clone().abs() + 0.5).log().minimum(&p).clamp(-0.25, &s0);
        let new_p = -((&m * 0.9 + &g * 0.1).sign() * &s0) + &p * &s1 + tests;
        let new_m = mask.select(c.exp() * g.clone().maximum(&m), branch)
            + (g.clone().sqr() + &m).sqrt() / (m.clone().abs() + 1e-3)
            - g.recip().tanh()
            + (m.abs() + 1.0).rsqrt();
        Program::new().store(1, new_m).store(0, new_p)
    }

    fn values(n: usize, salt: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    0.0
                } else {
                    (i as f32 * 0.731 + salt).sin() * 1.7
                }
            })
            .collect()
    }

    /// One store's tensors after the update, by the CPU path or composed.
    fn after(compose: bool, m_dtype: ApiDType, g_dtype: DType, n: usize) -> Vec<Vec<u8>> {
        let mut store = ParamStore::new(candle_core::Device::Cpu, 1);
        let shape = [n / 7, 7];
        let p = store
            .declare_param("p", &shape, ParamRole::Weight, Init::Zeros)
            .unwrap();
        let m = store
            .declare_state("m", &shape, m_dtype, Init::Zeros)
            .unwrap();
        let cpu = candle_core::Device::Cpu;
        let t = |salt| Tensor::from_vec(values(n, salt), &shape, &cpu).unwrap();
        autograd::assign(p, &t(0.5)).unwrap();
        autograd::assign(m, &t(1.5)).unwrap();
        let g = handles::insert(t(2.5).to_dtype(g_dtype).unwrap());
        let c = handles::insert(Tensor::new(&[0.375f32], &cpu).unwrap());
        let mask = handles::insert(t(3.5).gt(0.25).unwrap());
        COMPOSE.with(|c| c.set(compose));
        let program = every_instruction();
        let r = update(
            program.instructions(),
            &[p, g, m, c, mask],
            &[0.125, 0.998],
            &[p, m],
        );
        COMPOSE.with(|c| c.set(false));
        r.unwrap();
        for id in [p, m, g, c, mask] {
            handles::release(id);
        }
        store
            .export(TensorGroup::Params)
            .unwrap()
            .into_iter()
            .chain(store.export(TensorGroup::State).unwrap())
            .map(|e| e.bytes)
            .collect()
    }

    #[test]
    fn the_cpu_path_and_the_composed_one_agree_bit_for_bit() {
        // f32 throughout; bf16 state; f64 state (so the whole program runs in f64); a half
        // precision input; more elements than one parallel chunk.
        for (m, g, n) in [
            (ApiDType::F32, DType::F32, 63),
            (ApiDType::BF16, DType::F32, 700),
            (ApiDType::F64, DType::F32, 700),
            (ApiDType::F32, DType::F16, 700),
            (ApiDType::F32, DType::F32, 7 * 10_000),
        ] {
            assert_eq!(
                after(false, m, g, n),
                after(true, m, g, n),
                "state {m:?}, gradient {g:?}, {n} elements"
            );
        }
    }
}
