//! Incremental decoding: `forward_cached` and the generation loop built on it.
//!
//! For the built-in `gpt2` (learned positions), the `native-llama` plugin (rotary positions)
//! and a model that leaves `forward_cached` to the plugin API's default, through the ABI the
//! host uses:
//! - every cached call's logits equal the full forward pass's at the same positions: one
//!   position at a time after a prompt, several at a time, and for a batch;
//! - `generate_ids` (prompt once, then one token per step) gives exactly the tokens of the
//!   algorithm it replaced (the whole window's forward pass at every step, written out here),
//!   greedy and sampled, past `max_positions` and from a prompt longer than it;
//! - a call that fails leaves the cache as it was, and a cache releases every tensor it held.

use codex_engine::candle::Device;
use codex_host::inference::sampling::{sample, Sampling};
use codex_host::inference::{generate_ids, GenerateOptions};
use codex_plugin_api::abi_stable::std_types::{RResult, RStr};
use codex_plugin_api::model::{ModelBox, ModelEnv};
use codex_plugin_api::{
    bail, Describe, ForwardCtx, Init, KvCache, Model, ParamRole, Result, Store, Tensor,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::{build_gpt2, Built};

const EVAL: ForwardCtx = ForwardCtx {
    train: false,
    seed: 0,
};

/// Cached logits may differ from the full pass's by rounding: products over fewer rows, the
/// attention of one query composed rather than fused. `|a − b| ≤ TOL · (1 + max |b|)`.
const TOL: f32 = 1e-4;

fn assert_close(what: &str, found: &[f32], expected: &[f32]) {
    assert_eq!(found.len(), expected.len(), "{what}: lengths differ");
    let scale = 1.0 + expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (i, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= TOL * scale,
            "{what}[{i}]: cached {f}, full forward {e} (tolerance {})",
            TOL * scale
        );
    }
}

fn ids_tensor(built: &Built, ids: &[u32], b: usize) -> Tensor {
    Tensor::from_u32(ids, &[b, ids.len() / b], &built.like()).expect("ids")
}

fn forward_cached(model: &ModelBox, input: &Tensor, cache: &mut KvCache) -> Result<Tensor, String> {
    match model.forward_cached(input.id(), cache) {
        RResult::ROk(id) => Ok(Tensor::from_id(id)),
        RResult::RErr(e) => Err(e.message.into_string()),
    }
}

