//! Linear layers, in either of the two weight layouts Hugging Face checkpoints use.
//!
//! `torch.nn.Linear` stores its weight `[out, in]` (LLaMA and most models); GPT-2's `Conv1D`
//! stores it `[in, out]`. A checkpoint exports to `transformers` without transposing only if
//! the parameter has the layout the HF model expects, so the layout is an explicit choice of
//! every [`Linear`], never a guess, and the forward pass adapts to it: `x · W` for `[in, out]`,
//! `x · Wᵀ` (a transposed view the matrix product reads directly) for `[out, in]`. The bias add
//! comes straight after the product, the pattern the host fuses into one op.

use codex_plugin_api::{bail, Init, ParamRole, Result, Store, Tensor};

/// How a [`Linear`] stores its weight matrix.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`, as `torch.nn.Linear` stores it: `y = x · Wᵀ + b`.
    OutIn,
    /// `[in, out]`, as Hugging Face's `Conv1D` (GPT-2) stores it: `y = x · W + b`.
    InOut,
}

/// `y = x · W + b` over the last dimension, with `W` in a chosen [`WeightLayout`] and an
/// optional bias.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
    d_in: usize,
    d_out: usize,
}

impl Linear {
    /// Declare `NAME.weight` (role weight, initialised by `init`, shaped by `layout`) and then
    /// `NAME.bias` (`[d_out]`, role bias, zeros, as Hugging Face initialises biases).
    pub fn new(
        store: &mut Store<'_, '_>,
        name: &str,
        d_in: usize,
        d_out: usize,
        layout: WeightLayout,
        init: Init,
    ) -> Result<Self> {
        let mut s = store.pp(name);
        let weight = Self::declare_weight(&mut s, d_in, d_out, layout, init)?;
        let bias = s.param("bias", &[d_out], ParamRole::Bias, Init::Zeros)?;
        Ok(Linear {
            weight,
            bias: Some(bias),
            layout,
            d_in,
            d_out,
        })
    }

    /// Declare `NAME.weight` only: a linear map without bias (`bias=False` in PyTorch).
    pub fn no_bias(
        store: &mut Store<'_, '_>,
        name: &str,
        d_in: usize,
        d_out: usize,
        layout: WeightLayout,
        init: Init,
    ) -> Result<Self> {
        let weight = Self::declare_weight(&mut store.pp(name), d_in, d_out, layout, init)?;
        Ok(Linear {
            weight,
            bias: None,
            layout,
            d_in,
            d_out,
        })
    }

    fn declare_weight(
        store: &mut Store<'_, '_>,
        d_in: usize,
        d_out: usize,
        layout: WeightLayout,
        init: Init,
    ) -> Result<Tensor> {
        let shape = match layout {
            WeightLayout::OutIn => [d_out, d_in],
            WeightLayout::InOut => [d_in, d_out],
        };
        store.param("weight", &shape, ParamRole::Weight, init)
    }

