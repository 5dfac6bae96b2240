//! Hugging Face model directories as the starting point of a run: finding one (a path, or a
//! model id in the local Hugging Face cache), reading its `config.json` into a model component
//! and its parameters, its tokenizer files into an `hf` tokenizer, and its weights (one
//! `model.safetensors` or the shards of `model.safetensors.index.json`) into the parameters.
//!
//! The mapping is deliberately thin: a model's parameters are the fields of `config.json`
//! minus the generic ones every transformers config carries ([`GENERIC_FIELDS`]), because the
//! built-in models take HF's field names; a model (built-in or a plugin's) then checks them
//! strictly, so a field it does not implement is refused by name rather than ignored.
//!
//! Nothing here touches the network. A model id is looked up the way transformers does with
//! `HF_HUB_OFFLINE=1`: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, then `models--ORG--NAME/snapshots/<refs/main>/`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use codex_engine::ParamStore;

mod export;

pub(crate) use export::{check_out_dir, write_dir};
pub use export::{export, ExportOptions, Exported};

/// Bad or missing files in a Hugging Face model directory: the user's input (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct HfError {
    /// The file (or directory) at fault.
    pub path: PathBuf,
    /// What is wrong with it, naming the field, and what to do.
    pub message: String,
}

fn error(path: &Path, message: impl Into<String>) -> HfError {
    HfError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Fields of every transformers config that describe the checkpoint or the library rather than
/// the architecture; they are not passed to the model.
pub const GENERIC_FIELDS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "auto_map",
    "bos_token_id",
    "chunk_size_feed_forward",
    "decoder_start_token_id",
    "dtype",
    "eos_token_id",
    "finetuning_task",
    "id2label",
    "is_encoder_decoder",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "pad_token_id",
    "prefix",
    "problem_type",
    "return_dict",
    "sep_token_id",
    "task_specific_params",
    "tokenizer_class",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "use_cache",
];

/// The `model_type`s of the built-in models, and the model that implements each.
pub const BUILTIN_TYPES: &[(&str, &str)] = &[
    ("gpt2", "gpt2"),
    ("llama", "llama"),
    ("mistral", "llama"),
    ("qwen2", "llama"),
];

/// The directory `from` names: a path (relative to `base`) when one exists there, else a
/// model id `org/name` in the local Hugging Face cache.
pub fn locate(from: &str, base: &Path) -> Result<PathBuf, HfError> {
    locate_in(from, base, cache_dir())
}

/// [`locate`] with the hub cache given.
fn locate_in(from: &str, base: &Path, hub: Option<PathBuf>) -> Result<PathBuf, HfError> {
    let path = base.join(from);
    if path.is_dir() {
        return Ok(path);
    }
    if path.exists() {
        return Err(error(
            &path,
            "is a file; `from` takes a Hugging Face model directory (the folder holding \
             config.json) or a model id org/name",
        ));
    }
    let looks_like_id = from.split('/').count() == 2
        && !from.starts_with('.')
        && from
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !looks_like_id {
        return Err(error(&path, "does not exist"));
    }
    let Some(hub) = hub else {
        return Err(error(
            &path,
            format!(
                "does not exist, and `{from}` cannot be looked up as a model id: neither \
                 HF_HUB_CACHE, HF_HOME nor HOME is set"
            ),
        ));
    };
    let repo = hub.join(format!("models--{}", from.replace('/', "--")));
    if !repo.is_dir() {
        return Err(error(
            &path,
            format!(
                "does not exist, and model `{from}` is not in the Hugging Face cache ({} has \
                 no {}); codex-ml never downloads: fetch it with `huggingface-cli download \
                 {from}` or give the directory",
                hub.display(),
                repo.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            ),
        ));
    }
    let refs = repo.join("refs").join("main");
    let revision = match std::fs::read_to_string(&refs) {
        Ok(text) => text.trim().to_owned(),
        Err(_) => {
            // No refs/main: the one snapshot there is, if there is exactly one.
            let snapshots: Vec<PathBuf> = std::fs::read_dir(repo.join("snapshots"))
                .map(|entries| entries.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            match snapshots.as_slice() {
                [one] => return Ok(one.clone()),
                _ => {
                    return Err(error(
                        &refs,
                        format!(
                            "is missing, and {} snapshots are cached; give the snapshot \
                             directory itself",
                            snapshots.len()
                        ),
                    ))
                }
            }
        }
    };
    let snapshot = repo.join("snapshots").join(&revision);
    if !snapshot.is_dir() {
        return Err(error(
            &refs,
            format!("names revision {revision}, which has no snapshot directory"),
        ));
    }
    Ok(snapshot)
}

/// Where the Hugging Face hub cache is, as `huggingface_hub` decides it.
fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(xdg).join("huggingface").join("hub"));
    }
    var("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// A Hugging Face model directory with its `config.json` read.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`, as written.
    pub config: Map<String, Value>,
}

