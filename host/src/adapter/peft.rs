//! The PEFT adapter format: `adapter_config.json` and `adapter_model.safetensors`, which
//! `PeftModel.from_pretrained(base, dir)` loads.
//!
//! PEFT names a module's adapter weights `base_model.model.<module>.lora_A.weight` (`[r, in]`)
//! and `...lora_B.weight` (`[out, r]`), the same shapes whatever the base layer's layout
//! (`fan_in_fan_out` says the base is GPT-2's `Conv1D`). What trains besides the adapters is
//! saved under its own name behind the same prefix, except the bias of an adapted module,
//! which PEFT keeps on the wrapped layer (`<module>.base_layer.bias`). A trained embedding
//! that is also the head (tied embeddings) is saved under the head's name too
//! (`lm_head.weight`, as Hugging Face causal LMs name it), with `ensure_weight_tying`, as
//! PEFT saves it; PEFT would otherwise keep the head at the base's weights.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use codex_engine::{write_safetensors, ParamStore, TensorGroup};
use codex_plugin_api::{DType, ParamRole};
use serde_json::{json, Value};

use crate::config::RawTargets;

use crate::config::{AdapterConfig, Targets};
use crate::inference::Loaded;

/// The prefix PEFT gives every key of a causal LM's adapter.
pub const PREFIX: &str = "base_model.model.";

/// PEFT's key for the head of a causal LM, where a tied embedding is saved a second time.
pub const HEAD_KEY: &str = "base_model.model.lm_head.weight";

/// PEFT's key for a trainable parameter of a model whose adapted weights are `adapted`
/// (`MODULE.weight` names).
pub fn peft_key(name: &str, adapted: &[String]) -> String {
    if let Some(module) = name.strip_suffix(".bias") {
        if adapted
            .iter()
            .any(|w| w.strip_suffix(".weight") == Some(module))
        {
            return format!("{PREFIX}{module}.base_layer.bias");
        }
    }
    format!("{PREFIX}{name}")
}

/// `adapter_config.json` for `config`; `in_out` says the adapted weights are stored
/// `[in, out]` (`fan_in_fan_out`), `tied` that a trained embedding is also the head
/// (`ensure_weight_tying`).
pub fn adapter_config(
    config: &AdapterConfig,
    in_out: bool,
    tied: bool,
    base: Option<&str>,
) -> Value {
    let targets = match &config.targets {
        Targets::Names(names) => json!(names),
        Targets::Regex(pattern) => json!(pattern),
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "modules_to_save": if config.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(config.modules_to_save)
        },
        "bias": config.bias.as_str(),
        "fan_in_fan_out": in_out,
        "use_rslora": config.use_rslora,
        "ensure_weight_tying": tied,
        "init_lora_weights": true,
        "inference_mode": true,
    })
}

/// The settings of a PEFT adapter directory's `adapter_config.json`, in the config's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftSettings {
    /// `r`.
    pub r: i64,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// `target_modules`.
    pub targets: RawTargets,
    /// `modules_to_save`.
    pub modules_to_save: Vec<String>,
    /// `bias`.
    pub bias: String,
    /// `use_rslora`.
    pub use_rslora: bool,
}

