//! The parameter and state store: named, declared tensors, their initial values, checkpoints.
//!
//! Models and optimizers declare every tensor they keep by name through the plugin API's
//! `TensorStore`; the host keeps them here as candle `Var`s so it can save, load, freeze and
//! export them without knowing the model. Initial values come from a ChaCha8 generator seeded
//! with SHA-256(run seed, name): the same name draws the same values on every machine and in any
//! declaration order. Parameters are f32; state tensors have the dtype their owner asks for.
//!
//! Checkpoint files hold one group (parameters or state) by name, in the tensors' own dtypes and
//! bytes, so a save and a load round-trip bit for bit. A load checks the whole file against the
//! store before it changes anything.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RStr, RVec};
use candle_core::{DType as CDType, Device, Tensor, Var};
use codex_plugin_api::params::{ParamInfoAbi, TensorStore, TensorStoreRef, TensorStore_TO};
use codex_plugin_api::{DType, Init, ParamInfo, ParamRole, PluginError, TensorId};
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use super::handles::{self, Leaf, LeafKind};
use super::table::guarded;
use super::{autograd, from_candle_dtype, to_candle_dtype, Result, TensorError};

/// Which declared tensors a checkpoint file or an export covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorGroup {
    /// The parameters (`model.safetensors`).
    Params,
    /// The state tensors (`optimizer.safetensors`).
    State,
    /// The trainable parameters only (a LoRA run's `model.safetensors`: the adapters and the
    /// parameters it trains besides them).
    Trainable,
}

/// One tensor's exact value: its name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedTensor {
    /// Declared name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values, little-endian.
    pub bytes: Vec<u8>,
}

struct Declared {
    leaf: Arc<Leaf>,
    /// The store's own handle, lent to optimizers and trainers through `ParamInfo`.
    id: TensorId,
}

/// Every parameter and state tensor of a run, by name, in declaration order.
///
/// Implements the plugin API's `TensorStore`; hand it to components with
/// [`ParamStore::as_tensor_store`]. Dropping the store releases its own handles; tensors that
/// components still hold handles to stay alive until those are released.
pub struct ParamStore {
    device: Device,
    seed: u64,
    entries: Vec<Declared>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("device", &self.device)
            .field("seed", &self.seed)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl Drop for ParamStore {
    fn drop(&mut self) {
        let vars: Vec<_> = self
            .entries
            .iter()
            .map(|e| e.leaf.var.as_tensor().id())
            .collect();
        super::mixed::forget(&vars);
        for e in &self.entries {
            handles::release(e.id);
        }
    }
}

impl ParamStore {
    /// An empty store whose tensors live on `device` and draw initial values from `seed`.
    pub fn new(device: Device, seed: u64) -> ParamStore {
        ParamStore {
            device,
            seed,
            entries: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    /// The device every declared tensor lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The run seed initial values are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The store as the plugin API's `TensorStore`, for component constructors.
    pub fn as_tensor_store(&mut self) -> TensorStoreRef<'_> {
        TensorStore_TO::from_ptr(self, TD_Opaque)
    }

    /// Declare a trainable f32 parameter and return an owned handle to it.
    pub fn declare_param(
        &mut self,
        name: &str,
        shape: &[usize],
        role: ParamRole,
        init: Init,
    ) -> Result<TensorId> {
        self.declare(name, shape, LeafKind::Param(role), CDType::F32, init)
    }

    /// Declare a state tensor (saved, assignable, never differentiated); returns an owned handle.
    pub fn declare_state(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        init: Init,
    ) -> Result<TensorId> {
        self.declare(name, shape, LeafKind::State, to_candle_dtype(dtype), init)
    }

    fn declare(
        &mut self,
        name: &str,
        shape: &[usize],
        kind: LeafKind,
        dtype: CDType,
        init: Init,
    ) -> Result<TensorId> {
        if name.is_empty() {
            return Err(TensorError::Invalid(
                "a declared tensor needs a non-empty name".into(),
            ));
        }
        if self.by_name.contains_key(name) {
            return Err(TensorError::DuplicateName(name.to_string()));
        }
        let values = initial_values(self.seed, name, shape, init, dtype, &self.device)?;
        let leaf = Arc::new(Leaf::new(
            name.to_string(),
            kind,
            Var::from_tensor(&values)?,
        ));
        if leaf.is_param() {
            handles::index_param(&leaf);
        }
        let id = handles::insert_entry(handles::Entry::Leaf(leaf.clone()));
        self.by_name.insert(name.to_string(), self.entries.len());
        self.entries.push(Declared { leaf, id });
        Ok(handles::retain(id))
    }

    /// Every parameter, in declaration order, as optimizers and trainers see them. The handles
    /// are borrowed from the store and valid while it lives.
    pub fn param_infos(&self) -> Vec<ParamInfo> {
        self.entries
            .iter()
            .filter_map(|e| match e.leaf.kind {
                LeafKind::Param(role) => Some(ParamInfo {
                    name: e.leaf.name.as_str().into(),
                    id: e.id,
                    shape: e.leaf.var.dims().to_vec(),
                    // Declared through the plugin API, a parameter always has one of its dtypes.
                    dtype: from_candle_dtype(e.leaf.var.dtype()).unwrap_or(DType::F32),
                    role,
                    trainable: e.leaf.trainable(),
                }),
                LeafKind::State => None,
            })
            .collect()
    }

    fn group(&self, group: TensorGroup) -> impl Iterator<Item = &Declared> {
        self.entries.iter().filter(move |e| match group {
            TensorGroup::Params => e.leaf.is_param(),
            TensorGroup::State => !e.leaf.is_param(),
            TensorGroup::Trainable => e.leaf.trainable(),
        })
    }

    /// Name and current value of every tensor of a group, in declaration order. The values are
    /// views of the live storage, untracked by autograd.
    pub fn named(&self, group: TensorGroup) -> Vec<(String, Tensor)> {
        self.group(group)
            .map(|e| (e.leaf.name.clone(), e.leaf.var.as_tensor().detach()))
            .collect()
    }

    /// Name and value of every parameter, in declaration order.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        self.named(TensorGroup::Params)
    }

