//! GPT-2, written only against the plugin API's tensor handles.
//!
//! Parameter names, shapes and layouts are those of Hugging Face `GPT2LMHeadModel`, so a
//! checkpoint exports to `transformers` with no renaming: linear weights are stored
//! `[in, out]` as HF's `Conv1D` stores them (so `x · W` needs no transpose), and the LM head
//! is tied to `transformer.wte.weight` (no parameter of its own). The parameters section of
//! an experiment uses HF's `GPT2Config` field names and defaults (GPT-2 small), with one
//! deliberate difference: the dropout probabilities default to 0.0, not 0.1, because short
//! runs and small models train better without it and a run with dropout off is cheaper.
//!
//! Dropout is drawn by the host from explicit seeds: every dropout site gets its own seed,
//! mixed from the call's [`ForwardCtx::seed`] and the site's index, so masks differ between
//! sites yet a step replays exactly.
//!
//! Generation goes through [`Model::forward_cached`]: the same layers on the new positions
//! only, their learned positions read from row `cache.len()` of `wpe` on, each block's keys and
//! values appended to the cache and attended over with the new queries
//! ([`Heads::causal_cached`]).

use codex_nn::WeightLayout::InOut;
use codex_nn::{Embedding, GeluMlp, Heads, LayerNorm, Linear, Positions};
use codex_plugin_api::strict::{invalid, parse_params as parse_strict};
use codex_plugin_api::{
    Describe, ForwardCtx, GeluForm, Init, KvCache, Model, Result, Store, Tensor,
};
use serde::{Deserialize, Serialize};

/// The activation of the MLP, by its HF `activation_function` name.
#[derive(Deserialize, Serialize, Copy, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
enum Activation {
    /// GELU, tanh approximation (HF's default for GPT-2).
    #[default]
    GeluNew,
    /// GELU, tanh approximation, under the name newer HF configs use.
    GeluPytorchTanh,
    /// GELU, exact (erf) form.
    Gelu,
}

impl Activation {
    fn form(self) -> GeluForm {
        match self {
            Activation::GeluNew | Activation::GeluPytorchTanh => GeluForm::Tanh,
            Activation::Gelu => GeluForm::Erf,
        }
    }
}

/// The `model.params` of an experiment using `gpt2`, as written (HF `GPT2Config` names).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Number of transformer blocks. Default 12.
    #[serde(default = "default_n_layer")]
    n_layer: usize,
    /// Attention heads per block; must divide `n_embd`. Default 12.
    #[serde(default = "default_n_head")]
    n_head: usize,
    /// Width of the residual stream. Default 768.
    #[serde(default = "default_n_embd")]
    n_embd: usize,
    /// Longest sequence (rows of `wpe`). Default 1024.
    #[serde(default = "default_n_positions")]
    n_positions: usize,
    /// Rows of `wte`. Default: the tokenizer's vocabulary size; if given, at least that.
    #[serde(default)]
    vocab_size: Option<usize>,
    /// Epsilon of every layer norm. Default 1e-5.
    #[serde(default = "default_layer_norm_epsilon")]
    layer_norm_epsilon: f64,
    /// Dropout after the embeddings. Default 0.0 (HF: 0.1).
    #[serde(default)]
    embd_pdrop: f64,
    /// Dropout on attention probabilities. Default 0.0 (HF: 0.1).
    #[serde(default)]
    attn_pdrop: f64,
    /// Dropout on each block's two residual branches. Default 0.0 (HF: 0.1).
    #[serde(default)]
    resid_pdrop: f64,
    /// `gelu_new` (tanh form, default), `gelu_pytorch_tanh` (the same) or `gelu` (erf form).
    #[serde(default)]
    activation_function: Activation,
    /// Standard deviation of the normal initialisation. Default 0.02; `c_proj` weights use
    /// it divided by `sqrt(2 * n_layer)`, as HF does.
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    /// The fields of an HF `GPT2Config` that are not parameters of their own (see
    /// [`HfFields`]), taken out before the strict parse.
    #[serde(skip)]
    hf: HfFields,
}

/// The fields of an HF `config.json` for `GPT2LMHeadModel` that a model loaded `from` a
/// directory brings along: accepted where they describe this model, refused where they ask
/// for something it does not do. They are split off before the strict parse so that the list
/// of parameters an unknown field is compared with stays the model's own.
#[derive(Deserialize, Debug, Default)]
struct HfFields {
    model_type: Option<String>,
    n_ctx: Option<usize>,
    n_inner: Option<usize>,
    tie_word_embeddings: Option<bool>,
    add_cross_attention: Option<bool>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
}

