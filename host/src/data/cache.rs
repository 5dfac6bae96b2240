//! The content-addressed token cache.
//!
//! A token stream is stored once per distinct (documents, tokenizer, preprocessing) in a
//! file named by the sha256 of exactly those: the document texts in order, the tokenizer's
//! [`TokenizerFingerprint`] and the preprocessing settings. Paths are never hashed, so
//! renaming a file is a hit and editing one byte is a miss.
//!
//! File layout (little-endian): `b"CDXTOK\0\x01"`, the token count as u64, the sha256 of
//! the payload, then the tokens as u32. The 48-byte header keeps the payload 4-byte aligned,
//! so a mapped file is used in place. Files are written to a temporary name in the cache
//! directory, fsynced and renamed, and never modified after: a mapped file cannot change
//! under us. A file whose header or checksum does not match is rebuilt, never trusted.

use std::fs::{self, File};
use std::io::Write;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use codex_plugin_api::tokenizer::TokenizerBox;
use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::config::Preprocess;
use super::error::DataError;
use super::source::Document;
use super::tokenize::{tokenize, TokenizerFingerprint};

const MAGIC: &[u8; 8] = b"CDXTOK\0\x01";
const HEADER: usize = 48;
const KEY_DOMAIN: &[u8] = b"codex-ml token cache v1";
const SFT_DOMAIN: &[u8] = b"codex-ml sft examples v1";

/// A stream of token ids, owned or mapped from a cache file.
pub struct Tokens(Repr);

enum Repr {
    Owned(Vec<u32>),
    /// The whole file; the payload after the header is 4-byte aligned (checked on open).
    Mapped(Mmap),
}

impl Tokens {
    /// The ids.
    pub fn as_slice(&self) -> &[u32] {
        match &self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped(map) => bytemuck::try_cast_slice(&map[HEADER..])
                .unwrap_or_else(|_| unreachable!("alignment is checked when the file is opened")),
        }
    }
}

impl From<Vec<u32>> for Tokens {
    fn from(v: Vec<u32>) -> Self {
        Tokens(Repr::Owned(v))
    }
}

impl Deref for Tokens {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.0 {
            Repr::Owned(_) => "owned",
            Repr::Mapped(_) => "mapped",
        };
        write!(f, "Tokens({} ids, {how})", self.len())
    }
}

/// How a stream was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A valid cache file was found.
    Hit,
    /// No cache file: the documents were tokenized and the file written.
    Miss,
    /// A cache file was there but invalid (the reason); it was rebuilt.
    Rebuilt(String),
}

/// A token stream with where it lives and how it was obtained.
#[derive(Debug)]
pub struct Cached {
    /// The ids.
    pub tokens: Tokens,
    /// The cache file.
    pub path: PathBuf,
    /// Hit, miss or rebuilt.
    pub outcome: CacheOutcome,
}