    /// Name and value of every state tensor, in declaration order.
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        self.named(TensorGroup::State)
    }

    fn find(&self, name: &str) -> Result<&Declared> {
        self.by_name
            .get(name)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| TensorError::UnknownName(name.to_string()))
    }

    /// The store's handle to a declared tensor (borrowed: valid while the store lives).
    pub fn handle(&self, name: &str) -> Option<TensorId> {
        self.find(name).ok().map(|e| e.id)
    }

    /// Freeze (`false`) or unfreeze a parameter. A frozen parameter is invisible to autograd:
    /// no gradient is computed for it and its slot is cleared.
    pub fn set_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        let leaf = &self.find(name)?.leaf;
        if !leaf.is_param() {
            return Err(TensorError::Invalid(format!(
                "`{name}` is a state tensor, not a parameter: only parameters can be frozen or unfrozen"
            )));
        }
        leaf.set_trainable(trainable);
        if !trainable {
            leaf.clear_grad();
        }
        Ok(())
    }

    /// Attach a LoRA adapter of rank `r` to the 2-D weight `base` (`MODULE.weight`), stored
    /// `[in, out]` when `in_out`: declare `MODULE.lora_A.weight` (`[r, in]`, uniform on
    /// `±1/√in`, which is PyTorch's Kaiming-uniform with `a = √5`, PEFT's default) and
    /// `MODULE.lora_B.weight` (`[out, r]`, zeros), and freeze `base`. Its products then gain
    /// `scale · dropout(x) · Aᵀ · Bᵀ` (see the `adapter` module). Returns the two names.
    pub fn attach_lora(
        &mut self,
        base: &str,
        r: usize,
        scale: f64,
        dropout: f64,
        in_out: bool,
    ) -> Result<(String, String)> {
        let leaf = self.find(base)?.leaf.clone();
        let (&[d0, d1], true) = (leaf.var.dims(), leaf.is_param()) else {
            return Err(TensorError::Invalid(format!(
                "`{base}` is not a matrix parameter: LoRA adapts the weights of linear layers"
            )));
        };
        if leaf.lora().is_some() {
            return Err(TensorError::Invalid(format!(
                "`{base}` already has an adapter"
            )));
        }
        let (d_in, d_out) = if in_out { (d0, d1) } else { (d1, d0) };
        let module = base.strip_suffix(".weight").unwrap_or(base);
        let (a_name, b_name) = (
            format!("{module}.lora_A.weight"),
            format!("{module}.lora_B.weight"),
        );
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = self.declare_param(
            &a_name,
            &[r, d_in],
            ParamRole::Weight,
            Init::Uniform { bound },
        )?;
        handles::release(a);
        let b = self.declare_param(&b_name, &[d_out, r], ParamRole::Weight, Init::Zeros)?;
        handles::release(b);
        let lora = super::adapter::Lora::new(
            self.find(&a_name)?.leaf.clone(),
            self.find(&b_name)?.leaf.clone(),
            scale,
            dropout,
            in_out,
            base,
        );
        leaf.attach_lora(Arc::new(lora));
        self.set_trainable(base, false)?;
        Ok((a_name, b_name))
    }

    /// The weights that have an adapter, in declaration order, each with whether it is stored
    /// `[in, out]`.
    pub fn lora_weights(&self) -> Vec<(String, bool)> {
        self.entries
            .iter()
            .filter_map(|e| Some((e.leaf.name.clone(), e.leaf.lora()?.in_out)))
            .collect()
    }

    /// Every parameter that is not an adapter, with adapters merged into their weights
    /// (`W + scale · B·A`), cast to `dtype`: a full model to export.
    pub fn export_merged(&self, dtype: DType) -> Result<Vec<ExportedTensor>> {
        let adapters: std::collections::HashSet<&str> = self
            .entries
            .iter()
            .filter_map(|e| e.leaf.lora())
            .flat_map(|l| [l.a.name.as_str(), l.b.name.as_str()])
            .collect();
        let want = to_candle_dtype(dtype);
        self.group(TensorGroup::Params)
            .filter(|e| !adapters.contains(e.leaf.name.as_str()))
            .map(|e| {
                let t = match super::adapter::merged(&e.leaf)? {
                    Some(t) => t,
                    None => e.leaf.var.as_tensor().detach(),
                }
                .to_dtype(want)?;
                Ok(ExportedTensor {
                    name: e.leaf.name.clone(),
                    dtype,
                    shape: t.dims().to_vec(),
                    bytes: tensor_bytes(&t)?,
                })
            })
            .collect()
    }

    /// SHA-256 over the frozen parameters (name, dtype, shape and bytes of each, in
    /// declaration order): the base a LoRA run's checkpoints are valid for.
    pub fn frozen_sha256(&self) -> Result<String> {
        let mut h = Sha256::new();
        for e in self
            .group(TensorGroup::Params)
            .filter(|e| !e.leaf.trainable())
        {
            let t = e.leaf.var.as_tensor();
            h.update((e.leaf.name.len() as u64).to_le_bytes());
            h.update(e.leaf.name.as_bytes());
            h.update(from_candle_dtype(t.dtype())?.as_str().as_bytes());
            for d in t.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            h.update(tensor_bytes(t)?);
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// Clear the gradient slot of every parameter.
    pub fn zero_grads(&self) {
        for e in self.group(TensorGroup::Params) {
            e.leaf.clear_grad();
        }
    }

    /// The exact bytes of every tensor of a group, in declaration order (for bitwise comparisons
    /// and checksums).
    pub fn export(&self, group: TensorGroup) -> Result<Vec<ExportedTensor>> {
        self.group(group)
            .map(|e| {
                let t = e.leaf.var.as_tensor();
                Ok(ExportedTensor {
                    name: e.leaf.name.clone(),
                    dtype: from_candle_dtype(t.dtype())?,
                    shape: t.dims().to_vec(),
                    bytes: tensor_bytes(t)?,
                })
            })
            .collect()
    }

    /// Like [`ParamStore::export`], every tensor cast to `dtype` (a Hugging Face export in
    /// bf16 or f16).
    pub fn export_as(&self, group: TensorGroup, dtype: DType) -> Result<Vec<ExportedTensor>> {
        let want = to_candle_dtype(dtype);
        self.group(group)
            .map(|e| {
                let t = e.leaf.var.as_tensor().to_dtype(want)?;
                Ok(ExportedTensor {
                    name: e.leaf.name.clone(),
                    dtype,
                    shape: t.dims().to_vec(),
                    bytes: tensor_bytes(&t)?,
                })
            })
            .collect()
    }

    /// Write a group to a safetensors file, by name, in the tensors' own dtypes.
    pub fn save_safetensors(&self, path: &Path, group: TensorGroup) -> Result<()> {
        let exported = self.export(group)?;
        let views = exported
            .iter()
            .map(|e| {
                let view = TensorView::new(st_dtype(e.dtype), e.shape.clone(), &e.bytes)
                    .map_err(|err| checkpoint_error(path, format!("`{}`: {err}", e.name)))?;
                Ok((e.name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::tensor::serialize_to_file(views, None, path)
            .map_err(|err| checkpoint_error(path, format!("cannot write: {err}")))
    }

    /// Overwrite a group from a safetensors file written by [`ParamStore::save_safetensors`].
    /// The file must hold exactly the group's names, with the same shapes and dtypes; otherwise
    /// nothing is changed and the error lists every difference.
    pub fn load_safetensors(&mut self, path: &Path, group: TensorGroup) -> Result<()> {
        self.load_safetensors_as(path, group, &|name| name.to_owned())
    }

    /// [`ParamStore::load_safetensors`] from a file that holds each tensor `name` under
    /// `key_of(name)` (a PEFT adapter's `base_model.model.` names); errors use the file's keys.
    pub fn load_safetensors_as(
        &mut self,
        path: &Path,
        group: TensorGroup,
        key_of: &dyn Fn(&str) -> String,
    ) -> Result<()> {
        let bytes = std::fs::read(path)
            .map_err(|err| checkpoint_error(path, format!("cannot read: {err}")))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|err| {
            checkpoint_error(path, format!("not a valid safetensors file: {err}"))
        })?;
        let in_file: BTreeMap<String, TensorView<'_>> = file.tensors().into_iter().collect();
        let mut problems = Vec::new();
        let mut updates = Vec::new();
        for e in self.group(group) {
            let name = &key_of(&e.leaf.name);
            let Some(view) = in_file.get(name) else {
                problems.push(format!("missing tensor `{name}`"));
                continue;
            };
            let var = &e.leaf.var;
            let want = from_candle_dtype(var.dtype())?;
            if view.shape() != var.dims() {
                problems.push(format!(
                    "`{name}` has shape {:?} in the file, {:?} in the model",
                    view.shape(),
                    var.dims()
                ));
            }
            if st_dtype(want) != view.dtype() {
                problems.push(format!(
                    "`{name}` is {:?} in the file, {} in the model",
                    view.dtype(),
                    want.as_str()
                ));
            }
            updates.push((e.leaf.clone(), view));
        }
        let known: Vec<String> = self.group(group).map(|e| key_of(&e.leaf.name)).collect();
        for name in in_file.keys() {
            if !known.contains(name) {
                problems.push(format!("unexpected tensor `{name}`"));
            }
        }
        if !problems.is_empty() {
            return Err(checkpoint_error(
                path,
                format!(
                    "does not match the declared tensors: {}",
                    problems.join("; ")
                ),
            ));
        }
        for (leaf, view) in updates {
            let value =
                Tensor::from_raw_buffer(view.data(), leaf.var.dtype(), view.shape(), &Device::Cpu)?;
            autograd::assign_leaf(&leaf, &value)?;
        }
        Ok(())
    }
}

/// Write exported tensors to a safetensors file with header metadata (Hugging Face expects
/// `format: pt`).
pub fn write_safetensors(
    path: &Path,
    tensors: &[&ExportedTensor],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|e| {
            let view = TensorView::new(st_dtype(e.dtype), e.shape.clone(), &e.bytes)
                .map_err(|err| checkpoint_error(path, format!("`{}`: {err}", e.name)))?;
            Ok((e.name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|err| checkpoint_error(path, format!("cannot write: {err}")))
}

/// A tensor in a pretrained file, from its header: where its bytes are.
struct Stored {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    name_in_file: String,
}

/// Buffers that Hugging Face models keep in their files but that are not parameters: rotary
/// frequencies of older LLaMA checkpoints and GPT-2's attention masks. Skipped on load.
fn is_hf_buffer(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
}

/// Check that a safetensors file has a valid header and holds every byte the header promises
/// (a truncated download fails here, naming the file), reading the header alone.
pub fn check_safetensors(path: &Path) -> Result<()> {
    read_header(path).map(drop)
}

/// Read the JSON header of a safetensors file and check that the file holds every byte the
/// header promises.
fn read_header(path: &Path) -> Result<safetensors::tensor::Metadata> {
    use std::io::Read;
    let fail = |m: String| checkpoint_error(path, m);
    let mut file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let size = file
        .metadata()
        .map_err(|e| fail(format!("cannot read: {e}")))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| fail("not a safetensors file: shorter than its 8-byte header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || n + 8 > size {
        return Err(fail(format!(
            "not a safetensors file, or truncated: the header claims {n} bytes, the file has {size}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| fail(format!("not a valid safetensors header: {e}")))?;
    let data = metadata
        .tensors()
        .values()
        .map(|info| info.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    if 8 + n + data > size {
        return Err(fail(format!(
            "is truncated: its header describes {} bytes, the file has {size}; copy or \
             download it again",
            8 + n + data
        )));
    }
    Ok(metadata)
}

impl ParamStore {
    /// Overwrite every parameter from a pretrained model's safetensors files (one file, or the
    /// shards of a Hugging Face index), converting f16, bf16 and f64 values to the
    /// parameters' dtype. A parameter `PREFIX.NAME` may be stored as `NAME` (a base model's
    /// file: GPT-2's hub weights say `h.0...` for `transformer.h.0...`). Names in `ignore`
    /// (a tied head saved anyway) and Hugging Face buffers are skipped; anything else the
    /// files hold that the model does not declare is an error, as is a missing parameter or a
    /// shape that differs. Every header is checked before any value changes; `origin` (the
    /// index, or the one file) is the file errors about the set as a whole name.
    pub fn load_pretrained(
        &mut self,
        files: &[&Path],
        origin: &Path,
        ignore: &[&str],
    ) -> Result<()> {
        let mut stored: HashMap<String, Stored> = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let metadata = read_header(path)?;
            for (name, info) in metadata.tensors() {
                let entry = Stored {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    name_in_file: name.clone(),
                };
                if let Some(before) = stored.insert(name.clone(), entry) {
                    return Err(checkpoint_error(
                        path,
                        format!(
                            "holds `{name}`, which {} holds too",
                            files[before.file].display()
                        ),
                    ));
                }
            }
        }
        let mut problems = Vec::new();
        let mut plan: Vec<(Arc<Leaf>, String)> = Vec::new();
        let mut used = std::collections::HashSet::new();
        for e in self.group(TensorGroup::Params) {
            let name = &e.leaf.name;
            let found = stored.get(name).map(|s| (name.as_str(), s)).or_else(|| {
                let (_, rest) = name.split_once('.')?;
                stored.get(rest).map(|s| (rest, s))
            });
            let Some((key, s)) = found else {
                problems.push(format!("`{name}` is missing"));
                continue;
            };
            used.insert(key.to_owned());
            if s.shape != e.leaf.var.dims() {
                problems.push(format!(
                    "`{}` has shape {:?} in {}, but config.json makes it {:?}",
                    s.name_in_file,
                    s.shape,
                    files[s.file].display(),
                    e.leaf.var.dims()
                ));
                continue;
            }
            if !matches!(
                s.dtype,
                StDtype::F32 | StDtype::F16 | StDtype::BF16 | StDtype::F64
            ) {
                problems.push(format!(
                    "`{}` is {:?} in {}; only float tensors can be loaded",
                    s.name_in_file,
                    s.dtype,
                    files[s.file].display()
                ));
                continue;
            }
            plan.push((e.leaf.clone(), key.to_owned()));
        }
        let mut unexpected: Vec<&String> = stored
            .keys()
            .filter(|k| !used.contains(*k) && !ignore.contains(&k.as_str()) && !is_hf_buffer(k))
            .collect();
        unexpected.sort();
        for name in unexpected.iter().take(5) {
            problems.push(format!("`{name}` is not a parameter of the model"));
        }
        if unexpected.len() > 5 {
            problems.push(format!(
                "and {} more unexpected tensors",
                unexpected.len() - 5
            ));
        }
        if !problems.is_empty() {
            let shown: Vec<&String> = problems.iter().take(8).collect();
            let more = match problems.len() {
                n if n > 8 => format!("; and {} more", n - 8),
                _ => String::new(),
            };
            return Err(checkpoint_error(
                origin,
                format!(
                    "the weights do not match the model config.json describes: {}{more}",
                    shown
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ));
        }
        // One file in memory at a time.
        for (i, path) in files.iter().enumerate() {
            let bytes = std::fs::read(path)
                .map_err(|err| checkpoint_error(path, format!("cannot read: {err}")))?;
            let file = SafeTensors::deserialize(&bytes).map_err(|err| {
                checkpoint_error(path, format!("not a valid safetensors file: {err}"))
            })?;
            for (leaf, key) in plan.iter().filter(|(_, k)| stored[k].file == i) {
                let view = file
                    .tensor(key)
                    .map_err(|err| checkpoint_error(path, format!("`{key}`: {err}")))?;
                let dtype = match view.dtype() {
                    StDtype::F16 => CDType::F16,
                    StDtype::BF16 => CDType::BF16,
                    StDtype::F64 => CDType::F64,
                    _ => CDType::F32,
                };
                let value =
                    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
                        .to_dtype(leaf.var.dtype())?;
                autograd::assign_leaf(leaf, &value)?;
            }
        }
        Ok(())
    }
}

impl TensorStore for ParamStore {
    fn declare_param(
        &mut self,
        name: RStr<'_>,
        shape: RSlice<'_, usize>,
        role: ParamRole,
        init: Init,
    ) -> RResult<TensorId, PluginError> {
        guarded("declare_param", || {
            ParamStore::declare_param(self, name.as_str(), &shape, role, init)
        })
    }

    fn declare_state(
        &mut self,
        name: RStr<'_>,
        shape: RSlice<'_, usize>,
        dtype: DType,
        init: Init,
    ) -> RResult<TensorId, PluginError> {
        guarded("declare_state", || {
            ParamStore::declare_state(self, name.as_str(), &shape, dtype, init)
        })
    }

    fn params(&self) -> RVec<ParamInfoAbi> {
        self.param_infos().into_iter().map(Into::into).collect()
    }
}

fn checkpoint_error(path: &Path, message: String) -> TensorError {
    TensorError::Checkpoint {
        path: path.to_path_buf(),
        message,
    }
}

/// The generator for one declared tensor: keyed by the run seed and the name only, so values
/// do not depend on declaration order or on what else is declared.
fn init_rng(seed: u64, name: &str) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(name.as_bytes());
    ChaCha8Rng::from_seed(hasher.finalize().into())
}

fn initial_values(
    seed: u64,
    name: &str,
    shape: &[usize],
    init: Init,
    dtype: CDType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let draw = |values: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    };
    match init {
        Init::Zeros => Ok(Tensor::zeros(shape, dtype, device)?),
        Init::Ones => Ok(Tensor::ones(shape, dtype, device)?),
        Init::Normal { std } => {
            let dist = Normal::new(0.0f32, std as f32)
                .ok()
                .filter(|_| std.is_finite() && std >= 0.0)
                .ok_or_else(|| {
                    TensorError::Invalid(format!(
                        "`{name}`: normal initialisation needs a finite standard deviation >= 0, found {std}"
                    ))
                })?;
            let mut rng = init_rng(seed, name);
            draw((0..n).map(|_| dist.sample(&mut rng)).collect())
        }
        Init::Uniform { bound } => {
            let dist = Uniform::new_inclusive(-bound as f32, bound as f32)
                .ok()
                .filter(|_| bound.is_finite() && bound >= 0.0)
                .ok_or_else(|| {
                    TensorError::Invalid(format!(
                        "`{name}`: uniform initialisation needs a finite bound >= 0, found {bound}"
                    ))
                })?;
            let mut rng = init_rng(seed, name);
            draw((0..n).map(|_| dist.sample(&mut rng)).collect())
        }
    }
}

fn st_dtype(dtype: DType) -> StDtype {
    match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::F64 => StDtype::F64,
        DType::U32 => StDtype::U32,
        DType::U8 => StDtype::U8,
        DType::I64 => StDtype::I64,
    }
}

/// Row-major little-endian bytes of a tensor, copied to the CPU.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match flat.dtype() {
        CDType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::BF16 => flat
            .to_vec1::<bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::F16 => flat
            .to_vec1::<f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::U8 => flat.to_vec1::<u8>()?,
        CDType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(TensorError::UnsupportedDType(other)),
    })
}