    /// `x` is `[rows, in]`: one 2-D product (then the bias add), which is what the host's fused
    /// kernels recognise.
    ///
    /// Ops: `[out, in]`: `transpose(W, 0, 1)`, `matmul`; `[in, out]`: `matmul(x, W)`; then
    /// `add(·, b)` when there is a bias.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.layout {
            WeightLayout::OutIn => x.matmul(&self.weight.transpose(0, 1)?)?,
            WeightLayout::InOut => x.matmul(&self.weight)?,
        };
        match &self.bias {
            Some(bias) => y.add(bias),
            None => Ok(y),
        }
    }

    /// Outputs `start..start + len` only, from the matching slice of the weight (and bias):
    /// how a fused projection such as GPT-2's `c_attn` (q, k and v side by side) is split.
    /// Slicing the parameters rather than the full output keeps the backward pass from padding
    /// the slices' gradients back to the full output width.
    ///
    /// Ops: `narrow` of the weight along its output dimension (then `transpose` for
    /// `[out, in]`), `narrow` of the bias, `matmul`, `add`.
    pub fn forward_outputs(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        if start.checked_add(len).is_none_or(|end| end > self.d_out) {
            bail!(
                "outputs {start}..{} of a linear layer with {} outputs",
                start.saturating_add(len),
                self.d_out
            );
        }
        let weight = match self.layout {
            WeightLayout::OutIn => self.weight.narrow(0, start, len)?.transpose(0, 1)?,
            WeightLayout::InOut => self.weight.narrow(1, start, len)?,
        };
        let bias = match &self.bias {
            Some(bias) => Some(bias.narrow(0, start, len)?),
            None => None,
        };
        let y = x.matmul(&weight)?;
        match bias {
            Some(bias) => y.add(&bias),
            None => Ok(y),
        }
    }

    /// The weight, in the layout the layer was declared with.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// How the weight is stored.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// Input features.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.d_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    const STD: Init = Init::Normal { std: 0.02 };

    #[test]
    fn conv1d_layout_stores_in_out_and_multiplies_directly() {
        let t = trace(|s| {
            let l = Linear::new(s, "mlp.c_fc", 4, 16, WeightLayout::InOut, STD)?;
            l.forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param mlp.c_fc.weight [4, 16] weight Normal { std: 0.02 }
             param mlp.c_fc.bias [16] bias Zeros
             matmul(x, mlp.c_fc.weight) -> %1
             add(%1, mlp.c_fc.bias) -> %2",
        );
    }

    #[test]
    fn torch_layout_stores_out_in_and_multiplies_by_the_transpose() {
        let t = trace(|s| {
            let l = Linear::no_bias(s, "self_attn.q_proj", 4, 8, WeightLayout::OutIn, STD)?;
            assert!(l.bias().is_none());
            l.forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param self_attn.q_proj.weight [8, 4] weight Normal { std: 0.02 }
             transpose(self_attn.q_proj.weight, 0, 1) -> %1
             matmul(x, %1) -> %2",
        );
    }

    #[test]
    fn torch_layout_with_bias_adds_it_after_the_product() {
        let t = trace(|s| {
            Linear::new(s, "dense", 3, 2, WeightLayout::OutIn, Init::Zeros)?
                .forward(&input("x"))?;
            Ok(())
        });
        check(
            &t,
            "param dense.weight [2, 3] weight Zeros
             param dense.bias [2] bias Zeros
             transpose(dense.weight, 0, 1) -> %1
             matmul(x, %1) -> %2
             add(%2, dense.bias) -> %3",
        );
    }

    #[test]
    fn output_slices_narrow_the_parameters_not_the_product() {
        let t = trace(|s| {
            let l = Linear::new(s, "c_attn", 4, 12, WeightLayout::InOut, STD)?;
            l.forward_outputs(&input("x"), 4, 4)?;
            let m = Linear::no_bias(s, "qkv", 4, 12, WeightLayout::OutIn, STD)?;
            m.forward_outputs(&input("x"), 8, 4)?;
            Ok(())
        });
        check(
            &t,
            "param c_attn.weight [4, 12] weight Normal { std: 0.02 }
             param c_attn.bias [12] bias Zeros
             narrow(c_attn.weight, 1, 4, 4) -> %1
             narrow(c_attn.bias, 0, 4, 4) -> %2
             matmul(x, %1) -> %3
             add(%3, %2) -> %4
             param qkv.weight [12, 4] weight Normal { std: 0.02 }
             narrow(qkv.weight, 0, 8, 4) -> %5
             transpose(%5, 0, 1) -> %6
             matmul(x, %6) -> %7",
        );
    }

    #[test]
    fn output_slices_past_the_end_are_refused() {
        let t = trace(|s| {
            let l = Linear::new(s, "c_attn", 4, 12, WeightLayout::InOut, STD)?;
            l.forward_outputs(&input("x"), 8, 5)?;
            Ok(())
        });
        check(
            &t,
            "param c_attn.weight [4, 12] weight Normal { std: 0.02 }
             param c_attn.bias [12] bias Zeros
             error: outputs 8..13 of a linear layer with 12 outputs",
        );
    }
}
