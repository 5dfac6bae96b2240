//! The LLaMA family — LLaMA 2 and 3, Mistral, Qwen2/2.5, SmolLM, TinyLlama, CodeLlama,
//! DeepSeek-Coder — written only against the plugin API's tensor handles, with the semantics of
//! Hugging Face's `LlamaForCausalLM` (and `MistralForCausalLM`, `Qwen2ForCausalLM`, which differ
//! from it only in the settings below).
//!
//! Pre-norm decoder blocks: RMSNorm, attention with rotary positions (rotate-half convention) on
//! queries and keys, RMSNorm, a SiLU-gated MLP (`down(silu(gate(x)) · up(x))`). Grouped-query
//! attention shares each of `num_key_value_heads` key/value heads between
//! `num_attention_heads / num_key_value_heads` query heads; `head_dim` may differ from
//! `hidden_size / num_attention_heads`. `attention_bias` puts biases on q, k, v and o (LLaMA);
//! Qwen2 always has them on q, k and v and never on o; `mlp_bias` on the three MLP projections.
//! `rope_scaling` of kind `linear` or `llama3` stretches the rotary frequencies; other kinds
//! are refused by name. The LM head is tied to the token embedding when
//! `tie_word_embeddings` is true (no `lm_head.weight` then, as transformers saves it).
//!
//! Mistral's and Qwen2's sliding-window attention is not implemented: attention is always full
//! and causal, which is the same thing for sequences no longer than the window, so a model with
//! `sliding_window` set accepts at most that many positions.
//!
//! Parameter names and layouts are HF's — `model.embed_tokens.weight`,
//! `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}`,
//! `model.layers.N.mlp.{gate,up,down}_proj.weight`,
//! `model.layers.N.{input,post_attention}_layernorm.weight`, `model.norm.weight`,
//! `lm_head.weight` — with linear weights `[out, in]` as `torch.nn.Linear` stores them, so
//! weights move to and from `transformers` with no renaming or transposing. The parameters
//! section uses the field names of the model's HF config (`LlamaConfig`, `MistralConfig`,
//! `Qwen2Config`); `model_type` picks the variant. Defaults are HF's `LlamaConfig`'s except the
//! sizes, which default to a model small enough to try on a CPU.
//!
//! Generation goes through `forward_cached`: the new positions' rotary tables start at the
//! cache's position count, each layer appends its rotated keys and its values (one per
//! key/value head, not repeated) to the cache and attends over all of them.

use codex_nn::WeightLayout::OutIn;
use codex_nn::{
    Embedding, Heads, Linear, Positions, RmsNorm, RopeScaling, Rotary, RotaryWindow, SwiGlu,
};
use codex_plugin_api::strict::{invalid, parse_params as parse_strict};
use codex_plugin_api::{bail, Describe, ForwardCtx, Init, KvCache, Model, Result, Store, Tensor};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The HF architectures this model implements, by their `model_type`.
#[derive(Deserialize, Copy, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Variant {
    /// `LlamaForCausalLM`.
    #[default]
    Llama,
    /// `MistralForCausalLM`: LLaMA with a sliding window.
    Mistral,
    /// `Qwen2ForCausalLM`: LLaMA with biases on q, k and v.
    Qwen2,
}

