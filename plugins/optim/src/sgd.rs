//! SGD with momentum, dampening, Nesterov and coupled L2 weight decay, as `torch.optim.SGD`.
//!
//! Per parameter, with `lr` the step's learning rate:
//! `g ← g + λp`; with momentum μ: `b ← g` at the first step, else `b ← μb + (1−τ)g`;
//! then `g ← g + μb` (Nesterov) or `g ← b`; finally `p ← p − lr·g`.
//! The buffer is the host tensor `optimizer.<parameter>.momentum_buffer` (f32, zeros), so
//! checkpoints carry it. "First step" is read from the step counter, which survives a resume,
//! rather than from plugin memory, which does not.

use codex_plugin_api::strict::{invalid, parse_params as parse_strict};
use codex_plugin_api::{
    bail, DType, Describe, Grad, Init, OptimStep, Optimizer, ParamInfo, Result, Store, Tensor,
};
use serde::{Deserialize, Serialize};

/// The `optimizer.params` of an experiment using `sgd`, as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Momentum factor μ. Default 0 (plain SGD, no buffer).
    #[serde(default)]
    momentum: f64,
    /// Dampening τ of the momentum. Default 0.
    #[serde(default)]
    dampening: f64,
    /// Nesterov momentum; needs `momentum > 0` and `dampening = 0`. Default false.
    #[serde(default)]
    nesterov: bool,
    /// L2 penalty λ added to the gradient (coupled, unlike AdamW's). Default 0.
    #[serde(default)]
    weight_decay: f64,
}

/// The resolved configuration, also what `config_json` writes. The learning rate is not part
/// of it: it comes with every step, from the trainer's schedule.
#[derive(Serialize, Debug, Clone)]
struct Config {
    momentum: f64,
    dampening: f64,
    nesterov: bool,
    weight_decay: f64,
}

impl RawConfig {
    fn resolve(self) -> Result<Config, codex_plugin_api::Error> {
        for (field, value) in [
            ("momentum", self.momentum),
            ("dampening", self.dampening),
            ("weight_decay", self.weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(
                    field,
                    format!("must be zero or positive, found {value}"),
                ));
            }
        }
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return Err(invalid(
                "nesterov",
                format!(
                    "needs momentum > 0 and dampening = 0, found momentum {} and dampening {}",
                    self.momentum, self.dampening
                ),
            ));
        }
        Ok(Config {
            momentum: self.momentum,
            dampening: self.dampening,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
        })
    }
}

/// What SGD keeps for one trainable parameter.
enum Slot {
    Frozen,
    /// Without momentum there is no state at all.
    Plain,
    Momentum(Tensor),
}

/// Stochastic gradient descent (registry name `sgd`).
pub struct Sgd {
    config: Config,
    slots: Vec<Slot>,
}

impl Describe for Sgd {
    const NAME: &'static str = "sgd";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "stochastic gradient descent with momentum, Nesterov and L2 decay (torch.optim.SGD)";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<RawConfig>(params).map(drop)
    }
}

impl Optimizer for Sgd {
    fn create(params: &str, infos: &[ParamInfo], store: &mut Store<'_, '_>) -> Result<Self> {
        let raw: RawConfig = parse_strict(params)?;
        let config = raw.resolve()?;
        let mut slots = Vec::with_capacity(infos.len());
        for info in infos {
            let slot = if !info.trainable {
                Slot::Frozen
            } else if config.momentum == 0.0 {
                Slot::Plain
            } else {
                let name = format!("optimizer.{}.momentum_buffer", info.name);
                Slot::Momentum(store.state(&name, &info.shape, DType::F32, Init::Zeros)?)
            };
            slots.push(slot);
        }
        Ok(Sgd { config, slots })
    }

    fn step(&mut self, grads: &[Grad], step: OptimStep) -> Result<()> {
        let OptimStep { lr, step: t } = step;
        if t == 0 {
            bail!("optimizer steps are counted from 1, found step 0");
        }
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("learning rate must be zero or positive, found {lr}; check the schedule");
        }
        let Config {
            momentum,
            dampening,
            nesterov,
            weight_decay,
            ..
        } = self.config;
        for g in grads {
            let Some(slot) = self.slots.get(g.index) else {
                bail!(
                    "gradient for parameter {} but the optimizer was created with {} parameters",
                    g.index,
                    self.slots.len()
                );
            };
            let grad = if weight_decay == 0.0 {
                g.grad.clone()
            } else {
                g.grad.add(&g.param.affine(weight_decay, 0.0)?)?
            };
            let direction = match slot {
                Slot::Frozen => continue,
                Slot::Plain => grad,
                Slot::Momentum(buffer) => {
                    let new = if t == 1 {
                        grad.clone()
                    } else if dampening == 0.0 {
                        buffer.affine(momentum, 0.0)?.add(&grad)?
                    } else {
                        buffer
                            .affine(momentum, 0.0)?
                            .add(&grad.affine(1.0 - dampening, 0.0)?)?
                    };
                    buffer.assign(&new)?;
                    if nesterov {
                        grad.add(&new.affine(momentum, 0.0)?)?
                    } else {
                        new
                    }
                }
            };
            g.param.assign(&g.param.sub(&direction.affine(lr, 0.0)?)?)?;
        }
        Ok(())
    }

    fn config_json(&self) -> String {
        // Numbers and booleans only: serialisation cannot fail.
        serde_json::to_string(&self.config).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_field() {
        let check = |json: &str, field: &str| {
            let err = parse_strict::<RawConfig>(json)
                .map_err(|e| e.to_string())
                .and_then(|r| r.resolve().map_err(|e| e.to_string()))
                .expect_err("rejected");
            assert!(err.contains(field), "{err:?} should name {field}");
        };
        check(r#"{"nesterov": true}"#, "nesterov");
        check(
            r#"{"nesterov": true, "momentum": 0.9, "dampening": 0.1}"#,
            "nesterov",
        );
        check(r#"{"momentum": -0.5}"#, "momentum");
        check(r#"{"weight_decay": -1}"#, "weight_decay");
        check(r#"{"momentum": "high"}"#, "momentum");
        check(r#"{"betas": [0.9, 0.99]}"#, "unknown field `betas`");
    }

    #[test]
    fn nesterov_with_momentum_is_accepted() {
        let c = parse_strict::<RawConfig>(r#"{"momentum": 0.9, "nesterov": true}"#)
            .expect("parses")
            .resolve()
            .expect("valid");
        assert!(c.nesterov && (c.momentum - 0.9).abs() < 1e-15);
    }
}
