//! Normalisation layers: layer norm (GPT-2) and RMS norm (LLaMA) over the last dimension.
//!
//! Each is one op-table call, so the host's fused norm kernels (forward and backward) serve
//! every model. The block holds its epsilon, fixed by the model's config when it is declared,
//! so a forward pass cannot disagree with the config that was saved with the checkpoint.
//! Gains start at one and shifts at zero, as in PyTorch and Hugging Face.

use codex_plugin_api::{Init, ParamRole, Result, Store, Tensor};

/// Layer norm over the last dimension: `NAME.weight` (ones) and `NAME.bias` (zeros), role norm.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Declare `NAME.weight` then `NAME.bias`, both `[dim]`.
    pub fn new(store: &mut Store<'_, '_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let mut s = store.pp(name);
        Ok(LayerNorm {
            weight: s.param("weight", &[dim], ParamRole::Norm, Init::Ones)?,
            bias: s.param("bias", &[dim], ParamRole::Norm, Init::Zeros)?,
            eps,
        })
    }

    /// Ops: `layer_norm(x, weight, bias, eps)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, self.eps)
    }

    /// The gain.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// RMS norm over the last dimension: `NAME.weight` (ones), role norm, no shift.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Declare `NAME.weight`, `[dim]`.
    pub fn new(store: &mut Store<'_, '_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = store
            .pp(name)
            .param("weight", &[dim], ParamRole::Norm, Init::Ones)?;
        Ok(RmsNorm { weight, eps })
    }

    /// Ops: `rms_norm(x, weight, eps)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(&self.weight, self.eps)
    }

    /// The gain.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    #[test]
    fn layer_norm_declares_gain_then_shift() {
        let t = trace(|s| {
            LayerNorm::new(&mut s.pp("h.0"), "ln_1", 8, 1e-5)?.forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param h.0.ln_1.weight [8] norm Ones
             param h.0.ln_1.bias [8] norm Zeros
             layer_norm(x, h.0.ln_1.weight, h.0.ln_1.bias, 0.00001) -> %1",
        );
    }

    #[test]
    fn rms_norm_declares_a_gain_only() {
        let t = trace(|s| {
            RmsNorm::new(s, "model.norm", 8, 1e-6)?.forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param model.norm.weight [8] norm Ones
             rms_norm(x, model.norm.weight, 0.000001) -> %1",
        );
    }
}