impl Variant {
    fn model_type(self) -> &'static str {
        match self {
            Variant::Llama => "llama",
            Variant::Mistral => "mistral",
            Variant::Qwen2 => "qwen2",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            Variant::Llama => "LlamaForCausalLM",
            Variant::Mistral => "MistralForCausalLM",
            Variant::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// The `model.params` of an experiment using `llama`, as written (HF config names).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Which HF architecture: `llama`, `mistral` or `qwen2`. Default `llama`.
    #[serde(default)]
    model_type: Variant,
    /// Rows of the embedding and the LM head. Default: the tokenizer's vocabulary size; if
    /// given, at least that.
    #[serde(default)]
    vocab_size: Option<usize>,
    /// Width of the residual stream. Default 256.
    #[serde(default = "default_hidden_size")]
    hidden_size: usize,
    /// Width of the MLP's hidden layer. Default 688 (≈ 8/3 · hidden_size, as LLaMA).
    #[serde(default = "default_intermediate_size")]
    intermediate_size: usize,
    /// Number of decoder layers. Default 4.
    #[serde(default = "default_num_hidden_layers")]
    num_hidden_layers: usize,
    /// Query heads. Default 4.
    #[serde(default = "default_num_attention_heads")]
    num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); must divide `num_attention_heads`. Default:
    /// `num_attention_heads`.
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    /// Dimensions per head (even). Default: `hidden_size / num_attention_heads`.
    #[serde(default)]
    head_dim: Option<usize>,
    /// The MLP's activation; only `silu` exists here. Default `silu`.
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    /// Longest sequence the model accepts (rows of the rotary tables). Default 2048.
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    /// Epsilon of every RMSNorm. Default 1e-6.
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    /// Base of the rotary frequencies. Default 10000.
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    /// `{rope_type: "linear" | "llama3", factor, ...}` as in HF configs, or null. Default null.
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// Newer transformers' form of `rope_theta` and `rope_scaling` together. Default absent.
    #[serde(default)]
    rope_parameters: Option<Value>,
    /// Biases on q, k, v and o (LLaMA). Default false.
    #[serde(default)]
    attention_bias: bool,
    /// Biases on the MLP's projections. Default false.
    #[serde(default)]
    mlp_bias: bool,
    /// Share the embedding with the LM head. Default false.
    #[serde(default)]
    tie_word_embeddings: bool,
    /// Standard deviation of the normal initialisation of every matrix. Default 0.02.
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    /// Dropout on attention probabilities; only 0 is implemented. Default 0.
    #[serde(default)]
    attention_dropout: f64,
    /// Tensor-parallel slicing of the pretraining run; the same numbers whatever its value.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted from HF configs; nothing to read")]
    pretraining_tp: Option<IgnoredAny>,
    /// Mistral/Qwen2 sliding window: sequences are limited to it. Default none.
    #[serde(default)]
    sliding_window: Option<usize>,
    /// Qwen2: whether the sliding window is used at all. Default false.
    #[serde(default)]
    use_sliding_window: bool,
    /// Qwen2 in newer transformers: `full_attention` or `sliding_attention` per layer;
    /// the window is used when any layer says `sliding_attention`. Default none.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    /// Qwen2: layers from which the sliding window applies. Default none.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted from HF configs; nothing to read")]
    max_window_layers: Option<IgnoredAny>,
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
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The configuration after defaults and validation; the only form the model uses.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    variant: Variant,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: Option<RopeScaling>,
    /// As written, for `config_json`.
    rope_scaling_json: Option<Value>,
    attention_bias: bool,
    mlp_bias: bool,
    tie_word_embeddings: bool,
    initializer_range: f64,
    sliding_window: Option<usize>,
}

impl Config {
    /// The longest sequence: the rotary tables' length, or the sliding window if shorter
    /// (full attention equals windowed attention only up to the window).
    fn max_positions(&self) -> usize {
        match self.sliding_window {
            Some(w) => w.min(self.max_position_embeddings),
            None => self.max_position_embeddings,
        }
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.variant == Variant::Qwen2
    }

    fn o_bias(&self) -> bool {
        self.attention_bias && self.variant != Variant::Qwen2
    }
}

/// `rope_scaling` (or the scaling part of `rope_parameters`, named by `field`) as written.
fn parse_rope_scaling(field: &str, value: &Value) -> Result<Option<RopeScaling>> {
    let Value::Object(map) = value else {
        if value.is_null() {
            return Ok(None);
        }
        return Err(invalid(
            field,
            format!("must be an object or null, found {value}"),
        ));
    };
    let kind = map
        .get("rope_type")
        .or_else(|| map.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                field,
                "has no `rope_type`; write `rope_type: \"linear\"` or \"llama3\"",
            )
        })?;
    let number = |name: &str, default: Option<f64>| -> Result<f64> {
        match map.get(name) {
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(invalid(
                    &format!("{field}.{name}"),
                    format!("must be a positive number, found {v}"),
                )),
            },
            None => default.ok_or_else(|| {
                invalid(&format!("{field}.{name}"), "is missing; rope_type needs it")
            }),
        }
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: number("factor", None)?,
        })),
        "llama3" => {
            let scaling = RopeScaling::Llama3 {
                factor: number("factor", None)?,
                low_freq_factor: number("low_freq_factor", None)?,
                high_freq_factor: number("high_freq_factor", None)?,
                original_max_position_embeddings: number("original_max_position_embeddings", None)?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = scaling
            {
                if high_freq_factor <= low_freq_factor {
                    return Err(invalid(
                        &format!("{field}.high_freq_factor"),
                        format!(
                            "must be greater than low_freq_factor ({low_freq_factor}), found \
                             {high_freq_factor}"
                        ),
                    ));
                }
            }
            Ok(Some(scaling))
        }
        other => Err(invalid(
            &format!("{field}.rope_type"),
            format!(
                "`{other}` is not supported; codex-ml implements \"default\", \"linear\" and \
                 \"llama3\""
            ),
        )),
    }
}

