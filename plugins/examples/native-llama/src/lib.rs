//! A LLaMA-style causal language model as a native codex-ml plugin: the whole plugin is this
//! file, it depends on `codex-plugin-api` and the building blocks of `codex-nn` (plus serde
//! for its parameters) and it computes only through the host's tensor handles and op table, so
//! it trains, checkpoints, evaluates and generates on every device the host supports, exactly
//! like a built-in model.
//!
//! The architecture is Hugging Face `LlamaForCausalLM` without grouped-query attention:
//! pre-norm blocks with RMSNorm, rotary position embeddings (rotate-half convention) on queries
//! and keys, a SwiGLU MLP (`down(silu(gate(x)) · up(x))`), no biases anywhere, and an LM head
//! of its own (not tied to the embedding). Parameter names and layouts are HF's —
//! `model.embed_tokens.weight`, `model.layers.N.self_attn.{q,k,v,o}_proj.weight`,
//! `model.layers.N.mlp.{gate,up,down}_proj.weight`, `model.layers.N.{input,post_attention}_
//! layernorm.weight`, `model.norm.weight`, `lm_head.weight` — with linear weights stored
//! `[out, in]` as `torch.nn.Linear` stores them, so a checkpoint maps onto `transformers` with
//! no renaming or transposing. The parameters section uses `LlamaConfig`'s field names; the
//! defaults are HF's except the sizes, which default to a model small enough to try on a CPU.
//!
//! The rotary tables (cos and sin for every position up to `max_position_embeddings`) are
//! computed once, in f64, when the model is created and kept as host tensors
//! (`codex_nn::Rotary`); a forward pass narrows them to its sequence length. Attention is
//! composed from matmul, masked fill and softmax on contiguous heads. There is no dropout:
//! LLaMA trains without it.
//!
//! Rows the host packed with several examples (supervised fine-tuning with packing) are read
//! through `codex_nn::Positions`: each token's rotary tables are those of its position within
//! its example, and the mask hides the examples before it as well as the future, so every
//! example is computed as it would be alone.
//!
//! Generation goes through `forward_cached`, which runs the same layers on the new positions
//! only: their rotary tables start at the cache's position count (`Rotary::window_at`), and each
//! layer appends its rotated keys and its values to the cache and attends over all of them with
//! the host's `attention` op (`Heads::causal_cached`), whose causal mask is aligned to the last
//! key.
//!
//! Build it with `cargo build --release -p native-llama` and declare
//! `target/release/libnative_llama.so` in a plugin manifest (see `docs/plugins-native.md`); the
//! model is then `llama/llama` when the manifest names the plugin `llama`.

use codex_nn::WeightLayout::OutIn;
use codex_nn::{Embedding, Heads, Linear, Positions, RmsNorm, Rotary, RotaryWindow, SwiGlu};
use codex_plugin_api::{bail, Describe, ForwardCtx, Init, KvCache, Model, Result, Store, Tensor};
use serde::{Deserialize, Serialize};

codex_plugin_api::export_plugin! {
    name: "llama",
    version: env!("CARGO_PKG_VERSION"),
    components: [codex_plugin_api::model::declare::<Llama>],
}

/// `model.params` of a config using this model, as written (HF `LlamaConfig` names).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Width of the residual stream. Default 256.
    #[serde(default = "default_hidden_size")]
    hidden_size: usize,
    /// Width of the SwiGLU MLP's hidden layer. Default 688 (≈ 8/3 · hidden_size, as LLaMA).
    #[serde(default = "default_intermediate_size")]
    intermediate_size: usize,
    /// Number of decoder layers. Default 4.
    #[serde(default = "default_num_hidden_layers")]
    num_hidden_layers: usize,
    /// Attention heads; must divide `hidden_size` into an even head dimension. Default 4.
    #[serde(default = "default_num_attention_heads")]
    num_attention_heads: usize,
    /// Epsilon of every RMSNorm. Default 1e-6 (HF's).
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    /// Base of the rotary frequencies. Default 10000 (HF's).
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    /// Longest sequence the model accepts (rows of the rotary tables). Default 2048 (HF's).
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    /// Rows of the embedding and the LM head. Default: the tokenizer's vocabulary size; if
    /// given, at least that.
    #[serde(default)]
    vocab_size: Option<usize>,
    /// Standard deviation of the normal initialisation of every matrix. Default 0.02 (HF's).
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
}

fn default_hidden_size() -> usize {
    256
}
fn default_intermediate_size() -> usize {
    688
}
fn default_num_hidden_layers() -> usize {
    4
}
fn default_num_attention_heads() -> usize {
    4
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The configuration after defaults and validation; the only form the model uses.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    max_position_embeddings: usize,
    vocab_size: usize,
    initializer_range: f64,
}

impl Config {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parse `params` strictly (an empty string means every default) and validate it against
    /// the tokenizer's vocabulary size. Errors start with the field they blame.
    fn parse(params: &str, tokenizer_vocab: usize) -> Result<Config> {
        let raw: RawConfig = codex_plugin_api::strict::parse_params(params)?;
        raw.resolve(tokenizer_vocab)
    }
}