/// The weight files of a model directory.
#[derive(Debug, Clone)]
pub struct Weights {
    /// The safetensors files, in the order the index lists them.
    pub files: Vec<PathBuf>,
    /// The file errors about the whole set name: the index, or the single file.
    pub origin: PathBuf,
}

impl ModelDir {
    /// Read `dir/config.json`.
    pub fn open(dir: &Path) -> Result<ModelDir, HfError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                error(
                    &path,
                    "is missing: the directory is not a Hugging Face model (save one with \
                     `save_pretrained`)",
                )
            } else {
                error(&path, format!("cannot be read: {e}"))
            }
        })?;
        let config = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(error(&path, "must be a JSON object")),
            Err(e) => return Err(error(&path, format!("is not valid JSON: {e}"))),
        };
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
        })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// `model_type`, else the one its first `architectures` entry implies.
    pub fn model_type(&self) -> Result<String, HfError> {
        if let Some(t) = self.config.get("model_type") {
            return t.as_str().map(str::to_owned).ok_or_else(|| {
                error(
                    &self.config_path(),
                    format!("model_type: must be a string, found {t}"),
                )
            });
        }
        let architecture = self
            .config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str);
        match architecture {
            Some("GPT2LMHeadModel") => Ok("gpt2".into()),
            Some("LlamaForCausalLM") => Ok("llama".into()),
            Some("MistralForCausalLM") => Ok("mistral".into()),
            Some("Qwen2ForCausalLM") => Ok("qwen2".into()),
            Some(other) => Err(error(
                &self.config_path(),
                format!(
                    "model_type: missing, and architecture `{other}` is not one codex-ml \
                     knows; {}",
                    known_types()
                ),
            )),
            None => Err(error(
                &self.config_path(),
                "model_type: missing, and no `architectures` entry says what the model is",
            )),
        }
    }

    /// The model component for this directory and its parameters: `name` if the user gave
    /// one, else the built-in for `model_type`; the parameters are `config.json` without
    /// [`GENERIC_FIELDS`].
    pub fn model(&self, name: Option<&str>) -> Result<(String, Map<String, Value>), HfError> {
        let model_type = self.model_type()?;
        let name = match name {
            Some(n) => n.to_owned(),
            None => match BUILTIN_TYPES.iter().find(|(t, _)| *t == model_type) {
                Some((_, model)) => (*model).to_owned(),
                None => {
                    return Err(error(
                        &self.config_path(),
                        format!(
                            "model_type: `{model_type}` is not an architecture codex-ml \
                             knows; {}; to use a plugin's model, give its name as \
                             `model.name`",
                            known_types()
                        ),
                    ))
                }
            },
        };
        if self.config.contains_key("quantization_config") {
            return Err(error(
                &self.config_path(),
                "quantization_config: quantized weights cannot be trained; start from the \
                 unquantized model",
            ));
        }
        let mut params = self.config.clone();
        for field in GENERIC_FIELDS {
            params.remove(*field);
        }
        if name == "gpt2" {
            // GPT-2's configs predate `model_type` in some files; the model accepts it.
            params.insert("model_type".into(), Value::String(model_type));
        }
        Ok((name, params))
    }

    /// The weight files: `model.safetensors`, else the shards `model.safetensors.index.json`
    /// names, each checked to exist and to be as long as its header says.
    pub fn weights(&self) -> Result<Weights, HfError> {
        let single = self.dir.join("model.safetensors");
        if single.is_file() {
            return Ok(Weights {
                files: vec![single.clone()],
                origin: single,
            });
        }
        let index = self.dir.join("model.safetensors.index.json");
        if !index.is_file() {
            let hint = if self.dir.join("pytorch_model.bin").exists() {
                "; only pytorch_model.bin is there: convert it to safetensors first (codex-ml \
                 never runs pickled code)"
            } else {
                ""
            };
            return Err(error(
                &self.dir,
                format!("has neither model.safetensors nor model.safetensors.index.json{hint}"),
            ));
        }
        let text = std::fs::read_to_string(&index)
            .map_err(|e| error(&index, format!("cannot be read: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| error(&index, format!("is not valid JSON: {e}")))?;
        let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
            return Err(error(
                &index,
                "weight_map: missing; the index must map each tensor to its shard",
            ));
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(error(
                    &index,
                    format!("weight_map.{tensor}: must be a file name, found {file}"),
                ));
            };
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(error(
                    &index,
                    format!("weight_map.{tensor}: `{file}` must be a file in the same directory"),
                ));
            }
            let path = self.dir.join(file);
            if !files.contains(&path) {
                if !path.is_file() {
                    return Err(error(
                        &index,
                        format!(
                            "weight_map.{tensor}: names {file}, which is not in {}",
                            self.dir.display()
                        ),
                    ));
                }
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(error(&index, "weight_map: is empty"));
        }
        Ok(Weights {
            files,
            origin: index,
        })
    }

    /// [`ModelDir::weights`], with every file's header read and its length checked: what
    /// can be known of the weights before a model exists.
    pub fn checked_weights(&self) -> Result<Weights, HfError> {
        let weights = self.weights()?;
        for file in &weights.files {
            codex_engine::check_safetensors(file).map_err(|e| match e {
                codex_engine::TensorError::Checkpoint { path, message } => {
                    HfError { path, message }
                }
                other => error(file, other.to_string()),
            })?;
        }
        Ok(weights)
    }

    /// Whether the LM head shares the embedding (no `lm_head.weight` is needed).
    pub fn tied(&self) -> bool {
        match self.config.get("tie_word_embeddings") {
            Some(v) => v.as_bool().unwrap_or(true),
            // transformers' default, and GPT-2's only choice.
            None => true,
        }
    }

    /// Load the weights into a store whose parameters the model declared.
    pub fn load_weights(&self, store: &mut ParamStore) -> Result<(), HfError> {
        let weights = self.weights()?;
        let files: Vec<&Path> = weights.files.iter().map(PathBuf::as_path).collect();
        let ignore: &[&str] = if self.tied() {
            &["lm_head.weight"]
        } else {
            &[]
        };
        store
            .load_pretrained(&files, &weights.origin, ignore)
            .map_err(|e| match e {
                codex_engine::TensorError::Checkpoint { path, message } => {
                    HfError { path, message }
                }
                other => error(&weights.origin, other.to_string()),
            })
    }

    /// The `hf` tokenizer of this directory: its parameters (`path` to `tokenizer.json`,
    /// `eot_token` from `tokenizer_config.json`'s `eos_token`).
    pub fn tokenizer_params(&self) -> Result<Map<String, Value>, HfError> {
        let file = self.dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(error(
                &file,
                "is missing: the model directory has no tokenizer.json (a tokenizer saved by \
                 a fast Hugging Face tokenizer); give `tokenizer` in the config",
            ));
        }
        let mut params = Map::new();
        params.insert(
            "path".into(),
            Value::String(file.to_string_lossy().into_owned()),
        );
        if let Some(eos) = self.special_token("eos_token")? {
            params.insert("eot_token".into(), Value::String(eos));
        }
        Ok(params)
    }

    /// A special token of `tokenizer_config.json` (a string, or an object with `content`).
    pub fn special_token(&self, field: &str) -> Result<Option<String>, HfError> {
        let path = self.dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(error(&path, format!("cannot be read: {e}"))),
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| error(&path, format!("is not valid JSON: {e}")))?;
        match value.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => match v.get("content").and_then(Value::as_str) {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(error(
                    &path,
                    format!("{field}: must be a token or an object with `content`, found {v}"),
                )),
            },
        }
    }
}