impl RawConfig {
    /// Every check that does not need the tokenizer; returns the rotary settings.
    fn check(&self) -> Result<(f64, Option<RopeScaling>)> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, found 0"));
            }
        }
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads ({}), found {kv}",
                    self.num_attention_heads
                ),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => {
                if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
                    return Err(invalid(
                        "hidden_size",
                        format!(
                            "must be divisible by num_attention_heads ({}), found {}; pick a \
                             multiple or give head_dim",
                            self.num_attention_heads, self.hidden_size
                        ),
                    ));
                }
                self.hidden_size / self.num_attention_heads
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!(
                    "must be even and positive, because rotary embeddings rotate pairs of \
                     dimensions, found {head_dim}"
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!(
                    "only \"silu\" is implemented, found \"{}\"",
                    self.hidden_act
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be positive, found {}", self.rms_norm_eps),
            ));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(invalid(
                "initializer_range",
                format!("must be zero or positive, found {}", self.initializer_range),
            ));
        }
        if self.attention_dropout != 0.0 {
            return Err(invalid(
                "attention_dropout",
                format!(
                    "only 0 is implemented, found {}; remove it or set it to 0",
                    self.attention_dropout
                ),
            ));
        }
        if self.vocab_size == Some(0) {
            return Err(invalid("vocab_size", "must be at least 1, found 0"));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(invalid(
                    "layer_types",
                    format!(
                        "must name one type per layer ({}), found {}",
                        self.num_hidden_layers,
                        types.len()
                    ),
                ));
            }
            if let Some(t) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                return Err(invalid(
                    "layer_types",
                    format!("`{t}` is not supported; use full_attention or sliding_attention"),
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return Err(invalid("sliding_window", "must be at least 1, found 0"));
        }
        let mut theta = self.rope_theta;
        let mut scaling = match &self.rope_scaling {
            Some(v) => parse_rope_scaling("rope_scaling", v)?,
            None => None,
        };
        if let Some(params) = &self.rope_parameters {
            if let Some(t) = params.get("rope_theta") {
                theta = t.as_f64().ok_or_else(|| {
                    invalid(
                        "rope_parameters.rope_theta",
                        format!("must be a number, found {t}"),
                    )
                })?;
            }
            if scaling.is_none() {
                scaling = parse_rope_scaling("rope_parameters", params)?;
            }
        }
        if !(theta.is_finite() && theta > 1.0) {
            return Err(invalid(
                "rope_theta",
                format!("must be greater than 1, found {theta}; LLaMA uses 10000"),
            ));
        }
        Ok((theta, scaling))
    }

    fn resolve(self, tokenizer_vocab: usize) -> Result<Config> {
        let (rope_theta, rope_scaling) = self.check()?;
        let vocab_size = crate::vocab_size(self.vocab_size, tokenizer_vocab)?;
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        // Qwen2 keeps a window in its config that it does not use unless told to.
        let sliding_layers = self
            .layer_types
            .as_ref()
            .is_some_and(|t| t.iter().any(|l| l == "sliding_attention"));
        let sliding_window = match self.model_type {
            Variant::Qwen2 if !self.use_sliding_window && !sliding_layers => None,
            _ => self.sliding_window,
        };
        Ok(Config {
            variant: self.model_type,
            vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_scaling_json: self.rope_scaling.filter(|v| !v.is_null()),
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            tie_word_embeddings: self.tie_word_embeddings,
            initializer_range: self.initializer_range,
            sliding_window,
        })
    }
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

