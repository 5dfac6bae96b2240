//! The built-in `cpu` kernel: fused, multi-threaded CPU implementations of the ops that
//! dominate training a GPT, forward and backward, on raw contiguous host buffers.
//!
//! Composed from tensor primitives, softmax, layer norm, GELU and cross-entropy each
//! allocate and traverse several intermediates, and sums over leading dimensions take a
//! single-threaded path; here each op is one or two passes over its rows, parallel across
//! rows (or attention heads) with rayon, with inner loops that vectorise
//! (`simd` compiles them for AVX-512, AVX2 and the baseline and picks one at run time).
//!
//! # Buffers
//!
//! Every buffer is contiguous, row-major, native-endian, with the byte length its shape and
//! dtype imply. *float* means f32 or bf16 (converted to f32, computed in f32, rounded back
//! to nearest-even); statistics (`mean`, `rstd`, `lse`), losses and optimizer state are
//! always f32. `[.., c]` means any rank ≥ 1, the leading dimensions flattened into rows;
//! `[..]` for a statistic means the input's leading dimensions (e.g. `x: [B, T, C]` →
//! `mean: [B, T]`). Calls with a wrong count, dtype, shape, byte length or attribute are
//! refused with a message naming the op and the buffer.
//!
//! # Ops
//!
//! | op | inputs | attrs | outputs |
//! |---|---|---|---|
//! | `softmax_last_dim.fwd` | x: float `[.., n]` | — | y: float like x |
//! | `softmax_last_dim.bwd` | y, dy: float `[.., n]` | — | dx: float like y |
//! | `causal_attention.fwd` | q: float `[.., t, d]` (e.g. `[b, h, t, d]`); k, v: float `[.., s, d]`, s ≥ t | scale | out: float like q; lse: f32 `[.., t]` |
//! | `causal_attention.bwd` | q, out: float `[.., t, d]`; k, v: float `[.., s, d]`; lse: f32 `[.., t]`; dout: float like q | scale | dq: float like q; dk, dv: float like k |
//! | `packed_attention.fwd` | q, k, v as `causal_attention.fwd`; starts: u32 `[r, t]`, r dividing the heads | scale | out: float like q; lse: f32 `[.., t]` |
//! | `packed_attention.bwd` | q, k, v, out, lse, dout as `causal_attention.bwd`; starts: u32 `[r, t]` | scale | dq: float like q; dk, dv: float like k |
//! | `layer_norm.fwd` | x: float `[.., c]`; w, b: float `[c]` | eps | y: float like x; mean, rstd: f32 `[..]` |
//! | `layer_norm.bwd` | dy, x: float `[.., c]`; w: float `[c]`; mean, rstd: f32 `[..]` | — | dx: float like x; dw, db: float `[c]` |
//! | `rms_norm.fwd` | x: float `[.., c]`; w: float `[c]` | eps | y: float like x; rstd: f32 `[..]` |
//! | `rms_norm.bwd` | dy, x: float `[.., c]`; w: float `[c]`; rstd: f32 `[..]` | — | dx: float like x; dw: float `[c]` |
//! | `gelu_erf.fwd`, `gelu_tanh.fwd` | x: float, any shape | — | y: float like x |
//! | `gelu_erf.bwd`, `gelu_tanh.bwd` | x, dy: float, same shape | — | dx: float like x |
//! | `cross_entropy.fwd` | logits: float `[.., v]`; targets: u32 `[..]` | ignore_index | loss_sum, tokens, correct: f32 `[1]` (or `[]`); lse: f32 `[..]` |
//! | `cross_entropy.bwd` | logits: float `[.., v]`; targets: u32 `[..]`; lse: f32 `[..]` | ignore_index, grad_scale | dlogits: float like logits |
//! | `sum_rows` | x: float `[.., s..]` | — | y: float `[s..]`, any trailing dims of x |
//! | `adamw.step` | grad: float | lr, beta1, beta2, eps, weight_decay, step | param, m, v: f32 like grad, updated in place |
//! | `bf16_gemm.pack` | b: f32 `[k, n]` (`[n, k]` if transposed) | transposed (0 or 1) | packed: bf16 `[ceil(n/32)·32 · ceil(k/2)·2]` |
//! | `bf16_gemm` | a: f32 `[m, k]` (`[k, m]` if a_transposed); packed: bf16 from `bf16_gemm.pack` | a_transposed (0 or 1), n | c: f32 `[m, n]` |
//! | `f16_gemm.pack` | b: f32 `[k, n]` (`[n, k]` if transposed) | transposed (0 or 1) | packed: f16 `[ceil(n/32)·32 · k]` |
//! | `f16_gemm` | a: f32 `[m, k]` (`[k, m]` if a_transposed); packed: f16 from `f16_gemm.pack` | a_transposed (0 or 1), n | c: f32 `[m, n]` |
//!
//! Semantics:
//! - `causal_attention`: `out_i = Σ_{j≤s−t+i} softmax_j(scale·q_i·k_j) v_j`, the mask aligned
//!   to the last key (with `s = t` the usual `j ≤ i`; with fewer queries than keys, the queries
//!   are the last `t` positions, as when new tokens attend over a key/value cache); `lse_i` is
//!   the natural log-sum-exp of row i's scaled scores, saved for the backward pass.
//! - `packed_attention`: causal attention confined to each of several examples packed into
//!   one row, `out_i = Σ_{starts_i≤j≤s−t+i} softmax_j(scale·q_i·k_j) v_j`, where `starts_i`
//!   is the first key query i may see (the position of its example's first token). The heads
//!   are the `H` slices of q's leading dimensions, in row-major order; head `g` takes its
//!   starts from row `g / (H / r)` — for q `[b, h, t, d]` and starts `[b, t]`, its batch
//!   row. A start after the query's own key `s − t + i` is refused (naming the row and
//!   position), so every query sees at least itself. With every start 0 the results are
//!   `causal_attention`'s, bit for bit. Keys before the smallest start of a block of queries
//!   are never read, so the shorter the examples, the less work a row takes.
//! - `layer_norm`: `y = (x − mean)·rstd·w + b` with the biased variance,
//!   `rstd = 1/√(var + eps)`. `rms_norm`: `y = x·rstd·w`, `rstd = 1/√(mean(x²) + eps)`.
//! - `gelu_erf`: `x·Φ(x)`; `gelu_tanh`: `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
//! - `cross_entropy.fwd`: rows whose target equals `ignore_index` are not counted;
//!   `loss_sum = Σ (lse_i − logit_{i,target_i})`, `tokens` the counted rows, `correct` the
//!   counted rows whose first arg-max is the target. Other targets must be `< v`.
//!   `cross_entropy.bwd`: `dlogits = grad_scale·(softmax − onehot)` on counted rows, 0 on
//!   ignored rows.
//! - `sum_rows`: sums over the leading dimensions of x that y does not have
//!   (`[B, T, C] → [C]` for a bias gradient, `[B, T, C] → [T, C]` for position embeddings).
//! - `adamw.step`: `torch.optim.AdamW` — `p ← p·(1 − lr·wd)`; `m ← β₁m + (1−β₁)g`;
//!   `v ← β₂v + (1−β₂)g²`; `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps)`, with `t = step ≥ 1`.
//! - `bf16_gemm`: `c = a · b` with both operands rounded to bf16 (nearest even) and products
//!   summed in f32; `b` is packed once by `bf16_gemm.pack` and may be reused for as long as
//!   its values do not change (the layout is documented in `gemm.rs`). Offered only where
//!   the CPU has AVX512-BF16 and `simd` is `"auto"`: elsewhere the op list leaves both out
//!   and the host multiplies in f32.
//! - `f16_gemm`: the same with both operands rounded to IEEE half (nearest even; beyond
//!   ±65504 they become ±inf, which a loss scaler detects). Offered on every CPU: the AVX-512
//!   and AVX2 (F16C) paths widen the packed values with `vcvtph2ps`, the portable one in
//!   scalar code, and all three give the same bits (each product is exact in f32).
//!
//! Reductions across rows (`dw`, `db`, `sum_rows`, the loss sums) are bit-identical for any
//! thread count. Results depend on the instruction set chosen (FMA changes rounding); set
//! `"simd": "portable"` for identical results on every x86-64.
//!
//! # Parameters
//!
//! JSON, every field optional: `{"threads": 2, "simd": "auto"}`. `threads` runs the ops on a
//! dedicated pool of that many threads instead of rayon's global pool; `simd` is `"auto"`
//! (the best the CPU has) or `"portable"`.