impl RawConfig {
    fn resolve(self, tokenizer_vocab: usize) -> Result<Config> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                bail!("{field}: must be at least 1, found 0");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size: must be divisible by num_attention_heads ({}), found {}; pick a \
                 multiple of num_attention_heads",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        if !head_dim.is_multiple_of(2) {
            bail!(
                "hidden_size: hidden_size / num_attention_heads = {head_dim} must be even, \
                 because rotary embeddings rotate pairs of dimensions; change either field"
            );
        }
        let vocab_size = match self.vocab_size {
            None => tokenizer_vocab,
            Some(v) if v < tokenizer_vocab => bail!(
                "vocab_size: must be at least the tokenizer's vocabulary size \
                 ({tokenizer_vocab}), found {v}; leave it out to use the tokenizer's"
            ),
            Some(v) => v,
        };
        if vocab_size == 0 {
            bail!(
                "vocab_size: must be at least 1, found 0 (the tokenizer has an empty vocabulary)"
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!(
                "rms_norm_eps: must be positive, found {}",
                self.rms_norm_eps
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            bail!(
                "rope_theta: must be greater than 1, found {}; LLaMA uses 10000",
                self.rope_theta
            );
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            bail!(
                "initializer_range: must be zero or positive, found {}",
                self.initializer_range
            );
        }
        Ok(Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            vocab_size,
            initializer_range: self.initializer_range,
        })
    }
}

/// What `config_json` writes: HF's `config.json` for `LlamaForCausalLM`.
#[derive(Serialize)]
struct HfConfig<'a> {
    model_type: &'a str,
    architectures: [&'a str; 1],
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    hidden_act: &'a str,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    initializer_range: f64,
    attention_bias: bool,
    mlp_bias: bool,
    tie_word_embeddings: bool,
    use_cache: bool,
}

struct Layer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGlu,
}

/// A LLaMA-style decoder with Hugging Face's parameter names (registry name `llama`).
pub struct Llama {
    config: Config,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Cos and sin tables for `max_position_embeddings` positions.
    rotary: Rotary,
}

impl Describe for Llama {
    const NAME: &'static str = "llama";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "LLaMA-style decoder: RMSNorm, rotary positions, SwiGLU, untied LM head, HF names";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<RawConfig>(params).map(drop)
    }
}