/// The LLaMA family with Hugging Face's parameter names (registry name `llama`).
pub struct Llama {
    config: Config,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    rotary: Rotary,
}

impl Describe for Llama {
    const NAME: &'static str = "llama";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "LLaMA-family decoder (LLaMA, Mistral, Qwen2): GQA, RoPE scaling, HF names and layouts";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        parse_strict::<RawConfig>(params)?.check().map(drop)
    }
}

/// A linear map `[out, in]` with or without bias.
fn linear(
    store: &mut Store<'_, '_>,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    init: Init,
) -> Result<Linear> {
    if bias {
        Linear::new(store, name, d_in, d_out, OutIn, init)
    } else {
        Linear::no_bias(store, name, d_in, d_out, OutIn, init)
    }
}

impl Llama {
    /// Causal self-attention of layer `index` on the normalised stream `h` (`[b·t, c]`), with
    /// the pass's rotary tables.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        index: usize,
        layer: &Layer,
        h: &Tensor,
        rotary: &RotaryWindow,
        cache: Option<&mut KvCache>,
        b: usize,
        t: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let heads = Heads {
            batch: b,
            positions: t,
            heads: c.num_attention_heads,
            head_dim: c.head_dim,
        };
        let kv_heads = Heads {
            heads: c.num_key_value_heads,
            ..heads
        };
        let start = cache.as_ref().map_or(0, |cache| cache.len());
        // `[b·t, h·d]` → `[b, h, t, d]`, contiguous: the layout rotary expects.
        let q = rotary.apply(&heads.split_contiguous(&layer.q_proj.forward(h)?)?)?;
        let k = rotary.apply(&kv_heads.split_contiguous(&layer.k_proj.forward(h)?)?)?;
        let v = kv_heads.split_contiguous(&layer.v_proj.forward(h)?)?;
        let y = match cache {
            None => {
                let k = heads.repeat_kv(k, c.num_key_value_heads, t)?;
                let v = heads.repeat_kv(v, c.num_key_value_heads, t)?;
                heads.causal(&q, &k, &v)?
            }
            Some(cache) => {
                // The cache keeps one key and value per key/value head; the repeat is redone
                // over every cached position at each step.
                let (keys, values) = cache.append(index, &k, &v)?;
                let total = start + t;
                let keys = heads.repeat_kv(keys, c.num_key_value_heads, total)?;
                let values = heads.repeat_kv(values, c.num_key_value_heads, total)?;
                q.attention(&keys, &values, true, heads.scale())?
            }
        };
        layer.o_proj.forward(&heads.merge(&y)?)
    }

    /// Logits `[b, t, vocab]` of the positions in `input`: the first `t` of a sequence, or
    /// the `t` after those a cache holds.
    fn run(&self, input: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let shape = input.shape()?;
        let &[b, t] = shape.as_slice() else {
            bail!("input must be token ids of shape [batch, time], found shape {shape:?}");
        };
        if t == 0 || b == 0 {
            bail!("input must hold at least one token, found shape [{b}, {t}]");
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        let limit = self.config.max_positions();
        if start.saturating_add(t) > limit {
            bail!(
                "input has {} positions but the model takes at most {limit}; shorten the \
                 sequences",
                start.saturating_add(t),
            );
        }
        let c = self.config.hidden_size;
        let mut x = self.embed_tokens.forward(input)?.reshape(&[b * t, c])?;
        // Positions start..start + t, or each token's within its example in packed rows.
        let rotary = self.rotary.window_for(&Positions::of(input, start, t)?)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let a = self.attention(index, layer, &h, &rotary, cache.as_deref_mut(), b, t)?;
            x = x.add(&a)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = x.add(&layer.mlp.forward(&h)?)?;
        }
        let x = self.norm.forward(&x)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => self.embed_tokens.logits(&x)?,
        };
        logits.reshape(&[b, t, self.config.vocab_size])
    }
}