#![warn(missing_docs, unreachable_pub)]

mod adamw;
mod attention;
mod buffer;
mod cross_entropy;
mod error;
mod gelu;
mod gemm;
mod norm;
mod par;
mod reduce;
mod simd;
mod softmax;

#[cfg(test)]
mod tests;

use codex_plugin_api::{BufferMut, BufferView, Describe, DeviceKind, Kernel};
use serde::Deserialize;

pub use error::KernelError;

/// Every op the kernel implements, in the order of the crate-level table.
pub const OPS: &[&str] = &[
    "softmax_last_dim.fwd",
    "softmax_last_dim.bwd",
    "causal_attention.fwd",
    "causal_attention.bwd",
    "packed_attention.fwd",
    "packed_attention.bwd",
    "layer_norm.fwd",
    "layer_norm.bwd",
    "rms_norm.fwd",
    "rms_norm.bwd",
    "gelu_erf.fwd",
    "gelu_erf.bwd",
    "gelu_tanh.fwd",
    "gelu_tanh.bwd",
    "cross_entropy.fwd",
    "cross_entropy.bwd",
    "sum_rows",
    "adamw.step",
];

/// The bf16 matrix-product ops, offered only where the CPU can run them.
pub const BF16_OPS: &[&str] = &["bf16_gemm.pack", "bf16_gemm"];