/// `HfFields`' names, and those accepted without a check: numerics of f16 attention and the
/// sequence-classification head, which a causal LM does not have.
const HF_FIELDS: &[&str] = &[
    "model_type",
    "n_ctx",
    "n_inner",
    "tie_word_embeddings",
    "add_cross_attention",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
];

/// Parse `params` strictly, with the HF config fields split off first.
fn parse(params: &str) -> Result<RawConfig, codex_plugin_api::Error> {
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(params) else {
        // Not an object (or empty): the strict parse says what is wrong, or takes defaults.
        return parse_strict(params);
    };
    let mut hf = serde_json::Map::new();
    for field in HF_FIELDS {
        if let Some(v) = map.remove(*field) {
            hf.insert((*field).to_owned(), v);
        }
    }
    let mut raw: RawConfig = parse_strict(&serde_json::Value::Object(map).to_string())?;
    raw.hf = serde_json::from_value(serde_json::Value::Object(hf)).map_err(|e| {
        codex_plugin_api::Error::msg(format!(
            "a Hugging Face config field has the wrong type: {e}"
        ))
    })?;
    Ok(raw)
}

fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    12
}
fn default_n_embd() -> usize {
    768
}
fn default_n_positions() -> usize {
    1024
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The configuration after defaults and validation; the only form the model uses.
#[derive(Debug, Clone)]
struct Config {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_positions: usize,
    vocab_size: usize,
    layer_norm_epsilon: f64,
    embd_pdrop: f64,
    attn_pdrop: f64,
    resid_pdrop: f64,
    activation_function: Activation,
    initializer_range: f64,
}

impl RawConfig {
    /// Every check that does not need the tokenizer: what `check_params` runs when the config
    /// is checked, before any data is read.
    fn check(&self) -> Result<(), codex_plugin_api::Error> {
        for (field, value) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_positions", self.n_positions),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, found 0"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(invalid(
                "n_embd",
                format!(
                    "must be divisible by n_head ({}), found {}; pick a multiple of n_head",
                    self.n_head, self.n_embd
                ),
            ));
        }
        for (field, p) in [
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
            ("resid_pdrop", self.resid_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(invalid(field, format!("must be in [0, 1), found {p}")));
            }
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(invalid(
                "layer_norm_epsilon",
                format!("must be positive, found {}", self.layer_norm_epsilon),
            ));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(invalid(
                "initializer_range",
                format!("must be zero or positive, found {}", self.initializer_range),
            ));
        }
        if self.vocab_size == Some(0) {
            return Err(invalid("vocab_size", "must be at least 1, found 0"));
        }
        if let Some(t) = self.hf.model_type.as_deref().filter(|t| *t != "gpt2") {
            return Err(invalid(
                "model_type",
                format!(
                    "must be \"gpt2\", found \"{t}\"; the llama model takes LLaMA-family types"
                ),
            ));
        }
        if let Some(n) = self.hf.n_ctx.filter(|n| *n != self.n_positions) {
            return Err(invalid(
                "n_ctx",
                format!("must equal n_positions ({}), found {n}", self.n_positions),
            ));
        }
        if let Some(n) = self.hf.n_inner.filter(|n| *n != 4 * self.n_embd) {
            return Err(invalid(
                "n_inner",
                format!(
                    "only 4 * n_embd ({}) is implemented, found {n}",
                    4 * self.n_embd
                ),
            ));
        }
        for (field, value, wanted) in [
            ("tie_word_embeddings", self.hf.tie_word_embeddings, true),
            ("add_cross_attention", self.hf.add_cross_attention, false),
            ("scale_attn_weights", self.hf.scale_attn_weights, true),
            (
                "scale_attn_by_inverse_layer_idx",
                self.hf.scale_attn_by_inverse_layer_idx,
                false,
            ),
        ] {
            if value.is_some_and(|v| v != wanted) {
                return Err(invalid(
                    field,
                    format!("only {wanted} is implemented, found {}", !wanted),
                ));
            }
        }
        Ok(())
    }

    fn resolve(self, tokenizer_vocab: usize) -> Result<Config, codex_plugin_api::Error> {
        self.check()?;
        let vocab_size = crate::vocab_size(self.vocab_size, tokenizer_vocab)?;
        Ok(Config {
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.n_embd,
            n_positions: self.n_positions,
            vocab_size,
            layer_norm_epsilon: self.layer_norm_epsilon,
            embd_pdrop: self.embd_pdrop,
            attn_pdrop: self.attn_pdrop,
            resid_pdrop: self.resid_pdrop,
            activation_function: self.activation_function,
            initializer_range: self.initializer_range,
        })
    }
}

