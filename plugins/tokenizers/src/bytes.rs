//! `bytes`: one id per byte of UTF-8, plus two special ids.
//!
//! No vocabulary to train or load, so it is the baseline that always works; ids 0–255 are
//! the bytes, 256 is `<|endoftext|>`, 257 is `<|pad|>`. A model may emit an id sequence
//! that is not valid UTF-8, so decoding replaces bad bytes rather than failing.

use codex_plugin_api::{bail, Describe, Result, Tokenizer};
use serde::Deserialize;

use crate::params;

const EOT_ID: u32 = 256;
const PAD_ID: u32 = 257;
const VOCAB: usize = 258;

/// `bytes` takes no parameters; the struct exists so unknown keys are rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BytesParams {}

/// One id per byte.
pub(crate) struct Bytes;

impl Describe for Bytes {
    const NAME: &'static str = "bytes";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "one id per UTF-8 byte, plus <|endoftext|> and <|pad|>";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<BytesParams>(params).map(drop)
    }
}

impl Tokenizer for Bytes {
    fn create(params: &str, _base_dir: &str, _corpus: &[&str]) -> Result<Self> {
        let BytesParams {} = params::parse(Self::NAME, params)?;
        Ok(Bytes)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match u8::try_from(id) {
                Ok(b) => bytes.push(b),
                Err(_) if id == EOT_ID || id == PAD_ID => {}
                Err(_) => bail!(
                    "id {id} is outside the bytes vocabulary (0..{VOCAB}): check that the model \
                     and the tokenizer belong together"
                ),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn eot_id(&self) -> u32 {
        EOT_ID
    }

    fn pad_id(&self) -> Option<u32> {
        Some(PAD_ID)
    }
}
