//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as a native
//! codex-ml plugin: the whole plugin is this file, and it depends on `codex-plugin-api` only.
//!
//! Per trainable parameter, with `lr` the step's learning rate:
//! `c ← β₁m + (1−β₁)g`, `p ← p·(1 − lr·λ) − lr·sign(c)`, `m ← β₂m + (1−β₂)g`.
//! The momentum `m` is a host tensor named `optimizer.<parameter>.exp_avg` (f32, zeros), so the
//! host checkpoints and restores it like any built-in optimizer's state. The update has the
//! same magnitude for every coordinate, so Lion wants a learning rate 3–10× smaller than
//! AdamW's and a weight decay 3–10× larger.
//!
//! The whole step of a parameter is one op-table call: an element-wise [`Program`], built once
//! from the betas, that the host runs in one pass over the parameter's elements, writing `p`
//! and `m` in place. Composed from tensor ops instead (`mul_scalar`, `add`, `sign`, `sub`, two
//! `assign`s), the same step takes twelve calls and ten temporaries the size of the parameter;
//! the results are the same bit for bit.
//!
//! Build it with `cargo build --release -p native-lion` and declare
//! `target/release/libnative_lion.so` in a plugin manifest (see `docs/plugins-native.md`); the
//! optimizer is then `lion/lion` when the manifest names the plugin `lion`.

use codex_plugin_api::{
    bail, DType, Describe, Expr, Grad, Init, OptimStep, Optimizer, ParamInfo, Program, Result,
    Store, Tensor,
};
use serde::{Deserialize, Serialize};

codex_plugin_api::export_plugin! {
    name: "lion",
    version: env!("CARGO_PKG_VERSION"),
    components: [codex_plugin_api::optimizer::declare::<Lion>],
}

/// `optimizer.params` of a config using Lion, as written; also what `config_json` reports.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `[β₁, β₂]`: interpolation for the update's sign, then momentum decay. Default
    /// `[0.9, 0.99]`, the paper's.
    #[serde(default = "default_betas")]
    betas: [f64; 2],
    /// Decoupled weight decay λ, applied to every trainable parameter. Default 0.
    #[serde(default)]
    weight_decay: f64,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.99]
}

impl Config {
    fn parse(params: &str) -> Result<Config> {
        let text = if params.trim().is_empty() {
            "{}"
        } else {
            params
        };
        let config: Config = serde_json::from_str(text)
            .map_err(|e| codex_plugin_api::Error::msg(format!("optimizer params: {e}")))?;
        for (i, b) in config.betas.iter().enumerate() {
            if !(0.0..=1.0).contains(b) {
                bail!("optimizer params: betas[{i}] must be in [0, 1], found {b}");
            }
        }
        if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0) {
            bail!(
                "optimizer params: weight_decay must be zero or positive, found {}",
                config.weight_decay
            );
        }
        Ok(config)
    }
}

/// Lion's optimizer (registry name `lion`).
pub struct Lion {
    config: Config,
    /// Momentum per parameter, indexed like the parameter list; `None` for frozen ones.
    momentum: Vec<Option<Tensor>>,
    /// One parameter's step: inputs `[p, g, m]`, scalars `[lr, 1 − lr·λ]`, targets `[p, m]`.
    program: Program,
}

impl Describe for Lion {
    const NAME: &'static str = "lion";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Lion: sign of interpolated momentum, decoupled weight decay (Chen et al. 2023)";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        Config::parse(params).map(drop)
    }
}

/// Lion's update of one parameter `p` with gradient `g` and momentum `m`, the betas fixed.
fn program([b1, b2]: [f64; 2]) -> Program {
    let (p, g, m) = (Expr::input(0), Expr::input(1), Expr::input(2));
    let (lr, decay) = (Expr::scalar(0), Expr::scalar(1));
    let interpolated = &m * b1 + &g * (1.0 - b1);
    Program::new()
        .store(0, p * decay - interpolated.sign() * lr)
        .store(1, m * b2 + g * (1.0 - b2))
}

impl Optimizer for Lion {
    fn create(params: &str, infos: &[ParamInfo], store: &mut Store<'_, '_>) -> Result<Self> {
        let config = Config::parse(params)?;
        let mut momentum = Vec::with_capacity(infos.len());
        for info in infos {
            momentum.push(if info.trainable {
                Some(store.state(
                    &format!("optimizer.{}.exp_avg", info.name),
                    &info.shape,
                    DType::F32,
                    Init::Zeros,
                )?)
            } else {
                None
            });
        }
        let program = program(config.betas);
        Ok(Lion {
            config,
            momentum,
            program,
        })
    }

    fn step(&mut self, grads: &[Grad], step: OptimStep) -> Result<()> {
        let lr = step.lr;
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("learning rate must be zero or positive, found {lr}; check the schedule");
        }
        let decay = 1.0 - lr * self.config.weight_decay;
        for g in grads {
            let Some(slot) = self.momentum.get(g.index) else {
                bail!(
                    "gradient for parameter {} but the optimizer was created with {} parameters",
                    g.index,
                    self.momentum.len()
                );
            };
            // Frozen parameters have no momentum and are never updated.
            let Some(m) = slot else { continue };
            Tensor::elementwise_update(
                &self.program,
                &[&g.param, &g.grad, m],
                &[lr, decay],
                &[&g.param, m],
            )?;
        }
        Ok(())
    }

    fn config_json(&self) -> String {
        // Numbers only: serialisation cannot fail.
        serde_json::to_string(&self.config).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let c = Config::parse("").expect("empty params");
        assert_eq!(c.betas, [0.9, 0.99]);
        assert!(c.weight_decay.abs() < 1e-15);
        let c = Config::parse(r#"{"betas": [0.95, 0.98], "weight_decay": 0.1}"#).expect("valid");
        assert!((c.betas[0] - 0.95).abs() < 1e-15 && (c.weight_decay - 0.1).abs() < 1e-15);
    }

    #[test]
    fn bad_params_name_their_field() {
        let err = |json: &str| Config::parse(json).expect_err(json).to_string();
        assert!(err(r#"{"beta": [0.9, 0.99]}"#).contains("unknown field `beta`"));
        assert!(err(r#"{"betas": [1.5, 0.99]}"#).contains("betas[0]"));
        assert!(err(r#"{"weight_decay": -1}"#).contains("weight_decay"));
    }
}