/// Read `dir/adapter_config.json`, refusing what codex-ml cannot continue training (another
/// PEFT method, DoRA, per-layer ranks, ...). Errors name the file and the field.
pub fn read_config(dir: &Path) -> Result<PeftSettings> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: cannot read it; adapter.from names a directory PEFT's save_pretrained wrote",
            path.display()
        )
    })?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let field = |k: &str| json.get(k).filter(|v| !v.is_null());
    let fail = |k: &str, what: &str| anyhow::anyhow!("{}: {k}: {what}", path.display());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(fail(
                "peft_type",
                &format!("\"{other}\" is not a LoRA adapter"),
            ))
        }
        None => {
            return Err(fail(
                "peft_type",
                "missing; is this a PEFT adapter directory?",
            ))
        }
    }
    let off = |k: &str, what: &str| -> Result<()> {
        match field(k) {
            None | Some(Value::Bool(false)) => Ok(()),
            Some(Value::Object(m)) if m.is_empty() => Ok(()),
            Some(_) => Err(fail(
                k,
                &format!("{what} is not supported; only plain LoRA adapters continue training"),
            )),
        }
    };
    off("use_dora", "DoRA")?;
    off("rank_pattern", "a rank per module")?;
    off("alpha_pattern", "an alpha per module")?;
    off("layers_to_transform", "adapting some layers only")?;
    off("exclude_modules", "excluding modules")?;
    off("target_parameters", "adapting parameters")?;
    off("trainable_token_indices", "trainable tokens")?;
    off("lora_bias", "a bias on lora_B")?;
    let r = field("r")
        .and_then(Value::as_i64)
        .ok_or_else(|| fail("r", "missing or not an integer"))?;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| fail("lora_alpha", "missing or not a number"))?;
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match field("target_modules") {
        Some(Value::String(p)) => RawTargets::Regex(p.clone()),
        Some(Value::Array(items)) => RawTargets::Names(
            items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| fail("target_modules", "holds something other than names"))?,
        ),
        _ => {
            return Err(fail(
                "target_modules",
                "missing: name the modules the adapter adapts",
            ))
        }
    };
    let modules_to_save = match field("modules_to_save") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| fail("modules_to_save", "holds something other than names"))?,
        Some(_) => return Err(fail("modules_to_save", "is not a list of names")),
    };
    Ok(PeftSettings {
        r,
        alpha,
        dropout,
        targets,
        modules_to_save,
        bias: field("bias")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned(),
        use_rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// Overwrite the trainable parameters of `store` (adapters attached as the directory's
/// config says) with `dir/adapter_model.safetensors`: every key must be there with its
/// shape, and nothing else, or nothing changes and the error lists the differences. The one
/// exception is the head's key holding the same values as a trained embedding (the copy PEFT
/// saves of a tied embedding), which is left out.
pub fn load_weights(dir: &Path, store: &mut ParamStore) -> Result<()> {
    let adapted: Vec<String> = store.lora_weights().into_iter().map(|(n, _)| n).collect();
    let path = dir.join("adapter_model.safetensors");
    let key_of = |name: &str| peft_key(name, &adapted);
    let context = || format!("loading the adapter in {}", dir.display());
    match without_tied_head(&path, store, &key_of).with_context(context)? {
        None => store.load_safetensors_as(&path, TensorGroup::Trainable, &key_of),
        Some(copy) => store.load_safetensors_as(copy.path(), TensorGroup::Trainable, &key_of),
    }
    .with_context(context)?;
    Ok(())
}

/// When `path` holds [`HEAD_KEY`], no trained parameter is named so, and its values are those
/// of a trained embedding's key: a temporary copy of the file without it.
fn without_tied_head(
    path: &Path,
    store: &ParamStore,
    key_of: &dyn Fn(&str) -> String,
) -> Result<Option<tempfile::NamedTempFile>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: cannot read it", path.display()))?;
    let Ok(file) = safetensors::SafeTensors::deserialize(&bytes) else {
        // The loader reports what is wrong with the file.
        return Ok(None);
    };
    let Ok(head) = file.tensor(HEAD_KEY) else {
        return Ok(None);
    };
    let infos = store.param_infos();
    let trained = infos.iter().filter(|p| p.trainable);
    if trained.clone().any(|p| key_of(&p.name) == HEAD_KEY) {
        return Ok(None);
    }
    let tied = trained.filter(|p| p.role == ParamRole::Embedding).any(|p| {
        file.tensor(&key_of(&p.name))
            .is_ok_and(|t| t.data() == head.data())
    });
    if !tied {
        return Ok(None);
    }
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != HEAD_KEY)
        .collect();
    let copy = tempfile::NamedTempFile::new().context("a temporary file")?;
    safetensors::serialize_to_file(kept, None, copy.path())
        .map_err(|e| anyhow::anyhow!("{}: {e}", copy.path().display()))?;
    Ok(Some(copy))
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportedAdapter {
    /// The directory.
    pub dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// Write the adapter of `loaded` (a LoRA run's checkpoint) to `out` as PEFT saves one.
pub fn export(loaded: &Loaded, out: &Path, dtype: DType) -> Result<ExportedAdapter> {
    let Some(config) = &loaded.config.adapter else {
        bail!(
            "{}: the run trained the whole model, not an adapter; export it without --adapter",
            loaded.checkpoint.display()
        );
    };
    crate::hf::check_out_dir(out)?;
    let adapted: Vec<(String, bool)> = loaded.store.lora_weights();
    let in_out = adapted.first().is_some_and(|(_, io)| *io);
    if adapted.iter().any(|(_, io)| *io != in_out) {
        bail!(
            "the adapted weights mix [in, out] and [out, in] layouts, which one PEFT \
             adapter_config.json (fan_in_fan_out) cannot describe; adapt weights of one kind"
        );
    }
    let names: Vec<String> = adapted.into_iter().map(|(n, _)| n).collect();
    let mut tensors = loaded
        .store
        .export_as(TensorGroup::Trainable, dtype)
        .context("reading the adapter")?;
    let tied = super::tied_head(&loaded.store, &loaded.model, &loaded.device)?;
    if let Some(embedding) = &tied {
        if let Some(t) = tensors.iter().find(|t| t.name == *embedding) {
            let mut head = t.clone();
            head.name = HEAD_KEY[PREFIX.len()..].to_owned();
            tensors.push(head);
        }
    }
    for t in &mut tensors {
        t.name = peft_key(&t.name, &names);
    }
    let bytes = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    let base = loaded.config.model_from.as_deref();
    let mut text =
        serde_json::to_string_pretty(&adapter_config(config, in_out, tied.is_some(), base))?;
    text.push('\n');
    let refs: Vec<_> = tensors.iter().collect();
    crate::hf::write_dir(out, |dir| {
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            &refs,
            &[("format", "pt")],
        )?;
        crate::fsio::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
        Ok(())
    })?;
    Ok(ExportedAdapter {
        dir: out.to_owned(),
        tensors: tensors.len(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_peft_keys() {
        let adapted = vec!["transformer.h.0.attn.c_attn.weight".to_owned()];
        let key = |n: &str| peft_key(n, &adapted);
        assert_eq!(
            key("transformer.h.0.attn.c_attn.lora_A.weight"),
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
        );
        assert_eq!(
            key("transformer.h.0.attn.c_attn.bias"),
            "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
        );
        assert_eq!(
            key("transformer.h.0.mlp.c_fc.bias"),
            "base_model.model.transformer.h.0.mlp.c_fc.bias"
        );
    }
}