/// Logits `[b, t, vocab]` as rows: `rows[(row, position)]` is one position's logits.
fn positions(logits: &Tensor) -> Vec<Vec<f32>> {
    let shape = logits.shape().expect("shape");
    let vocab = shape[2];
    let values = logits.to_vec_f32().expect("values");
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

/// A sequence of `b` rows of `n` ids below `vocab`, a different one for each `salt`.
fn sequence(b: usize, n: usize, vocab: usize, salt: u32) -> Vec<u32> {
    (0..(b * n) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % vocab as u32)
        .collect()
}

/// Rows `row`, positions `from..to` of ids `[b, n]`, flattened.
fn columns(ids: &[u32], b: usize, from: usize, to: usize) -> Vec<u32> {
    let n = ids.len() / b;
    (0..b)
        .flat_map(|r| ids[r * n + from..r * n + to].to_vec())
        .collect()
}

/// Feed a sequence of `max_positions` ids in chunks (`chunks` lengths, adding up to it) through
/// one cache, for batches of 1 and 2: each chunk's logits equal the full forward pass's at the
/// same positions. Then the cache is full: one more position is refused, the cache is left as
/// it was, and clearing it starts again from position 0. No handle outlives the cache.
fn assert_cached_logits_match_forward(built: &Built, vocab: usize, chunks: &[usize]) {
    let n = built.model.max_positions();
    assert_eq!(
        chunks.iter().sum::<usize>(),
        n,
        "chunks cover the model's positions"
    );
    let thread = std::thread::current().id();
    for b in [1, 2] {
        let ids = sequence(b, n, vocab, b as u32);
        let full = positions(&built.forward(&ids, b, n, EVAL).expect("forward"));
        let live = codex_engine::live_handles_on_thread(thread);
        let mut cache = KvCache::new();
        let mut at = 0;
        for &t in chunks {
            let input = ids_tensor(built, &columns(&ids, b, at, at + t), b);
            let logits = forward_cached(&built.model, &input, &mut cache).expect("cached");
            assert_eq!(logits.shape().expect("shape"), [b, t, vocab]);
            let got = positions(&logits);
            for row in 0..b {
                for i in 0..t {
                    assert_close(
                        &format!("batch {b}, row {row}, position {}", at + i),
                        &got[row * t + i],
                        &full[row * n + at + i],
                    );
                }
            }
            at += t;
            assert_eq!(cache.len(), at, "the cache advances by the new positions");
        }
        let one = ids_tensor(built, &columns(&ids, b, 0, 1), b);
        let error = forward_cached(&built.model, &one, &mut cache).expect_err("past the end");
        assert!(
            error.contains(&format!(
                "the cache holds {n} positions and the input adds 1, but the model takes at \
                 most {n} positions"
            )),
            "{error}"
        );
        assert_eq!(cache.len(), n, "a refused call changes nothing");
        cache.clear();
        assert!(cache.is_empty());
        let again = positions(&forward_cached(&built.model, &one, &mut cache).expect("cached"));
        for row in 0..b {
            assert_close(
                &format!("batch {b}, row {row}, position 0 after clear"),
                &again[row],
                &full[row * n],
            );
        }
        drop((one, cache));
        assert_eq!(
            codex_engine::live_handles_on_thread(thread),
            live,
            "the cache released every tensor it held"
        );
    }
}

/// The generation loop `generate_ids` replaced: the whole window's forward pass at every step.
fn generate_uncached(
    model: &ModelBox,
    prompt: &[u32],
    eot: u32,
    options: &GenerateOptions,
) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    if ids.is_empty() {
        ids.push(eot);
    }
    let prompt_len = ids.len();
    let context = model.max_positions().max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    for _ in 0..options.max_tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let t = window.len();
        let input = Tensor::from_id(
            codex_engine::upload_ids(window.to_vec(), &[1, t], &Device::Cpu).expect("upload"),
        );
        let logits = match model.forward(input.id(), EVAL) {
            RResult::ROk(id) => Tensor::from_id(id),
            RResult::RErr(e) => panic!("forward: {e}"),
        };
        let last = logits
            .narrow(1, t - 1, 1)
            .and_then(|l| l.to_vec_f32())
            .expect("last position");
        let next = sample(&last, &options.sampling, &mut rng);
        if next == eot {
            break;
        }
        ids.push(next);
    }
    ids.split_off(prompt_len)
}

/// Cached and uncached generation give the same tokens: greedy and sampled, through and past
/// `max_positions`, from a prompt shorter and one longer than it.
fn assert_generation_matches_uncached(model: &ModelBox, vocab: usize) {
    let n = model.max_positions();
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let sampled = Sampling {
        temperature: 0.9,
        top_k: 0,
        top_p: 1.0,
    };
    let nucleus = Sampling {
        temperature: 0.8,
        top_k: 10,
        top_p: 0.9,
    };
    let short = sequence(1, 3, vocab, 7);
    let long = sequence(1, n + 4, vocab, 8);
    // An end-of-text id the model never picks, so that every run is as long as asked; and one
    // it does pick, so that stopping early is compared too.
    let never = u32::MAX;
    for (what, sampling, prompt, eot) in [
        ("greedy", greedy, &short, never),
        ("sampled", sampled, &short, never),
        ("top-k, top-p", nucleus, &short, never),
        ("greedy from a long prompt", greedy, &long, never),
        ("sampled from a long prompt", sampled, &long, never),
        ("sampled, stopping at end-of-text", sampled, &short, 1),
    ] {
        for seed in [1, 2] {
            let options = GenerateOptions {
                max_tokens: 2 * n + 5,
                sampling,
                seed,
            };
            let cached =
                generate_ids(model, &Device::Cpu, prompt, eot, &options).expect("generate");
            let uncached = generate_uncached(model, prompt, eot, &options);
            assert_eq!(cached, uncached, "{what}, seed {seed}");
            if eot == never {
                assert_eq!(cached.len(), options.max_tokens, "{what}, seed {seed}");
            }
        }
    }
}

/// gpt2 with peaked logits (a wide initialisation), so that no two tokens nearly tie; dropout
/// configured, which inference must not apply.
const GPT2: &str = r#"{"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 12,
    "initializer_range": 0.4, "attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1}"#;
const VOCAB: usize = 29;

#[test]
fn gpt2_cached_logits_equal_the_full_forward_pass() {
    let built = build_gpt2(GPT2, VOCAB, 5).expect("builds");
    assert_cached_logits_match_forward(&built, VOCAB, &[5, 1, 1, 3, 1, 1]);
    assert_cached_logits_match_forward(&built, VOCAB, &[12]);
    assert_cached_logits_match_forward(&built, VOCAB, &[1; 12]);
}