/// The sha256 that names a cache file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key of `docs` tokenized by `fingerprint` after `preprocess`.
    pub fn new(
        docs: &[Document],
        fingerprint: &TokenizerFingerprint,
        preprocess: &Preprocess,
    ) -> Self {
        let settings = serde_json::to_string(preprocess).unwrap_or_default();
        Self::keyed(KEY_DOMAIN, docs, fingerprint, &settings)
    }

    /// The key of supervised fine-tuning examples `docs` encoded by `fingerprint` with
    /// `settings` (the chat template and the loss settings: [`super::sft::SftEncoder::settings_key`]).
    pub fn sft(docs: &[Document], fingerprint: &TokenizerFingerprint, settings: &str) -> Self {
        Self::keyed(SFT_DOMAIN, docs, fingerprint, settings)
    }

    fn keyed(
        domain: &[u8],
        docs: &[Document],
        fingerprint: &TokenizerFingerprint,
        settings: &str,
    ) -> Self {
        let mut h = Sha256::new();
        // Every field is length-prefixed so that no two different inputs hash alike
        // (["ab", "c"] and ["a", "bc"] differ).
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(domain);
        field(&(docs.len() as u64).to_le_bytes());
        for d in docs {
            field(d.text.as_bytes());
        }
        field(fingerprint.as_str().as_bytes());
        field(settings.as_bytes());
        CacheKey(hex::encode(h.finalize()))
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct TokenCache {
    dir: PathBuf,
}

impl TokenCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TokenCache { dir: dir.into() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds the stream for `key`.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.tokens", key.as_str()))
    }

    /// The token stream of `docs`: from the cache when a valid file exists, otherwise
    /// tokenized (in parallel) and written to the cache.
    pub fn load_or_build(
        &self,
        docs: &[Document],
        tokenizer: &TokenizerBox,
        fingerprint: &TokenizerFingerprint,
        preprocess: &Preprocess,
    ) -> Result<Cached, DataError> {
        let key = CacheKey::new(docs, fingerprint, preprocess);
        self.load_or_build_with(&key, docs.len(), || tokenize(docs, tokenizer))
    }

    /// The stream named `key`: from the cache when a valid file exists, otherwise made by
    /// `build` (from `count` documents) and written to the cache.
    pub fn load_or_build_with(
        &self,
        key: &CacheKey,
        count: usize,
        build: impl FnOnce() -> Result<Vec<u32>, DataError>,
    ) -> Result<Cached, DataError> {
        let path = self.path(key);
        let outcome = match open(&path) {
            Ok(Some(tokens)) => {
                tracing::info!(
                    "token cache hit: {} tokens from {}",
                    tokens.len(),
                    shown(&self.dir)
                );
                tracing::debug!("token cache file: {}", path.display());
                return Ok(Cached {
                    tokens,
                    path,
                    outcome: CacheOutcome::Hit,
                });
            }
            Ok(None) => {
                tracing::info!(
                    "token cache miss: tokenizing {count} documents into {}",
                    shown(&self.dir)
                );
                tracing::debug!("token cache file: {}", path.display());
                CacheOutcome::Miss
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "token cache file is invalid: rebuilding it");
                CacheOutcome::Rebuilt(reason)
            }
        };
        let tokens = build()?;
        self.write(&path, &tokens)?;
        Ok(Cached {
            tokens: Tokens::from(tokens),
            path,
            outcome,
        })
    }

    fn write(&self, path: &Path, tokens: &[u32]) -> Result<(), DataError> {
        fs::create_dir_all(&self.dir).map_err(|e| DataError::io(&self.dir, e))?;
        let mut payload_hash = Sha256::new();
        for chunk in tokens.chunks(1 << 16) {
            payload_hash.update(le_bytes(chunk));
        }
        crate::fsio::write_atomic_with(path, |out| {
            out.write_all(MAGIC)?;
            out.write_all(&(tokens.len() as u64).to_le_bytes())?;
            out.write_all(&payload_hash.finalize())?;
            for chunk in tokens.chunks(1 << 16) {
                out.write_all(&le_bytes(chunk))?;
            }
            Ok(())
        })
        .map_err(|e| DataError::io(path, e))?;
        Ok(())
    }
}

/// `dir` for a log line: under the home directory as `~/...`, which keeps the default
/// location (`~/.cache/codex-ml`) short enough for an 80-column terminal.
fn shown(dir: &Path) -> String {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match home.and_then(|h| dir.strip_prefix(h).ok().map(Path::to_path_buf)) {
        Some(rest) if rest.as_os_str().is_empty() => "~".to_string(),
        Some(rest) => format!("~/{}", rest.display()),
        None => dir.display().to_string(),
    }
}

fn le_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// Open a cache file: `Ok(None)` when absent, `Err(reason)` when present but invalid.
fn open(path: &Path) -> Result<Option<Tokens>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open: {e}")),
    };
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    if len < HEADER as u64 {
        return Err(format!(
            "{len} bytes, shorter than the {HEADER}-byte header"
        ));
    }
    // SAFETY: cache files are written under a temporary name and renamed into place, and
    // never modified afterwards, so the mapped bytes do not change while mapped. (Another
    // process editing the file by hand is outside what any cache can defend against; the
    // checksum below catches edits made before we open it.)
    let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map: {e}"))?;
    if &map[..8] != MAGIC {
        return Err("not a token cache file (bad magic bytes)".to_string());
    }
    let mut count = [0u8; 8];
    count.copy_from_slice(&map[8..16]);
    let count = u64::from_le_bytes(count);
    let expected = count
        .checked_mul(4)
        .and_then(|n| n.checked_add(HEADER as u64));
    if expected != Some(map.len() as u64) {
        return Err(format!(
            "the header says {count} tokens but the file has {} bytes (truncated?)",
            map.len()
        ));
    }
    let payload = &map[HEADER..];
    if Sha256::digest(payload).as_slice() != &map[16..HEADER] {
        return Err("checksum mismatch".to_string());
    }
    if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, u32>(payload).is_ok() {
        return Ok(Some(Tokens(Repr::Mapped(map))));
    }
    let ids = payload
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect::<Vec<_>>();
    Ok(Some(Tokens::from(ids)))
}
