//! Tokenizers: text ⇄ token ids.
//!
//! They exchange plain data only (strings and ids), so they cross any boundary cheaply.
//! Every tokenizer names an end-of-text id: the data pipeline joins documents with it.
//! `to_json` returns a Hugging Face `tokenizer.json` when the tokenizer has one, so the run
//! directory always holds the tokenizer actually used.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};

/// What the host tells a tokenizer constructor.
#[repr(C)]
#[derive(StableAbi)]
pub struct TokenizerEnv<'a> {
    /// Directory that relative paths in the parameters are resolved against (the config's).
    pub base_dir: RStr<'a>,
    /// The training documents, for tokenizers that learn a vocabulary (`bpe`); empty when
    /// the tokenizer is restored from `saved`.
    pub corpus: RSlice<'a, RString>,
    /// The tokenizer's own serialised form (what its `to_json` returned) saved with a run,
    /// when a trained model is being loaded (`eval`, `generate`): the tokenizer restores
    /// itself from it instead of building anew.
    pub saved: ROption<RStr<'a>>,
}

/// The ABI face of a tokenizer.
#[sabi_trait]
pub trait TokenizerAbi: Send + Sync {
    /// Text → the ids of one document: with the special tokens the tokenizer's own template
    /// adds (a bos token), if any; the host appends the end-of-text id unless the ids already
    /// end with it.
    fn encode(&self, text: RStr<'_>) -> RResult<RVec<u32>, PluginError>;
    /// Ids → text (special tokens skipped).
    fn decode(&self, ids: RSlice<'_, u32>) -> RResult<RString, PluginError>;
    /// Number of ids.
    fn vocab_size(&self) -> usize;
    /// The id that separates documents.
    fn eot_id(&self) -> u32;
    /// The padding id, if any.
    fn pad_id(&self) -> ROption<u32>;
    /// Serialised form (`tokenizer.json`), if the tokenizer has one.
    #[sabi(last_prefix_field)]
    fn to_json(&self) -> RResult<ROption<RString>, PluginError>;
}

/// An owned tokenizer object.
pub type TokenizerBox = TokenizerAbi_TO<'static, RBox<()>>;

/// A tokenizer constructor: `(params as JSON, env)`.
pub type TokenizerFactory =
    extern "C" fn(RStr<'_>, TokenizerEnv<'_>) -> RResult<TokenizerBox, PluginError>;

/// What tokenizer authors implement.
pub trait Tokenizer: Describe + Send + Sync + Sized + 'static {
    /// Parse `params` (JSON, strictly) and build (or train on `corpus`, the training
    /// documents; empty when an already-trained tokenizer is being reloaded). Relative paths in
    /// `params` are resolved against `base_dir`, the config's directory.
    fn create(params: &str, base_dir: &str, corpus: &[&str]) -> Result<Self>;
    /// Text → ids.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Ids → text.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Number of ids.
    fn vocab_size(&self) -> usize;
    /// End-of-text id.
    fn eot_id(&self) -> u32;
    /// Padding id.
    fn pad_id(&self) -> Option<u32> {
        None
    }
    /// `tokenizer.json`, if any.
    fn to_json(&self) -> Result<Option<String>> {
        Ok(None)
    }
    /// Rebuild the tokenizer a run used from `saved`, what its [`Tokenizer::to_json`]
    /// returned then, with the run's `params`. The default builds it anew with no corpus,
    /// which is right for tokenizers that learn nothing; one that learns a vocabulary
    /// restores it from `saved`.
    fn restore(params: &str, base_dir: &str, saved: &str) -> Result<Self> {
        let _ = saved;
        Self::create(params, base_dir, &[])
    }
}

struct Adapter<T>(T);

impl<T: Tokenizer> TokenizerAbi for Adapter<T> {
    fn encode(&self, text: RStr<'_>) -> RResult<RVec<u32>, PluginError> {
        guard(T::NAME, "encode", || {
            self.0.encode(text.as_str()).map(RVec::from)
        })
    }
    fn decode(&self, ids: RSlice<'_, u32>) -> RResult<RString, PluginError> {
        guard(T::NAME, "decode", || {
            self.0.decode(ids.as_slice()).map(RString::from)
        })
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn eot_id(&self) -> u32 {
        self.0.eot_id()
    }
    fn pad_id(&self) -> ROption<u32> {
        self.0.pad_id().into()
    }
    fn to_json(&self) -> RResult<ROption<RString>, PluginError> {
        guard(T::NAME, "to_json", || {
            self.0.to_json().map(|o| o.map(RString::from).into())
        })
    }
}

extern "C" fn factory<T: Tokenizer>(
    params: RStr<'_>,
    env: TokenizerEnv<'_>,
) -> RResult<TokenizerBox, PluginError> {
    guard(T::NAME, "create", || {
        let t = match env.saved.into_option() {
            Some(saved) => T::restore(params.as_str(), env.base_dir.as_str(), saved.as_str())?,
            None => {
                let corpus: Vec<&str> = env.corpus.iter().map(RString::as_str).collect();
                T::create(params.as_str(), env.base_dir.as_str(), &corpus)?
            }
        };
        Ok(TokenizerAbi_TO::from_value(
            Adapter(t),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of tokenizer type `T`.
pub fn declare<T: Tokenizer>() -> ComponentDecl {
    decl::<T>(Factory::Tokenizer(factory::<T>))
}