impl Model for Llama {
    fn create(params: &str, vocab_size: usize, store: &mut Store<'_, '_>) -> Result<Self> {
        let raw: RawConfig = parse_strict(params)?;
        let config = raw.resolve(vocab_size)?;
        let init = Init::Normal {
            std: config.initializer_range,
        };
        let (c, ff, d) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
        );
        let q_out = config.num_attention_heads * d;
        let kv_out = config.num_key_value_heads * d;
        let (qkv_bias, o_bias) = (config.qkv_bias(), config.o_bias());
        let eps = config.rms_norm_eps;

        let mut m = store.pp("model");
        let embed_tokens = Embedding::new(&mut m, "embed_tokens", config.vocab_size, c, init)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut s = m.pp(&format!("layers.{i}"));
            let input_layernorm = RmsNorm::new(&mut s, "input_layernorm", c, eps)?;
            let q_proj = linear(&mut s, "self_attn.q_proj", c, q_out, qkv_bias, init)?;
            let k_proj = linear(&mut s, "self_attn.k_proj", c, kv_out, qkv_bias, init)?;
            let v_proj = linear(&mut s, "self_attn.v_proj", c, kv_out, qkv_bias, init)?;
            let o_proj = linear(&mut s, "self_attn.o_proj", q_out, c, o_bias, init)?;
            let post_attention_layernorm =
                RmsNorm::new(&mut s, "post_attention_layernorm", c, eps)?;
            let mlp = if config.mlp_bias {
                let mut p = s.pp("mlp");
                SwiGlu::from_linears(
                    linear(&mut p, "gate_proj", c, ff, true, init)?,
                    linear(&mut p, "up_proj", c, ff, true, init)?,
                    linear(&mut p, "down_proj", ff, c, true, init)?,
                )
            } else {
                SwiGlu::llama(&mut s, "mlp", c, ff, init)?
            };
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
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear::no_bias(
                store,
                "lm_head",
                c,
                config.vocab_size,
                OutIn,
                init,
            )?)
        };
        // Constants on the parameters' device, f32 whatever the parameters' dtype.
        let rotary = Rotary::scaled(
            config.max_position_embeddings,
            d,
            config.rope_theta,
            config.rope_scaling,
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
        self.config.max_positions()
    }

    fn max_positions_param(&self) -> Option<&str> {
        Some(match self.config.sliding_window {
            Some(w) if w < self.config.max_position_embeddings => "sliding_window",
            _ => "max_position_embeddings",
        })
    }

    fn config_json(&self) -> String {
        hf_config_json(&self.config)
    }
}

