//! LoRA adapters: which of a model's weights get one, freezing the rest, and the PEFT format
//! (`peft.rs`).
//!
//! The host declares every parameter by name, so adapting a model needs nothing from it: the
//! modules are the parameter names without their last part, `adapter.target_modules` picks
//! among them with PEFT's rules, and the engine attaches an adapter to each picked weight
//! (`ParamStore::attach_lora`), which then acts wherever the model multiplies by that weight.
//! One forward pass under the engine's probe first tells, for each weight, whether the model
//! reads it `[in, out]` (GPT-2's `Conv1D`) or `[out, in]` (`nn.Linear`), which its shape
//! cannot say.

pub mod peft;

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use codex_engine::{self as engine, Device, ParamStore, WeightUse};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::{ForwardCtx, ParamRole, Tensor};

use crate::config::{AdapterConfig, LoraBias};
use crate::run::RunError;

/// What [`attach`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    /// The adapted weights (`MODULE.weight`), each with whether it is stored `[in, out]`.
    pub weights: Vec<(String, bool)>,
    /// Parameters that train, adapters included.
    pub trainable: usize,
    /// Every parameter, adapters included.
    pub total: usize,
}

/// The modules of a model: parameter names without their last part, with the parameters.
fn modules(store: &ParamStore) -> BTreeMap<String, Vec<(String, ParamRole, Vec<usize>)>> {
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for p in store.param_infos() {
        let name = p.name.to_string();
        let module = name.rsplit_once('.').map_or("", |(m, _)| m).to_owned();
        out.entry(module).or_default().push((name, p.role, p.shape));
    }
    out
}

/// The linear modules of a model (those with a 2-D `weight` of role weight): what
/// `target_modules` may name.
pub fn linear_modules(store: &ParamStore) -> Vec<String> {
    modules(store)
        .into_iter()
        .filter(|(m, params)| {
            params.iter().any(|(n, role, shape)| {
                *n == format!("{m}.weight") && *role == ParamRole::Weight && shape.len() == 2
            })
        })
        .map(|(m, _)| m)
        .collect()
}

/// Freeze `store` and attach the adapters `config` asks for, after the base weights are in
/// place; `model` is run once on one token to learn each weight's layout. Errors are the
/// config's (`RunError`): a target that matches nothing (listing the linear modules), a
/// target that is not a linear layer, a `modules_to_save` entry that matches nothing.
pub fn attach(
    config: &AdapterConfig,
    store: &mut ParamStore,
    model: &ModelBox,
    device: &Device,
) -> Result<Attached> {
    let modules = modules(store);
    let linear = linear_modules(store);
    let mut targets = Vec::new();
    for module in modules.keys().filter(|m| config.targets.matches(m)) {
        let weight = format!("{module}.weight");
        if !linear.contains(module) {
            return Err(RunError::Adapter(format!(
                "adapter.target_modules matches `{module}`, which is not a linear layer (it has \
                 no matrix `{weight}`); LoRA adapts linear layers such as {}",
                example_names(&linear)
            ))
            .into());
        }
        targets.push((module.clone(), weight));
    }
    if targets.is_empty() {
        return Err(RunError::Adapter(format!(
            "adapter.target_modules matches none of the model's modules; its linear modules \
             are {}",
            example_names(&linear)
        ))
        .into());
    }
    let mut to_save = Vec::new();
    for entry in &config.modules_to_save {
        let found: Vec<&String> = modules
            .keys()
            .filter(|m| m.ends_with(entry.as_str()))
            .collect();
        if found.is_empty() {
            return Err(RunError::Adapter(format!(
                "adapter.modules_to_save: `{entry}` matches none of the model's modules (a \
                 weight shared with another module, such as a tied head, is saved under that \
                 module's name)"
            ))
            .into());
        }
        to_save.extend(found.into_iter().cloned());
    }

    let uses = weight_uses(model, device)?;

    let mut weights = Vec::new();
    for (module, weight) in &targets {
        let Some(seen) = uses.get(weight) else {
            return Err(RunError::Adapter(format!(
                "adapter.target_modules matches `{module}`, but the model never multiplies by \
                 `{weight}` as a linear layer's weight, so an adapter there would do nothing"
            ))
            .into());
        };
        let in_out = seen[0].in_out;
        if seen.iter().any(|u| u.in_out != in_out) {
            bail!("`{weight}` is read both as [in, out] and as [out, in]: it cannot be adapted");
        }
        weights.push((weight.clone(), in_out));
    }

    for p in store.param_infos() {
        store.set_trainable(&p.name, false)?;
    }
    for (weight, in_out) in &weights {
        store.attach_lora(weight, config.r, config.scale(), config.dropout, *in_out)?;
    }
    let adapted: Vec<&str> = targets.iter().map(|(m, _)| m.as_str()).collect();
    // PEFT picks biases by name, whatever the layer: `all` trains every `*.bias` (a
    // LayerNorm's shift too), `lora_only` the bias of each adapted module.
    for (module, params) in &modules {
        for (name, _, _) in params {
            let bias = name == "bias" || *name == format!("{module}.bias");
            let trains = to_save.contains(module)
                || (bias && config.bias == LoraBias::All)
                || (bias
                    && config.bias == LoraBias::LoraOnly
                    && adapted.contains(&module.as_str()));
            if trains {
                store.set_trainable(name, true)?;
            }
        }
    }
    let infos = store.param_infos();
    let count = |shape: &[usize]| shape.iter().product::<usize>();
    Ok(Attached {
        weights,
        trainable: infos
            .iter()
            .filter(|p| p.trainable)
            .map(|p| count(&p.shape))
            .sum(),
        total: infos.iter().map(|p| count(&p.shape)).sum(),
    })
}