/// The f16 matrix-product ops, offered on every CPU (see [`CpuKernel::f16_path`]).
pub const F16_OPS: &[&str] = &["f16_gemm.pack", "f16_gemm"];

/// What every op needs besides its buffers.
pub(crate) struct Ctx {
    level: simd::Level,
}

/// The kernel's parameters as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Size of a dedicated thread pool; default: rayon's global pool.
    threads: Option<usize>,
    /// `"auto"` (default) or `"portable"`.
    simd: Option<String>,
}

/// The `cpu` kernel.
pub struct CpuKernel {
    ctx: Ctx,
    pool: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKernel")
            .field("isa", &self.ctx.level.isa())
            .field(
                "threads",
                &self.pool.as_ref().map(|p| p.current_num_threads()),
            )
            .finish()
    }
}

impl CpuKernel {
    /// Build from JSON parameters (an empty string means the defaults).
    pub fn new(params: &str) -> Result<CpuKernel, KernelError> {
        let p: Params = if params.trim().is_empty() {
            Params::default()
        } else {
            serde_json::from_str(params).map_err(|e| KernelError::Params(e.to_string()))?
        };
        let level = match p.simd.as_deref() {
            None | Some("auto") => simd::Level::detect(),
            Some("portable") => simd::Level::portable(),
            Some(other) => {
                return Err(KernelError::Params(format!(
                    "`simd` is \"{other}\", expected \"auto\" or \"portable\""
                )))
            }
        };
        let pool = match p.threads {
            None => None,
            Some(0) => {
                return Err(KernelError::Params(
                    "`threads` is 0, expected at least 1".into(),
                ))
            }
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("codex-cpu-kernel-{i}"))
                    .build()
                    .map_err(|e| KernelError::Pool {
                        threads: n,
                        reason: e.to_string(),
                    })?,
            ),
        };
        Ok(CpuKernel {
            ctx: Ctx { level },
            pool,
        })
    }

    /// Run `op` (see the crate-level table).
    pub fn call(
        &self,
        op: &str,
        inputs: &[BufferView<'_>],
        attrs: &[f64],
        outputs: &mut [BufferMut<'_>],
    ) -> Result<(), KernelError> {
        match &self.pool {
            Some(pool) => pool.install(|| self.dispatch(op, inputs, attrs, outputs)),
            None => self.dispatch(op, inputs, attrs, outputs),
        }
    }

    /// Whether the bf16 products are offered: the CPU has AVX512-BF16 and `simd` is not
    /// `"portable"`.
    pub fn bf16(&self) -> bool {
        self.ctx.level.isa() != simd::Isa::Portable && gemm::supported()
    }

    /// How the f16 products run: `"avx512"` (`vcvtph2ps` on 16 lanes), `"avx2+f16c"` (on 8)
    /// or `"portable"` (scalar conversion), from the CPU and `simd`. The three give the same
    /// results.
    pub fn f16_path(&self) -> &'static str {
        gemm::F16Path::for_level(self.ctx.level).name()
    }

    /// The ops this kernel offers on this CPU.
    pub fn ops(&self) -> Vec<&'static str> {
        let extra = if self.bf16() { BF16_OPS } else { &[] };
        OPS.iter().chain(extra).chain(F16_OPS).copied().collect()
    }

    fn dispatch(
        &self,
        op: &str,
        ins: &[BufferView<'_>],
        attrs: &[f64],
        outs: &mut [BufferMut<'_>],
    ) -> Result<(), KernelError> {
        use attention::Mask;
        let ctx = &self.ctx;
        match op {
            "softmax_last_dim.fwd" => softmax::fwd(ctx, ins, attrs, outs),
            "softmax_last_dim.bwd" => softmax::bwd(ctx, ins, attrs, outs),
            "causal_attention.fwd" => attention::fwd(Mask::Causal, ctx, ins, attrs, outs),
            "causal_attention.bwd" => attention::bwd(Mask::Causal, ctx, ins, attrs, outs),
            "packed_attention.fwd" => attention::fwd(Mask::Packed, ctx, ins, attrs, outs),
            "packed_attention.bwd" => attention::bwd(Mask::Packed, ctx, ins, attrs, outs),
            "layer_norm.fwd" => norm::layer_norm_fwd(ctx, ins, attrs, outs),
            "layer_norm.bwd" => norm::layer_norm_bwd(ctx, ins, attrs, outs),
            "rms_norm.fwd" => norm::rms_norm_fwd(ctx, ins, attrs, outs),
            "rms_norm.bwd" => norm::rms_norm_bwd(ctx, ins, attrs, outs),
            "gelu_erf.fwd" => gelu::fwd(gelu::Form::Erf, ctx, ins, attrs, outs),
            "gelu_erf.bwd" => gelu::bwd(gelu::Form::Erf, ctx, ins, attrs, outs),
            "gelu_tanh.fwd" => gelu::fwd(gelu::Form::Tanh, ctx, ins, attrs, outs),
            "gelu_tanh.bwd" => gelu::bwd(gelu::Form::Tanh, ctx, ins, attrs, outs),
            "cross_entropy.fwd" => cross_entropy::fwd(ctx, ins, attrs, outs),
            "cross_entropy.bwd" => cross_entropy::bwd(ctx, ins, attrs, outs),
            "sum_rows" => reduce::sum_rows(ctx, ins, attrs, outs),
            "adamw.step" => adamw::step(ctx, ins, attrs, outs),
            "bf16_gemm.pack" if self.bf16() => gemm::pack(gemm::Half::Bf16, ins, attrs, outs),
            "bf16_gemm" if self.bf16() => {
                let path = gemm::F16Path::Portable;
                gemm::gemm(gemm::Half::Bf16, path, ins, attrs, outs)
            }
            "f16_gemm.pack" => gemm::pack(gemm::Half::F16, ins, attrs, outs),
            "f16_gemm" => {
                let path = gemm::F16Path::for_level(ctx.level);
                gemm::gemm(gemm::Half::F16, path, ins, attrs, outs)
            }
            _ => Err(KernelError::UnknownOp {
                op: op.to_string(),
                known: self.ops().join(", "),
            }),
        }
    }
}

impl Describe for CpuKernel {
    const NAME: &'static str = "cpu";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "fused multi-threaded CPU ops: attention, softmax, norms, GELU, cross-entropy, AdamW, bf16 and f16 matmul";
}

impl Kernel for CpuKernel {
    fn create(params: &str) -> codex_plugin_api::Result<Self> {
        Ok(CpuKernel::new(params)?)
    }

    fn device(&self) -> DeviceKind {
        DeviceKind::Cpu
    }

    fn ops(&self) -> Vec<String> {
        CpuKernel::ops(self).iter().map(|s| s.to_string()).collect()
    }

    fn run(
        &self,
        op: &str,
        inputs: &[BufferView<'_>],
        attrs: &[f64],
        outputs: &mut [BufferMut<'_>],
    ) -> codex_plugin_api::Result<()> {
        Ok(self.call(op, inputs, attrs, outputs)?)
    }
}

codex_plugin_api::builtin!(codex_plugin_api::kernel::declare::<CpuKernel>);
