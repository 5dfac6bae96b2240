//! The PEFT adapter format: `adapter_config.json` and `adapter_model.safetensors`, which
//! `PeftModel.from_pretrained(base, dir)` loads.
//!
//! PEFT names a module's adapter weights `base_model.model.<module>.lora_A.weight` (`[r, in]`)
//! and `...lora_B.weight` (`[out, r]`), the same shapes whatever the base layer's layout
//! (`fan_in_fan_out` says the base is GPT-2's `Conv1D`). What trains besides the adapters is
//! saved under its own name behind the same prefix, except the bias of an adapted module,
//! which PEFT keeps on the wrapped layer (`<module>.base_layer.bias`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use codex_engine::{write_safetensors, TensorGroup};
use codex_plugin_api::DType;
use serde_json::{json, Value};

use crate::config::{AdapterConfig, Targets};
use crate::inference::Loaded;

/// The prefix PEFT gives every key of a causal LM's adapter.
pub const PREFIX: &str = "base_model.model.";

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
/// `[in, out]` (`fan_in_fan_out`).
pub fn adapter_config(config: &AdapterConfig, in_out: bool, base: Option<&str>) -> Value {
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
        "init_lora_weights": true,
        "inference_mode": true,
    })
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
    for t in &mut tensors {
        t.name = peft_key(&t.name, &names);
    }
    let bytes = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    let base = loaded.config.model_from.as_deref();
    let mut text = serde_json::to_string_pretty(&adapter_config(config, in_out, base))?;
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