#[test]
fn gpt2_generates_the_tokens_of_the_uncached_loop() {
    let built = build_gpt2(GPT2, VOCAB, 6).expect("builds");
    assert_generation_matches_uncached(&built.model, VOCAB);
}

const LLAMA: &str = r#"{"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 12, "initializer_range": 0.4}"#;

#[test]
fn the_plugin_llama_cached_logits_equal_the_full_forward_pass() {
    let dir = tempfile::tempdir().expect("temp dir");
    let built = crate::native::build_llama(dir.path(), LLAMA, VOCAB, 5);
    assert_cached_logits_match_forward(&built, VOCAB, &[5, 1, 1, 3, 1, 1]);
    assert_cached_logits_match_forward(&built, VOCAB, &[1; 12]);
}

#[test]
fn the_plugin_llama_generates_the_tokens_of_the_uncached_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let built = crate::native::build_llama(dir.path(), LLAMA, VOCAB, 6);
    assert_generation_matches_uncached(&built.model, VOCAB);
}

/// A one-layer attention model written against the plugin API in this test: token and learned
/// position embeddings, one causal attention head over them, an output projection. [`Plain`]
/// keeps the default `forward_cached`; [`Caching`] caches its keys and values itself. With
/// `"fail_at": P` a call that adds position `P` alone fails (or, with `"panic": true`,
/// panics), after the cache was appended to.
struct Window {
    wte: Tensor,
    wpe: Tensor,
    out: Tensor,
    width: usize,
    positions: usize,
    vocab: usize,
    fail_at: Option<usize>,
    panic: bool,
}

impl Window {
    fn create(params: &str, vocab: usize, store: &mut Store<'_, '_>) -> Result<Self> {
        let p: serde_json::Value = serde_json::from_str(params)?;
        let (width, positions) = (8, 12);
        let init = Init::Normal { std: 1.0 };
        Ok(Window {
            wte: store.param("wte", &[vocab, width], ParamRole::Embedding, init)?,
            wpe: store.param("wpe", &[positions, width], ParamRole::Embedding, init)?,
            out: store.param("out", &[width, vocab], ParamRole::Weight, init)?,
            width,
            positions,
            vocab,
            fail_at: p["fail_at"].as_u64().map(|v| v as usize),
            panic: p["panic"].as_bool().unwrap_or(false),
        })
    }

    /// `[b, 1, t, width]` token plus position embeddings of `input`, from position `start`.
    fn embed(&self, input: &Tensor, start: usize) -> Result<(Tensor, usize, usize)> {
        let shape = input.shape()?;
        let &[b, t] = shape.as_slice() else {
            bail!("input must be [batch, time], found {shape:?}");
        };
        let x = self
            .wte
            .embedding(input)?
            .add(&self.wpe.narrow(0, start, t)?)?
            .reshape(&[b, 1, t, self.width])?;
        Ok((x, b, t))
    }

    fn head(&self, y: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        y.reshape(&[b * t, self.width])?
            .matmul(&self.out)?
            .reshape(&[b, t, self.vocab])
    }

    /// Fail as asked when a call adds `t` positions from `start`.
    fn fail(&self, start: usize, t: usize) -> Result<()> {
        if t == 1 && self.fail_at == Some(start) {
            if self.panic {
                panic!("panicking at position {start}, as asked");
            }
            bail!("failing at position {start}, as asked");
        }
        Ok(())
    }

    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let (x, b, t) = self.embed(input, 0)?;
        self.head(&x.attention(&x, &x, true, 0.5)?, b, t)
    }
}

/// [`Window`] with the default `forward_cached`. Its `forward` fails as asked when it gets
/// `fail_at + 1` positions, i.e. when the default's call adds position `fail_at` alone.
struct Plain(Window);

impl Describe for Plain {
    const NAME: &'static str = "plain";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "one attention head, no caching of its own (test model)";
}

impl Model for Plain {
    fn create(params: &str, vocab_size: usize, store: &mut Store<'_, '_>) -> Result<Self> {
        Window::create(params, vocab_size, store).map(Plain)
    }
    fn forward(&self, input: &Tensor, _ctx: ForwardCtx) -> Result<Tensor> {
        let t = input.shape()?[1];
        self.0.fail(t - 1, 1)?;
        self.0.forward(input)
    }
    fn max_positions(&self) -> usize {
        self.0.positions
    }
    fn config_json(&self) -> String {
        "{}".into()
    }
}