/// How a forward call attends.
enum Attend<'a> {
    /// Over this call's positions, the keys each query must not see masked out by this mask
    /// (`Positions::causal_mask`: the future, and in packed rows the examples before).
    Masked(&'a Tensor),
    /// Positions `cache.len()..cache.len() + t`, over the cached keys and values too.
    Cached(&'a mut KvCache),
}

impl Llama {
    /// Causal self-attention of layer `index` on the normalised stream `h` (`[b·t, c]`), with
    /// the call's rotary tables.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        index: usize,
        layer: &Layer,
        h: &Tensor,
        rotary: &RotaryWindow,
        attend: &mut Attend<'_>,
        b: usize,
        t: usize,
    ) -> Result<Tensor> {
        let heads = Heads {
            batch: b,
            positions: t,
            heads: self.config.num_attention_heads,
            head_dim: self.config.head_dim(),
        };
        // `[b·t, c]` → `[b, heads, t, d]`, contiguous: the layout rotary and the batched
        // products expect.
        let q = rotary.apply(&heads.split_contiguous(&layer.q_proj.forward(h)?)?)?;
        let k = rotary.apply(&heads.split_contiguous(&layer.k_proj.forward(h)?)?)?;
        let v = heads.split_contiguous(&layer.v_proj.forward(h)?)?;
        let y = match attend {
            Attend::Masked(mask) => heads.causal_probs(&q, &k, mask)?.matmul(&v)?,
            Attend::Cached(cache) => heads.causal_cached(&q, &k, &v, cache, index)?,
        };
        layer.o_proj.forward(&heads.merge(&y)?)
    }

    /// Logits `[b, t, vocab]` of the positions in `input`: the first `t` of a sequence, or
    /// the `t` after those a cache holds.
    fn run(&self, input: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let shape = input.shape()?;
        let &[b, t] = shape.as_slice() else {
            bail!("input must be token ids of shape [batch, time], found shape {shape:?}");
        };
        if t == 0 || b == 0 {
            bail!("input must hold at least one token, found shape [{b}, {t}]");
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start.saturating_add(t) > self.config.max_position_embeddings {
            bail!(
                "input has {} positions but the model takes at most max_position_embeddings = \
                 {}; shorten the sequences or raise max_position_embeddings",
                start.saturating_add(t),
                self.config.max_position_embeddings
            );
        }
        let c = self.config.hidden_size;
        let mut x = self.embed_tokens.forward(input)?.reshape(&[b * t, c])?;
        // Positions start..start + t, or in rows the host packed with several examples, each
        // token's position within its own.
        let positions = Positions::of(input, start, t)?;
        let rotary = self.rotary.window_for(&positions)?;
        let mask;
        let mut attend = match cache {
            Some(cache) => Attend::Cached(cache),
            None => {
                mask = positions.causal_mask(&x)?;
                Attend::Masked(&mask)
            }
        };
        for (index, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            x = x.add(&self.attention(index, layer, &h, &rotary, &mut attend, b, t)?)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = x.add(&layer.mlp.forward(&h)?)?;
        }
        let x = self.norm.forward(&x)?;
        self.lm_head
            .forward(&x)?
            .reshape(&[b, t, self.config.vocab_size])
    }
}

impl Model for Llama {
    fn create(params: &str, vocab_size: usize, store: &mut Store<'_, '_>) -> Result<Self> {
        let config = Config::parse(params, vocab_size)?;
        let std = config.initializer_range;
        let (c, ff) = (config.hidden_size, config.intermediate_size);

        let mut m = store.pp("model");
        let init = Init::Normal { std };
        let eps = config.rms_norm_eps;
        let embed_tokens = Embedding::new(&mut m, "embed_tokens", config.vocab_size, c, init)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut s = m.pp(&format!("layers.{i}"));
            let input_layernorm = RmsNorm::new(&mut s, "input_layernorm", c, eps)?;
            let q_proj = Linear::no_bias(&mut s, "self_attn.q_proj", c, c, OutIn, init)?;
            let k_proj = Linear::no_bias(&mut s, "self_attn.k_proj", c, c, OutIn, init)?;
            let v_proj = Linear::no_bias(&mut s, "self_attn.v_proj", c, c, OutIn, init)?;
            let o_proj = Linear::no_bias(&mut s, "self_attn.o_proj", c, c, OutIn, init)?;
            let post_attention_layernorm =
                RmsNorm::new(&mut s, "post_attention_layernorm", c, eps)?;
            let mlp = SwiGlu::llama(&mut s, "mlp", c, ff, init)?;
            layers.push(Layer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                mlp,
            });
        }
        let norm = RmsNorm::new(&mut m, "norm", c, eps)?;
        let lm_head = Linear::no_bias(store, "lm_head", c, config.vocab_size, OutIn, init)?;

        // Constants on the parameters' device; f32 whatever the parameters' dtype (rotary
        // casts them to the activations').
        let rotary = Rotary::new(
            config.max_position_embeddings,
            config.head_dim(),
            config.rope_theta,
            embed_tokens.weight(),
        )?;
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
        })
    }

    fn forward(&self, input: &Tensor, _ctx: ForwardCtx) -> Result<Tensor> {
        self.run(input, None)
    }

    fn forward_cached(&self, input: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(input, Some(cache))
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn max_positions_param(&self) -> Option<&str> {
        Some("max_position_embeddings")
    }

    fn config_json(&self) -> String {
        let c = &self.config;
        let hf = HfConfig {
            model_type: "llama",
            architectures: ["LlamaForCausalLM"],
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            hidden_act: "silu",
            max_position_embeddings: c.max_position_embeddings,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            initializer_range: c.initializer_range,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            use_cache: true,
        };
        // Plain numbers, strings and booleans: serialisation cannot fail.
        serde_json::to_string_pretty(&hf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json, 100).expect_err(json).to_string()
    }

    #[test]
    fn defaults_are_hf_apart_from_the_sizes() {
        let c = Config::parse("", 100).expect("empty params");
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (256, 688, 4)
        );
        assert_eq!(
            (c.num_attention_heads, c.max_position_embeddings),
            (4, 2048)
        );
        assert_eq!(c.vocab_size, 100);
        assert!((c.rms_norm_eps - 1e-6).abs() < 1e-18);
        assert!((c.rope_theta - 10_000.0).abs() < 1e-9);
        assert!((c.initializer_range - 0.02).abs() < 1e-15);
    }

    #[test]
    fn bad_params_name_their_field() {
        assert!(err(r#"{"hidden_sise": 64}"#).contains("unknown field `hidden_sise`"));
        assert!(err(r#"{"hidden_size": "wide"}"#).starts_with("hidden_size: invalid type"));
        assert!(
            err(r#"{"num_hidden_layers": 0}"#).starts_with("num_hidden_layers: must be at least 1")
        );
        assert!(err(r#"{"hidden_size": 30, "num_attention_heads": 4}"#)
            .starts_with("hidden_size: must be divisible by num_attention_heads (4)"));
        assert!(err(r#"{"hidden_size": 12, "num_attention_heads": 4}"#).contains("must be even"));
        assert!(err(r#"{"vocab_size": 99}"#).starts_with("vocab_size: must be at least"));
        assert!(err(r#"{"rms_norm_eps": 0.0}"#).starts_with("rms_norm_eps"));
        assert!(err(r#"{"rope_theta": -1.0}"#).starts_with("rope_theta"));
        assert!(err(r#"{"initializer_range": -0.1}"#).starts_with("initializer_range"));
        assert!(err(r#"{} x"#).starts_with("trailing characters"));
    }
}