/// HF's `config.json` for the variant's architecture.
fn hf_config_json(c: &Config) -> String {
    {
        let mut hf = Map::new();
        let mut put = |k: &str, v: Value| {
            hf.insert(k.to_string(), v);
        };
        put("architectures", json!([c.variant.architecture()]));
        put("model_type", json!(c.variant.model_type()));
        put("vocab_size", json!(c.vocab_size));
        put("hidden_size", json!(c.hidden_size));
        put("intermediate_size", json!(c.intermediate_size));
        put("num_hidden_layers", json!(c.num_hidden_layers));
        put("num_attention_heads", json!(c.num_attention_heads));
        put("num_key_value_heads", json!(c.num_key_value_heads));
        put("head_dim", json!(c.head_dim));
        put("hidden_act", json!("silu"));
        put("max_position_embeddings", json!(c.max_position_embeddings));
        put("rms_norm_eps", json!(c.rms_norm_eps));
        put("rope_theta", json!(c.rope_theta));
        put(
            "rope_scaling",
            c.rope_scaling_json.clone().unwrap_or(Value::Null),
        );
        put("initializer_range", json!(c.initializer_range));
        put("attention_dropout", json!(0.0));
        put("tie_word_embeddings", json!(c.tie_word_embeddings));
        put("use_cache", json!(true));
        match c.variant {
            Variant::Llama => {
                put("attention_bias", json!(c.attention_bias));
                put("mlp_bias", json!(c.mlp_bias));
            }
            Variant::Mistral => {
                put("sliding_window", json!(c.sliding_window));
            }
            Variant::Qwen2 => {
                put("use_sliding_window", json!(c.sliding_window.is_some()));
                put("sliding_window", json!(c.sliding_window));
            }
        }
        serde_json::to_string_pretty(&Value::Object(hf)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(json: &str) -> Result<Config> {
        parse_strict::<RawConfig>(json)?.resolve(100)
    }

    fn err(json: &str) -> String {
        resolve(json).expect_err(json).to_string()
    }

    #[test]
    fn defaults_are_hf_apart_from_the_sizes() {
        let c = resolve("").expect("empty params");
        assert_eq!(c.variant, Variant::Llama);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (256, 688, 4)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 4, 64)
        );
        assert_eq!((c.vocab_size, c.max_position_embeddings), (100, 2048));
        assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-6, 10_000.0));
        assert_eq!(c.rope_scaling, None);
        assert!(!c.tie_word_embeddings && !c.qkv_bias() && !c.o_bias());
    }

    #[test]
    fn variants_differ_in_biases_and_windows() {
        let qwen = resolve(r#"{"model_type": "qwen2", "sliding_window": 32}"#).expect("qwen2");
        assert!(qwen.qkv_bias() && !qwen.o_bias());
        // Qwen2 ignores its window unless told to use it.
        assert_eq!(qwen.max_positions(), 2048);
        let qwen =
            resolve(r#"{"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": true}"#)
                .expect("qwen2");
        assert_eq!(qwen.max_positions(), 32);
        let llama = resolve(r#"{"attention_bias": true}"#).expect("llama");
        assert!(llama.qkv_bias() && llama.o_bias());
        let mistral = resolve(r#"{"model_type": "mistral", "sliding_window": 64}"#).expect("m");
        assert_eq!(mistral.max_positions(), 64);
    }

    #[test]
    fn rope_scaling_kinds() {
        let c = resolve(r#"{"rope_scaling": {"type": "linear", "factor": 2.0}}"#).expect("linear");
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let c = resolve(
            r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        )
        .expect("llama3");
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        let c = resolve(r#"{"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#)
            .expect("rope_parameters");
        assert_eq!((c.rope_theta, c.rope_scaling), (500_000.0, None));
        assert_eq!(
            err(r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#),
            "rope_scaling.rope_type: `yarn` is not supported; codex-ml implements \"default\", \
             \"linear\" and \"llama3\""
        );
        assert!(
            err(r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#)
                .starts_with("rope_scaling.low_freq_factor: is missing")
        );
        assert!(
            err(r#"{"rope_scaling": {"rope_type": "linear", "factor": -1}}"#)
                .starts_with("rope_scaling.factor: must be a positive number")
        );
    }

    #[test]
    fn bad_params_name_their_field() {
        assert!(err(r#"{"hidden_sise": 64}"#).contains("unknown field `hidden_sise`"));
        assert!(err(r#"{"model_type": "gpt_neox"}"#).starts_with("model_type: unknown variant"));
        assert!(err(r#"{"num_key_value_heads": 3}"#)
            .starts_with("num_key_value_heads: must divide num_attention_heads (4), found 3"));
        assert!(err(r#"{"hidden_size": 30}"#).starts_with("hidden_size: must be divisible"));
        assert!(err(r#"{"head_dim": 5}"#).starts_with("head_dim: must be even"));
        assert!(err(r#"{"hidden_act": "gelu"}"#).starts_with("hidden_act: only \"silu\""));
        assert!(err(r#"{"vocab_size": 99}"#).starts_with("vocab_size: must be at least"));
        assert!(err(r#"{"rms_norm_eps": 0.0}"#).starts_with("rms_norm_eps"));
        assert!(err(r#"{"rope_theta": 1.0}"#).starts_with("rope_theta"));
        assert!(err(r#"{"attention_dropout": 0.1}"#).starts_with("attention_dropout"));
    }

    #[test]
    fn config_json_is_the_variants_hf_config() {
        let v: Value = serde_json::from_str(&hf_config_json(
            &resolve(r#"{"model_type": "qwen2", "num_key_value_heads": 2}"#).expect("qwen2"),
        ))
        .expect("json");
        assert_eq!(v["architectures"], json!(["Qwen2ForCausalLM"]));
        assert_eq!(v["num_key_value_heads"], json!(2));
        assert!(v.get("attention_bias").is_none());
    }
}