/// What `config_json` writes: HF's `config.json` for `GPT2LMHeadModel`, so an export can
/// copy it as is.
#[derive(Serialize)]
struct HfConfig<'a> {
    model_type: &'a str,
    architectures: [&'a str; 1],
    vocab_size: usize,
    n_positions: usize,
    n_ctx: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    activation_function: Activation,
    resid_pdrop: f64,
    embd_pdrop: f64,
    attn_pdrop: f64,
    layer_norm_epsilon: f64,
    initializer_range: f64,
    scale_attn_weights: bool,
    scale_attn_by_inverse_layer_idx: bool,
    reorder_and_upcast_attn: bool,
    tie_word_embeddings: bool,
    use_cache: bool,
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: LayerNorm,
    mlp: GeluMlp,
}

/// GPT-2 with Hugging Face's parameter names (registry name `gpt2`).
pub struct Gpt2 {
    config: Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Describe for Gpt2 {
    const NAME: &'static str = "gpt2";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "GPT-2 decoder with Hugging Face parameter names and layouts, LM head tied to wte";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        parse(params)?.check()
    }
}

/// A dropout site: its index is mixed into the call's seed (see [`codex_nn::site_seed`]).
#[derive(Copy, Clone)]
enum Site {
    Embeddings,
    Attention(usize),
    AttentionOutput(usize),
    MlpOutput(usize),
}

impl Site {
    fn index(self) -> u64 {
        match self {
            Site::Embeddings => 0,
            Site::Attention(layer) => 1 + 3 * layer as u64,
            Site::AttentionOutput(layer) => 2 + 3 * layer as u64,
            Site::MlpOutput(layer) => 3 + 3 * layer as u64,
        }
    }
}

/// What every block of one forward call shares.
#[derive(Copy, Clone)]
struct Pass<'a> {
    ctx: ForwardCtx,
    /// Non-zero where a key is hidden from a query (`Positions::causal_mask`), when attention
    /// is composed for dropout on its probabilities.
    mask: Option<&'a Tensor>,
    b: usize,
    t: usize,
}

impl Gpt2 {
    fn dropout(&self, x: Tensor, p: f64, ctx: ForwardCtx, site: Site) -> Result<Tensor> {
        codex_nn::dropout(x, p, ctx, site.index())
    }

    fn attention(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        pass: &Pass<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let Pass { ctx, mask, b, t } = *pass;
        let c = self.config.n_embd;
        let heads = Heads {
            batch: b,
            positions: t,
            heads: self.config.n_head,
            head_dim: c / self.config.n_head,
        };
        // q, k and v each from its own slice of the fused `c_attn` weight and bias: slicing
        // the parameters rather than the `[b·t, 3c]` activation keeps the backward pass from
        // padding three activation-sized gradients back to full width.
        let head = |i: usize| -> Result<Tensor> {
            heads.split(&block.c_attn.forward_outputs(x, i * c, c)?)
        };
        let (q, k, v) = (head(0)?, head(1)?, head(2)?);
        let y = match (cache, mask) {
            (Some(cache), _) => heads.causal_cached(&q, &k, &v, cache, layer)?,
            (None, Some(mask)) => {
                // Dropout acts on the attention probabilities, which a fused attention never
                // materialises: compose it here.
                let probs = heads.causal_probs(&q, &k, mask)?;
                let probs =
                    self.dropout(probs, self.config.attn_pdrop, ctx, Site::Attention(layer))?;
                probs.matmul(&v)?
            }
            (None, None) => heads.causal(&q, &k, &v)?,
        };
        let y = heads.merge(&y)?;
        let y = block.attn_c_proj.forward(&y)?;
        self.dropout(
            y,
            self.config.resid_pdrop,
            ctx,
            Site::AttentionOutput(layer),
        )
    }

    fn mlp(&self, layer: usize, block: &Block, x: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        let y = block.mlp.forward(x)?;
        self.dropout(y, self.config.resid_pdrop, ctx, Site::MlpOutput(layer))
    }