/// [`Window`] caching its keys and values.
struct Caching(Window);

impl Describe for Caching {
    const NAME: &'static str = "caching";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "one attention head, caching its keys (test model)";
}

impl Model for Caching {
    fn create(params: &str, vocab_size: usize, store: &mut Store<'_, '_>) -> Result<Self> {
        Window::create(params, vocab_size, store).map(Caching)
    }
    fn forward(&self, input: &Tensor, _ctx: ForwardCtx) -> Result<Tensor> {
        self.0.forward(input)
    }
    fn forward_cached(&self, input: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let start = cache.len();
        let (x, b, t) = self.0.embed(input, start)?;
        let (keys, values) = cache.append(0, &x, &x)?;
        self.0.fail(start, t)?;
        self.0.head(&x.attention(&keys, &values, true, 0.5)?, b, t)
    }
    fn max_positions(&self) -> usize {
        self.0.positions
    }
    fn config_json(&self) -> String {
        "{}".into()
    }
}

/// Build `M` through the factory its declaration gives the host.
fn build<M: Model>(params: &str, seed: u64) -> Built {
    codex_engine::install();
    let codex_plugin_api::Factory::Model(factory) = codex_plugin_api::model::declare::<M>().factory
    else {
        panic!("a model's declaration has a model factory");
    };
    let mut store = codex_engine::ParamStore::new(Device::Cpu, seed);
    let env = ModelEnv {
        vocab_size: VOCAB,
        store: store.as_tensor_store(),
    };
    match factory(RStr::from(params), env) {
        RResult::ROk(model) => Built { store, model },
        RResult::RErr(e) => panic!("creating the model: {e}"),
    }
}

#[test]
fn a_model_without_caching_gets_the_default_and_the_same_tokens() {
    let plain = build::<Plain>("{}", 3);
    assert_cached_logits_match_forward(&plain, VOCAB, &[5, 1, 1, 3, 1, 1]);
    assert_cached_logits_match_forward(&plain, VOCAB, &[1; 12]);
    assert_generation_matches_uncached(&plain.model, VOCAB);
    // The same model caching its own keys and values gives the same logits and tokens.
    let caching = build::<Caching>("{}", 3);
    assert_cached_logits_match_forward(&caching, VOCAB, &[5, 1, 1, 3, 1, 1]);
    assert_generation_matches_uncached(&caching.model, VOCAB);
}

/// A call that fails or panics after the cache was appended to leaves the cache as it was: the
/// next call continues from the positions before the failed one, and nothing leaks.
#[test]
fn a_failed_call_leaves_the_cache_as_it_was() {
    let reference = build::<Caching>("{}", 4);
    let ids = sequence(1, 6, VOCAB, 9);
    let full = positions(&reference.forward(&ids, 1, 6, EVAL).expect("forward"));
    let fail = r#"{"fail_at": 3}"#;
    let panic = r#"{"fail_at": 3, "panic": true}"#;
    for (built, expected) in [
        (
            build::<Caching>(fail, 4),
            "caching: forward_cached: failing at position 3",
        ),
        (
            build::<Caching>(panic, 4),
            "caching: panic in forward_cached: panicking at position 3",
        ),
        (
            build::<Plain>(fail, 4),
            "plain: forward_cached: failing at position 3",
        ),
    ] {
        let thread = std::thread::current().id();
        let live = codex_engine::live_handles_on_thread(thread);
        let mut cache = KvCache::new();
        let mut feed = |from: usize, to: usize| {
            let input = ids_tensor(&built, &ids[from..to], 1);
            forward_cached(&built.model, &input, &mut cache).map(|l| positions(&l))
        };
        feed(0, 3).expect("the first three positions");
        let error = feed(3, 4).expect_err("the call adding position 3");
        assert!(error.contains(expected), "{error}");
        let rest = feed(3, 6).expect("positions 3 to 5");
        for (i, row) in rest.iter().enumerate() {
            assert_close(
                &format!("{expected}: position {}", 3 + i),
                row,
                &full[3 + i],
            );
        }
        assert_eq!(cache.len(), 6, "{expected}");
        drop(cache);
        assert_eq!(
            codex_engine::live_handles_on_thread(thread),
            live,
            "{expected}: nothing leaked"
        );
    }
}
