//! AdamW: Adam with decoupled weight decay, as `torch.optim.AdamW` computes it.
//!
//! Per parameter, with `t` the 1-based step and `lr` the step's learning rate:
//! `p ← p·(1 − lr·λ)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
//! The moments are host tensors `optimizer.<parameter>.exp_avg` and `.exp_avg_sq` (f32,
//! zeros), so checkpoints carry them. The update itself is the host's `adamw_update`, which
//! runs a fused kernel when one is active and keeps torch's evaluation order either way.

use codex_plugin_api::strict::{invalid, parse_params as parse_strict};
use codex_plugin_api::tensor::AdamWHyper;
use codex_plugin_api::{
    bail, DType, Describe, Grad, Init, OptimStep, Optimizer, ParamInfo, Result, Store, Tensor,
};
use serde::{Deserialize, Serialize};

use crate::roles::Role;

/// The `optimizer.params` of an experiment using `adamw`, as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `[β₁, β₂]`, each in `[0, 1)`. Default `[0.9, 0.999]`.
    #[serde(default = "default_betas")]
    betas: [f64; 2],
    /// Added to the denominator for stability. Default 1e-8.
    #[serde(default = "default_eps")]
    eps: f64,
    /// Decoupled weight decay λ. Default 0.01 (torch's default).
    #[serde(default = "default_weight_decay")]
    weight_decay: f64,
    /// Roles whose parameters are never decayed. Default `["bias", "norm", "embedding"]`;
    /// `[]` decays everything, as `torch.optim.AdamW(model.parameters())` does.
    #[serde(default = "default_no_decay")]
    no_decay: Vec<Role>,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_no_decay() -> Vec<Role> {
    vec![Role::Bias, Role::Norm, Role::Embedding]
}

/// The resolved configuration, also what `config_json` writes. The learning rate is not part
/// of it: it comes with every step, from the trainer's schedule.
#[derive(Serialize, Debug, Clone)]
struct Config {
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    no_decay: Vec<Role>,
}

impl RawConfig {
    fn resolve(self) -> Result<Config, codex_plugin_api::Error> {
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                let field = if i == 0 { "betas[0]" } else { "betas[1]" };
                return Err(invalid(field, format!("must be in [0, 1), found {b}")));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(invalid(
                "eps",
                format!("must be zero or positive, found {}", self.eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight_decay",
                format!("must be zero or positive, found {}", self.weight_decay),
            ));
        }
        Ok(Config {
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            no_decay: self.no_decay,
        })
    }
}

/// One trainable parameter's state.
struct Slot {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight_decay: f64,
}

/// AdamW with decoupled weight decay (registry name `adamw`).
pub struct AdamW {
    config: Config,
    /// Indexed like the parameter list; `None` for frozen parameters.
    slots: Vec<Option<Slot>>,
}

impl Describe for AdamW {
    const NAME: &'static str = "adamw";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Adam with decoupled weight decay (torch.optim.AdamW), no decay on chosen roles";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<RawConfig>(params).map(drop)
    }
}

impl Optimizer for AdamW {
    fn create(params: &str, infos: &[ParamInfo], store: &mut Store<'_, '_>) -> Result<Self> {
        let raw: RawConfig = parse_strict(params)?;
        let config = raw.resolve()?;
        let mut slots = Vec::with_capacity(infos.len());
        for info in infos {
            if !info.trainable {
                slots.push(None);
                continue;
            }
            let name = &info.name;
            let exp_avg = store.state(
                &format!("optimizer.{name}.exp_avg"),
                &info.shape,
                DType::F32,
                Init::Zeros,
            )?;
            let exp_avg_sq = store.state(
                &format!("optimizer.{name}.exp_avg_sq"),
                &info.shape,
                DType::F32,
                Init::Zeros,
            )?;
            let decayed = !config.no_decay.iter().any(|r| r.matches(info.role));
            slots.push(Some(Slot {
                exp_avg,
                exp_avg_sq,
                weight_decay: if decayed { config.weight_decay } else { 0.0 },
            }));
        }
        Ok(AdamW { config, slots })
    }

    fn step(&mut self, grads: &[Grad], step: OptimStep) -> Result<()> {
        let OptimStep { lr, step: t } = step;
        if t == 0 {
            bail!("optimizer steps are counted from 1, found step 0");
        }
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("learning rate must be zero or positive, found {lr}; check the schedule");
        }
        let [beta1, beta2] = self.config.betas;
        for g in grads {
            let Some(slot) = self.slots.get(g.index) else {
                bail!(
                    "gradient for parameter {} but the optimizer was created with {} parameters",
                    g.index,
                    self.slots.len()
                );
            };
            // Frozen parameters have no state and are never updated.
            let Some(slot) = slot else { continue };
            g.param.adamw_update(
                &g.grad,
                &slot.exp_avg,
                &slot.exp_avg_sq,
                AdamWHyper {
                    lr,
                    beta1,
                    beta2,
                    eps: self.config.eps,
                    weight_decay: slot.weight_decay,
                    step: t,
                },
            )?;
        }
        Ok(())
    }

    fn config_json(&self) -> String {
        // Numbers and role names only: serialisation cannot fail.
        serde_json::to_string(&self.config).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_torch_with_documented_no_decay() {
        let c = parse_strict::<RawConfig>("")
            .expect("parses")
            .resolve()
            .expect("valid");
        assert_eq!(c.betas, [0.9, 0.999]);
        assert!((c.eps - 1e-8).abs() < 1e-20 && (c.weight_decay - 0.01).abs() < 1e-15);
        assert_eq!(c.no_decay, vec![Role::Bias, Role::Norm, Role::Embedding]);
    }

    #[test]
    fn bad_values_name_their_field() {
        let check = |json: &str, field: &str| {
            let err = parse_strict::<RawConfig>(json)
                .map_err(|e| e.to_string())
                .and_then(|r| r.resolve().map_err(|e| e.to_string()))
                .expect_err("rejected");
            assert!(err.contains(field), "{err:?} should name {field}");
        };
        check(r#"{"betas": [0.9, 1.0]}"#, "betas[1]");
        check(r#"{"eps": -1}"#, "eps");
        check(r#"{"weight_decay": -0.1}"#, "weight_decay");
        check(r#"{"no_decay": ["bias", "gain"]}"#, "no_decay[1]");
        check(r#"{"lr": 0.1}"#, "unknown field `lr`");
        check(r#"{"betas": [0.9]}"#, "betas");
    }
}