    /// Logits of the positions in `input`, which come after the `cache.len()` positions
    /// `cache` holds (none without a cache).
    fn run(
        &self,
        input: &Tensor,
        ctx: ForwardCtx,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let shape = input.shape()?;
        let &[b, t] = shape.as_slice() else {
            codex_plugin_api::bail!(
                "input must be token ids of shape [batch, time], found shape {shape:?}"
            );
        };
        if t == 0 || b == 0 {
            codex_plugin_api::bail!("input must hold at least one token, found shape [{b}, {t}]");
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start.saturating_add(t) > self.config.n_positions {
            codex_plugin_api::bail!(
                "input has {} positions but the model takes at most n_positions = {}; \
                 shorten the sequences or raise n_positions",
                start.saturating_add(t),
                self.config.n_positions
            );
        }
        let c = self.config.n_embd;

        // Positions start..start + t are rows of wpe: a view, where a lookup by `arange`
        // would gather (and scatter its gradient). Packed rows look up each token's position
        // within its example.
        let positions = Positions::of(input, start, t)?;
        let x = self
            .wte
            .forward(input)?
            .add(&self.wpe.at(&positions)?)?
            .reshape(&[b * t, c])?;
        let mut x = self.dropout(x, self.config.embd_pdrop, ctx, Site::Embeddings)?;
        let mask = if ctx.train && self.config.attn_pdrop > 0.0 {
            Some(positions.causal_mask(&x)?)
        } else {
            None
        };
        let pass = Pass {
            ctx,
            mask: mask.as_ref(),
            b,
            t,
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?;
            let a = self.attention(layer, block, &h, &pass, cache.as_deref_mut())?;
            x = x.add(&a)?;
            let m = self.mlp(layer, block, &block.ln_2.forward(&x)?, ctx)?;
            x = x.add(&m)?;
        }
        let x = self.ln_f.forward(&x)?;
        // The LM head is tied to the token embedding: logits = x · wteᵀ.
        self.wte
            .logits(&x)?
            .reshape(&[b, t, self.config.vocab_size])
    }
}

impl Model for Gpt2 {
    fn create(params: &str, vocab_size: usize, store: &mut Store<'_, '_>) -> Result<Self> {
        let config = parse(params)?.resolve(vocab_size)?;
        let std = config.initializer_range;
        // HF scales the residual projections so the residual stream's variance does not grow
        // with depth.
        let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
        let c = config.n_embd;

        let mut tr = store.pp("transformer");
        let init = Init::Normal { std };
        let wte = Embedding::new(&mut tr, "wte", config.vocab_size, c, init)?;
        let wpe = Embedding::new(&mut tr, "wpe", config.n_positions, c, init)?;
        let eps = config.layer_norm_epsilon;
        let proj_init = Init::Normal { std: proj_std };
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut s = tr.pp(&format!("h.{i}"));
            let ln_1 = LayerNorm::new(&mut s, "ln_1", c, eps)?;
            let c_attn = Linear::new(&mut s, "attn.c_attn", c, 3 * c, InOut, init)?;
            let attn_c_proj = Linear::new(&mut s, "attn.c_proj", c, c, InOut, proj_init)?;
            let ln_2 = LayerNorm::new(&mut s, "ln_2", c, eps)?;
            let form = config.activation_function.form();
            let mlp = GeluMlp::gpt2(&mut s, "mlp", c, 4 * c, form, init, proj_init)?;
            blocks.push(Block {
                ln_1,
                c_attn,
                attn_c_proj,
                ln_2,
                mlp,
            });
        }
        let ln_f = LayerNorm::new(&mut tr, "ln_f", c, eps)?;
        Ok(Gpt2 {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }

    fn forward(&self, input: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        self.run(input, ctx, None)
    }

    fn forward_cached(&self, input: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        self.run(input, ctx, Some(cache))
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn max_positions_param(&self) -> Option<&str> {
        Some("n_positions")
    }

    fn config_json(&self) -> String {
        let c = &self.config;
        let hf = HfConfig {
            model_type: "gpt2",
            architectures: ["GPT2LMHeadModel"],
            vocab_size: c.vocab_size,
            n_positions: c.n_positions,
            n_ctx: c.n_positions,
            n_embd: c.n_embd,
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_inner: None,
            activation_function: c.activation_function,
            resid_pdrop: c.resid_pdrop,
            embd_pdrop: c.embd_pdrop,
            attn_pdrop: c.attn_pdrop,
            layer_norm_epsilon: c.layer_norm_epsilon,
            initializer_range: c.initializer_range,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            use_cache: true,
        };
        // Plain numbers, strings and booleans: serialisation cannot fail.
        serde_json::to_string_pretty(&hf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed of one dropout site for one forward call.
    fn site_seed(call_seed: u64, site: Site) -> u64 {
        codex_nn::site_seed(call_seed, site.index())
    }

    #[test]
    fn site_seeds_differ_between_sites_and_replay() {
        let sites = [
            Site::Embeddings,
            Site::Attention(0),
            Site::AttentionOutput(0),
            Site::MlpOutput(0),
            Site::Attention(1),
        ];
        let seeds: Vec<u64> = sites.iter().map(|&s| site_seed(7, s)).collect();
        for i in 0..seeds.len() {
            for j in i + 1..seeds.len() {
                assert_ne!(seeds[i], seeds[j], "sites {i} and {j} share a seed");
            }
        }
        assert_eq!(seeds[0], site_seed(7, Site::Embeddings));
        assert_ne!(
            site_seed(7, Site::Embeddings),
            site_seed(8, Site::Embeddings)
        );
    }

    #[test]
    fn hf_config_fields_are_accepted_or_refused_apart_from_the_params() {
        let hf = r#"{"model_type": "gpt2", "n_layer": 2, "n_positions": 64, "n_ctx": 64,
            "n_inner": null, "summary_type": "cls_index", "reorder_and_upcast_attn": false,
            "scale_attn_weights": true, "tie_word_embeddings": true}"#;
        parse(hf)
            .expect("parses")
            .check()
            .expect("an HF config of this model");
        let err = |json: &str| {
            parse(json)
                .and_then(|r| r.check())
                .expect_err(json)
                .to_string()
        };
        assert!(err(r#"{"n_inner": 100}"#).starts_with("n_inner: only 4 * n_embd (3072)"));
        assert!(err(r#"{"n_ctx": 5}"#).starts_with("n_ctx: must equal n_positions (1024)"));
        assert!(err(r#"{"model_type": "llama"}"#).starts_with("model_type: must be \"gpt2\""));
        assert!(err(r#"{"tie_word_embeddings": false}"#).starts_with("tie_word_embeddings"));
        // An unknown field is compared with the model's own parameters only.
        let unknown = err(r#"{"dropout": 0.1}"#);
        assert!(unknown.contains("unknown field `dropout`"), "{unknown}");
        assert!(!unknown.contains("summary_type"), "{unknown}");
    }

    #[test]
    fn resolve_rejects_bad_fields() {
        let check = |json: &str, field: &str| {
            let raw: RawConfig = parse_strict(json).expect("parses");
            let err = raw.resolve(100).expect_err("invalid").to_string();
            assert!(err.starts_with(field), "{err:?} should name {field}");
        };
        check(r#"{"n_embd": 30, "n_head": 4}"#, "n_embd");
        check(r#"{"n_layer": 0}"#, "n_layer");
        check(r#"{"vocab_size": 99}"#, "vocab_size");
        check(r#"{"attn_pdrop": 1.0}"#, "attn_pdrop");
        check(r#"{"layer_norm_epsilon": 0.0}"#, "layer_norm_epsilon");
    }

    #[test]
    fn the_config_check_finds_all_but_the_vocabulary_bound() {
        let check = |json: &str| Gpt2::check_params(json).map_err(|e| e.to_string());
        for (json, field) in [
            (
                r#"{"n_embd": 30, "n_head": 4}"#,
                "n_embd: must be divisible by n_head (4)",
            ),
            (r#"{"n_positions": 0}"#, "n_positions: must be at least 1"),
            (r#"{"resid_pdrop": -0.1}"#, "resid_pdrop: must be in [0, 1)"),
            (
                r#"{"initializer_range": -1.0}"#,
                "initializer_range: must be zero or positive",
            ),
            (r#"{"vocab_size": 0}"#, "vocab_size: must be at least 1"),
        ] {
            let err = check(json).expect_err(json);
            assert!(err.starts_with(field), "{json}: {err}");
        }
        // Only the tokenizer knows whether 99 is enough: that waits for the model's creation.
        assert_eq!(check(r#"{"vocab_size": 99, "n_layer": 2}"#), Ok(()));
    }

    #[test]
    fn resolve_defaults_follow_hf_except_dropout() {
        let raw: RawConfig = parse_strict("{}").expect("parses");
        let c = raw.resolve(50257).expect("valid");
        assert_eq!(
            (c.n_layer, c.n_head, c.n_embd, c.n_positions),
            (12, 12, 768, 1024)
        );
        assert_eq!(c.vocab_size, 50257);
        assert_eq!(c.activation_function, Activation::GeluNew);
        assert!(c.embd_pdrop == 0.0 && c.attn_pdrop == 0.0 && c.resid_pdrop == 0.0);
        assert!((c.layer_norm_epsilon - 1e-5).abs() < 1e-20);
    }
}
