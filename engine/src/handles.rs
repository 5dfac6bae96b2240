//! The global handle table: `TensorId` → candle tensor or declared tensor.
//!
//! One table for the whole process, because the op table is a set of free `extern "C"`
//! functions with no context argument. A handle is an id, never reused (ids count up from 1;
//! 0 is never issued, so it can stand for "no tensor"). Entries are either plain tensors —
//! immutable, so sharing them between handles is safe — or [`Leaf`]s: the parameters and state
//! tensors of a [`ParamStore`](super::ParamStore), which change in place and carry a gradient
//! slot. Parameters are also indexed by their candle tensor id, so that `backward` can find the
//! slot for each gradient candle computes.
//!
//! Every lock is held only to clone an `Arc`; no tensor work happens under a lock. Poisoned
//! locks are recovered: the maps stay consistent because every critical section is a single
//! insert, remove or lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::ThreadId;

use candle_core::{Tensor, Var};
use codex_plugin_api::{ParamRole, TensorId};

use super::adapter::Lora;
use super::fusion::Origin;
use super::{Result, TensorError};

/// What a declared tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeafKind {
    /// A parameter, with the role the model declared.
    Param(ParamRole),
    /// Optimizer (or other) state: saved, assignable, never differentiated.
    State,
}

/// A parameter or state tensor: mutable storage, a name, and for parameters a gradient slot.
pub(crate) struct Leaf {
    pub(crate) name: String,
    pub(crate) kind: LeafKind,
    pub(crate) var: Var,
    trainable: AtomicBool,
    grad: Mutex<Option<Tensor>>,
    /// The LoRA adapter attached to this weight, if any (set once, before training).
    lora: OnceLock<Arc<Lora>>,
}

impl Leaf {
    pub(crate) fn new(name: String, kind: LeafKind, var: Var) -> Leaf {
        Leaf {
            name,
            trainable: AtomicBool::new(matches!(kind, LeafKind::Param(_))),
            kind,
            var,
            grad: Mutex::new(None),
            lora: OnceLock::new(),
        }
    }

    pub(crate) fn lora(&self) -> Option<&Arc<Lora>> {
        self.lora.get()
    }

    /// Attach `lora`; false when the weight already has an adapter.
    pub(crate) fn attach_lora(&self, lora: Arc<Lora>) -> bool {
        self.lora.set(lora).is_ok()
    }

    pub(crate) fn is_param(&self) -> bool {
        matches!(self.kind, LeafKind::Param(_))
    }

    /// Only parameters can be trainable.
    pub(crate) fn trainable(&self) -> bool {
        self.trainable.load(Ordering::Relaxed)
    }

    pub(crate) fn set_trainable(&self, on: bool) {
        self.trainable
            .store(on && self.is_param(), Ordering::Relaxed);
    }

    /// The tensor ops compute with. Trainable parameters hand out the variable itself so that
    /// autograd reaches them; everything else hands out an untracked view of the same storage,
    /// so frozen parameters and state cost nothing in backward.
    pub(crate) fn tensor(&self) -> Tensor {
        if self.trainable() {
            self.var.as_tensor().clone()
        } else {
            self.var.as_tensor().detach()
        }
    }

    pub(crate) fn grad(&self) -> Option<Tensor> {
        lock(&self.grad).clone()
    }

    pub(crate) fn clear_grad(&self) {
        *lock(&self.grad) = None;
    }

    /// Add `g` into the slot (PyTorch's `.grad` semantics).
    pub(crate) fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        let mut slot = lock(&self.grad);
        let sum = match slot.as_ref() {
            Some(prev) => prev.add(g)?,
            None => g.clone(),
        };
        *slot = Some(sum.detach());
        Ok(())
    }
}

/// What a handle points at.
#[derive(Clone)]
pub(crate) enum Entry {
    Plain(Tensor),
    /// A result that remembers how it was made, so that a later op may fuse with its producer
    /// (`fusion`).
    Derived(Tensor, Arc<Origin>),
    Leaf(Arc<Leaf>),
}

impl Entry {
    pub(crate) fn tensor(&self) -> Tensor {
        match self {
            Entry::Plain(t) | Entry::Derived(t, _) => t.clone(),
            Entry::Leaf(leaf) => leaf.tensor(),
        }
    }

    pub(crate) fn origin(&self) -> Option<Arc<Origin>> {
        match self {
            Entry::Derived(_, o) => Some(o.clone()),
            _ => None,
        }
    }
}

struct Slot {
    entry: Entry,
    thread: ThreadId,
}

static TABLE: LazyLock<Mutex<HashMap<u64, Slot>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static PARAMS_BY_TENSOR: LazyLock<Mutex<HashMap<candle_core::TensorId, Weak<Leaf>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn insert_entry(entry: Entry) -> TensorId {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let thread = std::thread::current().id();
    lock(&TABLE).insert(id, Slot { entry, thread });
    TensorId(id)
}

pub(crate) fn insert(tensor: Tensor) -> TensorId {
    insert_entry(Entry::Plain(tensor))
}

pub(crate) fn entry(id: TensorId) -> Result<Entry> {
    lock(&TABLE)
        .get(&id.0)
        .map(|s| s.entry.clone())
        .ok_or(TensorError::UnknownHandle(id.0))
}

pub(crate) fn tensor(id: TensorId) -> Result<Tensor> {
    entry(id).map(|e| e.tensor())
}

pub(crate) fn insert_derived(tensor: Tensor, origin: Option<Arc<Origin>>) -> TensorId {
    insert_entry(match origin {
        Some(o) => Entry::Derived(tensor, o),
        None => Entry::Plain(tensor),
    })
}

/// The declared tensor behind a handle, if it is one.
pub(crate) fn leaf(id: TensorId) -> Result<Option<Arc<Leaf>>> {
    Ok(match entry(id)? {
        Entry::Leaf(leaf) => Some(leaf),
        Entry::Plain(_) | Entry::Derived(..) => None,
    })
}

/// A new handle to the same entry; `TensorId(0)` (never valid) for an unknown handle, because
/// `retain` has no error channel in the op table.
pub(crate) fn retain(id: TensorId) -> TensorId {
    match entry(id) {
        Ok(e) => insert_entry(e),
        Err(_) => TensorId(0),
    }
}

pub(crate) fn release(id: TensorId) {
    // Drop the entry after the lock is released: dropping a leaf can run arbitrary drops.
    let removed = lock(&TABLE).remove(&id.0);
    drop(removed);
}

pub(crate) fn live() -> usize {
    lock(&TABLE).len()
}

pub(crate) fn live_on_thread(thread: ThreadId) -> usize {
    lock(&TABLE).values().filter(|s| s.thread == thread).count()
}

/// Make a parameter findable from the gradients candle computes for its variable.
pub(crate) fn index_param(leaf: &Arc<Leaf>) {
    let mut map = lock(&PARAMS_BY_TENSOR);
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(leaf.var.as_tensor().id(), Arc::downgrade(leaf));
}

/// The parameter whose variable has this candle id, if it is still alive.
pub(crate) fn param_by_tensor(id: candle_core::TensorId) -> Option<Arc<Leaf>> {
    lock(&PARAMS_BY_TENSOR).get(&id).and_then(Weak::upgrade)
}
