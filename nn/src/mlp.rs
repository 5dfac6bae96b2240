//! The two MLPs of decoder blocks: GELU (GPT-2) and SiLU-gated, "SwiGLU" (LLaMA).
//!
//! Parameter names belong to a model family, not to the math (GPT-2 says `c_fc`/`c_proj`,
//! GPT-NeoX `dense_h_to_4h`/`dense_4h_to_h`), so each MLP has a constructor that declares the
//! names, layout and biases of the family it comes from ([`GeluMlp::gpt2`], [`SwiGlu::llama`])
//! and one that assembles it from [`Linear`] layers declared under any other names
//! (`from_linears`). Dropout on the output, where a model has it, stays with the model: it
//! needs the model's numbering of dropout sites.

use codex_plugin_api::{GeluForm, Init, Result, Store, Tensor};

use crate::linear::{Linear, WeightLayout};

/// `proj(gelu(fc(x)))`.
#[derive(Debug)]
pub struct GeluMlp {
    fc: Linear,
    proj: Linear,
    form: GeluForm,
}

impl GeluMlp {
    /// GPT-2's MLP: declares `NAME.c_fc` (`d_model` → `d_hidden`, initialised by `init`) then
    /// `NAME.c_proj` (`d_hidden` → `d_model`, initialised by `proj_init`), both with biases in
    /// the `[in, out]` layout of HF's `Conv1D`.
    pub fn gpt2(
        store: &mut Store<'_, '_>,
        name: &str,
        d_model: usize,
        d_hidden: usize,
        form: GeluForm,
        init: Init,
        proj_init: Init,
    ) -> Result<Self> {
        let mut s = store.pp(name);
        let fc = Linear::new(&mut s, "c_fc", d_model, d_hidden, WeightLayout::InOut, init)?;
        let proj = Linear::new(
            &mut s,
            "c_proj",
            d_hidden,
            d_model,
            WeightLayout::InOut,
            proj_init,
        )?;
        Ok(Self::from_linears(fc, proj, form))
    }

    /// An MLP from two layers declared by the caller.
    pub fn from_linears(fc: Linear, proj: Linear, form: GeluForm) -> Self {
        GeluMlp { fc, proj, form }
    }

    /// Ops: `fc.forward(x)`, `gelu(·, form)`, `proj.forward(·)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward(x)?.gelu(self.form)?;
        self.proj.forward(&h)
    }
}

/// `down(silu(gate(x)) · up(x))`.
#[derive(Debug)]
pub struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGlu {
    /// LLaMA's MLP: declares `NAME.gate_proj`, `NAME.up_proj` (`d_model` → `d_hidden`) and
    /// `NAME.down_proj` (`d_hidden` → `d_model`), in that order, `[out, in]` as
    /// `torch.nn.Linear` stores them, without biases, all initialised by `init`.
    pub fn llama(
        store: &mut Store<'_, '_>,
        name: &str,
        d_model: usize,
        d_hidden: usize,
        init: Init,
    ) -> Result<Self> {
        let mut s = store.pp(name);
        let layout = WeightLayout::OutIn;
        let gate = Linear::no_bias(&mut s, "gate_proj", d_model, d_hidden, layout, init)?;
        let up = Linear::no_bias(&mut s, "up_proj", d_model, d_hidden, layout, init)?;
        let down = Linear::no_bias(&mut s, "down_proj", d_hidden, d_model, layout, init)?;
        Ok(Self::from_linears(gate, up, down))
    }

    /// An MLP from three layers declared by the caller.
    pub fn from_linears(gate: Linear, up: Linear, down: Linear) -> Self {
        SwiGlu { gate, up, down }
    }

    /// Ops: `gate.forward(x)`, `silu`, `up.forward(x)`, `mul`, `down.forward(·)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate.forward(x)?.silu()?;
        let up = self.up.forward(x)?;
        self.down.forward(&gate.mul(&up)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    #[test]
    fn gpt2_mlp_has_conv1d_layers_with_biases() {
        let t = trace(|s| {
            let init = Init::Normal { std: 0.02 };
            let proj_init = Init::Normal { std: 0.01 };
            let mlp = GeluMlp::gpt2(s, "mlp", 4, 16, GeluForm::Tanh, init, proj_init)?;
            mlp.forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param mlp.c_fc.weight [4, 16] weight Normal { std: 0.02 }
             param mlp.c_fc.bias [16] bias Zeros
             param mlp.c_proj.weight [16, 4] weight Normal { std: 0.01 }
             param mlp.c_proj.bias [4] bias Zeros
             matmul(x, mlp.c_fc.weight) -> %1
             add(%1, mlp.c_fc.bias) -> %2
             gelu(%2, Tanh) -> %3
             matmul(%3, mlp.c_proj.weight) -> %4
             add(%4, mlp.c_proj.bias) -> %5",
        );
    }

    #[test]
    fn llama_mlp_gates_with_silu() {
        let t = trace(|s| {
            SwiGlu::llama(s, "mlp", 4, 6, Init::Normal { std: 0.02 })?.forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param mlp.gate_proj.weight [6, 4] weight Normal { std: 0.02 }
             param mlp.up_proj.weight [6, 4] weight Normal { std: 0.02 }
             param mlp.down_proj.weight [4, 6] weight Normal { std: 0.02 }
             transpose(mlp.gate_proj.weight, 0, 1) -> %1
             matmul(x, %1) -> %2
             silu(%2) -> %3
             transpose(mlp.up_proj.weight, 0, 1) -> %4
             matmul(x, %4) -> %5
             mul(%3, %5) -> %6
             transpose(mlp.down_proj.weight, 0, 1) -> %7
             matmul(%6, %7) -> %8",
        );
    }
}