fn known_types() -> String {
    let types: Vec<&str> = BUILTIN_TYPES.iter().map(|(t, _)| *t).collect();
    format!("the built-in models take {}", types.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(config: &str) -> (tempfile::TempDir, ModelDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("config.json"), config).expect("write");
        let dir = ModelDir::open(tmp.path()).expect("open");
        (tmp, dir)
    }

    #[test]
    fn config_json_becomes_a_component_and_its_params() {
        let (_tmp, dir) = dir_with(
            r#"{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                "hidden_size": 64, "torch_dtype": "bfloat16", "eos_token_id": 2}"#,
        );
        let (name, params) = dir.model(None).expect("model");
        assert_eq!(name, "llama");
        assert_eq!(
            Value::Object(params),
            serde_json::json!({"model_type": "qwen2", "hidden_size": 64})
        );
        let (_tmp, dir) = dir_with(r#"{"architectures": ["GPT2LMHeadModel"], "n_layer": 2}"#);
        assert_eq!(
            dir.model(None).expect("gpt2").1.get("model_type"),
            Some(&Value::String("gpt2".into()))
        );
    }

    #[test]
    fn unknown_or_missing_types_are_refused_with_the_known_list() {
        let (_tmp, dir) = dir_with(r#"{"model_type": "gpt_neox"}"#);
        let e = dir.model(None).expect_err("unknown").to_string();
        assert!(
            e.ends_with(
                "config.json: model_type: `gpt_neox` is not an architecture codex-ml knows; the \
                 built-in models take gpt2, llama, mistral, qwen2; to use a plugin's model, give \
                 its name as `model.name`"
            ),
            "{e}"
        );
        // A plugin's model takes any type.
        assert_eq!(dir.model(Some("neox/neox")).expect("named").0, "neox/neox");
        let (_tmp, dir) = dir_with(r#"{"hidden_size": 4}"#);
        assert!(dir
            .model(None)
            .expect_err("none")
            .to_string()
            .contains("model_type: missing"));
    }

    #[test]
    fn a_directory_without_config_json_says_so() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = ModelDir::open(tmp.path())
            .expect_err("no config")
            .to_string();
        assert!(e.contains("config.json: is missing"), "{e}");
    }

    #[test]
    fn an_index_naming_a_missing_shard_is_refused() {
        let (tmp, dir) = dir_with(r#"{"model_type": "llama"}"#);
        std::fs::write(
            tmp.path().join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
        )
        .expect("write");
        let e = dir.weights().expect_err("missing shard").to_string();
        assert!(
            e.contains(
                "model.safetensors.index.json: weight_map.lm_head.weight: names \
                 model-00002-of-00002.safetensors, which is not in"
            ),
            "{e}"
        );
        let e = ModelDir::open(tmp.path()).expect("open");
        std::fs::remove_file(tmp.path().join("model.safetensors.index.json")).expect("rm");
        assert!(e
            .weights()
            .expect_err("none")
            .to_string()
            .contains("has neither model.safetensors nor model.safetensors.index.json"));
    }

    #[test]
    fn model_ids_resolve_through_the_cache_and_refs_main() {
        let hub = tempfile::tempdir().expect("tempdir");
        let repo = hub.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), "abc123\n").expect("write");
        let base = Path::new("/nonexistent-base");
        let found = locate_in("org/tiny", base, Some(hub.path().to_path_buf()));
        let missing = locate_in("org/other", base, Some(hub.path().to_path_buf()));
        let nowhere = locate_in("org/tiny", base, None);
        assert_eq!(found.expect("found"), repo.join("snapshots/abc123"));
        let e = missing.expect_err("missing").to_string();
        assert!(
            e.contains("model `org/other` is not in the Hugging Face cache"),
            "{e}"
        );
        assert!(e.contains("codex-ml never downloads"), "{e}");
        assert!(nowhere
            .expect_err("no cache")
            .to_string()
            .contains("HF_HOME"));
        // Without refs/main, a single snapshot is the one.
        std::fs::remove_file(repo.join("refs/main")).expect("rm");
        let found = locate_in("org/tiny", base, Some(hub.path().to_path_buf()));
        assert_eq!(found.expect("found"), repo.join("snapshots/abc123"));
    }
}