/// How the model reads each weight: one forward pass over one token, under the engine's
/// probe.
fn weight_uses(model: &ModelBox, device: &Device) -> Result<BTreeMap<String, Vec<WeightUse>>> {
    let ids = Tensor::from_id(engine::upload_ids(vec![0], &[1, 1], device)?);
    let (out, uses) = engine::probe(|| {
        model.forward(
            ids.id(),
            ForwardCtx {
                train: false,
                seed: 0,
            },
        )
    });
    drop(Tensor::from_id(
        out.into_result()
            .map_err(|e| anyhow!("model `{}`: {e}", "forward pass"))?,
    ));
    Ok(uses)
}

/// The trained embedding matrix that the model also multiplies by as its head, if any: a
/// model with tied embeddings whose `modules_to_save` holds the embedding. The one matrix
/// then trains for both uses, which PEFT does with `ensure_weight_tying`.
pub fn tied_head(store: &ParamStore, model: &ModelBox, device: &Device) -> Result<Option<String>> {
    let trained: Vec<String> = store
        .param_infos()
        .iter()
        .filter(|p| p.trainable && p.role == ParamRole::Embedding)
        .map(|p| p.name.to_string())
        .collect();
    if trained.is_empty() {
        return Ok(None);
    }
    let uses = weight_uses(model, device)?;
    Ok(trained.into_iter().find(|n| uses.contains_key(n)))
}

/// A few of `names`, for an error message at 80 columns: every distinct last part (`q_proj`,
/// `c_attn`), then one full name.
fn example_names(names: &[String]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    let mut short: Vec<&str> = names
        .iter()
        .map(|n| n.rsplit_once('.').map_or(n.as_str(), |(_, last)| last))
        .collect();
    short.sort_unstable();
    short.dedup();
    let listed = short
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{listed} (full names such as `{}`)", names[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Targets;

    #[test]
    fn names_match_as_peft_matches_them() {
        let t = Targets::Names(vec!["q_proj".into(), "attn.c_attn".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("q_proj"));
        assert!(t.matches("transformer.h.1.attn.c_attn"));
        assert!(!t.matches("model.layers.0.self_attn.qq_proj"));
        assert!(!t.matches("model.layers.0.self_attn.q_proj.x"));
        let r = Targets::Regex(r".*\.(q|v)_proj".into());
        assert!(r.matches("model.layers.0.self_attn.v_proj"));
        assert!(!r.matches("model.layers.0.self_attn.k_proj"));
        // The whole name must match, as Python's re.fullmatch.
        assert!(!Targets::Regex("q_proj".into()).matches("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn example_names_fit_a_message() {
        let names = vec![
            "model.layers.0.mlp.up_proj".to_owned(),
            "model.layers.0.self_attn.q_proj".to_owned(),
            "model.layers.1.self_attn.q_proj".to_owned(),
        ];
        assert_eq!(
            example_names(&names),
            "`q_proj`, `up_proj` (full names such as `model.layers.0.mlp.up_proj`)"
        );
    }
}
