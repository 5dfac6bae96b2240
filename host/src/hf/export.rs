//! `codex-ml export`: a run's checkpoint as a Hugging Face model directory that
//! `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load as they
//! load a model saved by `save_pretrained`.
//!
//! What is written: `config.json` (the model's own description from `Model::config_json`,
//! over the fields of the `config.json` the run started from, so fields codex-ml does not use
//! survive; `torch_dtype`, bos/eos ids), `generation_config.json`, the weights (one
//! `model.safetensors`, or shards and `model.safetensors.index.json` past the shard size),
//! `tokenizer.json` and `tokenizer_config.json` with the special tokens, and a `README.md`
//! model card. The directory is assembled beside its destination and renamed into place, so
//! an interrupted export leaves no directory that looks whole; an existing non-empty
//! destination is refused, never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use codex_engine::{write_safetensors, ExportedTensor, TensorGroup};
use codex_plugin_api::DType;

use super::ModelDir;
use crate::inference::Loaded;

/// What an export is asked for.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The dtype of the written weights.
    pub dtype: DType,
    /// Largest shard, in bytes; more weights than this are split into shards with an index.
    pub max_shard_bytes: u64,
    /// Merge a LoRA run's adapters into the weights they adapt (`W + scale · B·A`).
    pub merge: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The directory.
    pub dir: PathBuf,
    /// The weight files.
    pub weight_files: Vec<PathBuf>,
    /// Total bytes of tensor data.
    pub bytes: u64,
}

/// `torch_dtype`'s name of a dtype.
fn torch_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("cannot export weights as {}", other.as_str()),
    })
}

/// The text of a token id, from a tokenizer.json: its added tokens, then its vocabulary.
fn token_text(tokenizer_json: &Value, id: u32) -> Option<String> {
    let added = tokenizer_json.get("added_tokens").and_then(Value::as_array);
    for t in added.into_iter().flatten() {
        if t.get("id").and_then(Value::as_u64) == Some(u64::from(id)) {
            return t.get("content").and_then(Value::as_str).map(str::to_owned);
        }
    }
    let vocab = tokenizer_json.get("model")?.get("vocab")?.as_object()?;
    vocab
        .iter()
        .find(|(_, v)| v.as_u64() == Some(u64::from(id)))
        .map(|(k, _)| k.clone())
}

/// Export `loaded` (a verified checkpoint) to `out`.
pub fn export(loaded: &Loaded, out: &Path, options: &ExportOptions) -> Result<Exported> {
    check_out_dir(out)?;
    let config = &loaded.config;
    let model_json = loaded.model.config_json().to_string();
    let Ok(Value::Object(own)) = serde_json::from_str::<Value>(&model_json) else {
        return Err(super::error(
            &loaded.checkpoint,
            format!(
                "model `{}` does not describe itself as a Hugging Face config (its \
                 config_json is empty), so it cannot be exported",
                config.model.name
            ),
        )
        .into());
    };
    // The imported model's config.json, when the run started from one and it is still there;
    // else the parameters the run kept of it.
    let base = config
        .model_from
        .as_deref()
        .and_then(|from| super::locate(from, &config.dir).ok())
        .and_then(|dir| ModelDir::open(&dir).ok());
    let mut hf: Map<String, Value> = match &base {
        Some(dir) => dir.config.clone(),
        None if config.model_from.is_some() => {
            config.model.params.as_object().cloned().unwrap_or_default()
        }
        None => Map::new(),
    };
    hf.extend(own);

    let tokenizer_text = loaded
        .tokenizer
        .to_json()
        .into_result()
        .map_err(|e| anyhow!("tokenizer: {e}"))?
        .into_option()
        .map(|s| s.to_string());
    let Some(tokenizer_text) = tokenizer_text else {
        return Err(super::error(
            &loaded.checkpoint,
            format!(
                "tokenizer `{}` has no tokenizer.json form, so transformers could not load \
                 it; train with `hf` or `bpe`",
                config.tokenizer.name
            ),
        )
        .into());
    };
    let tokenizer_json: Value =
        serde_json::from_str(&tokenizer_text).context("the run's tokenizer.json")?;
    let eot = loaded.tokenizer.eot_id();
    let eot_text = token_text(&tokenizer_json, eot)
        .ok_or_else(|| anyhow!("the tokenizer's end-of-text id {eot} has no text"))?;
    let pad = loaded.tokenizer.pad_id().into_option();
    let bos = hf
        .get("bos_token_id")
        .and_then(Value::as_u64)
        .map_or(eot, |b| b as u32);
    let eos = hf
        .get("eos_token_id")
        .and_then(Value::as_u64)
        .map_or(eot, |e| e as u32);
    let dtype_name = torch_name(options.dtype)?;
    hf.insert("torch_dtype".into(), json!(dtype_name));
    hf.remove("dtype");
    hf.insert("bos_token_id".into(), json!(bos));
    hf.insert("eos_token_id".into(), json!(eos));
    if let Some(pad) = pad {
        hf.insert("pad_token_id".into(), json!(pad));
    }

    let mut written = (Vec::new(), 0);
    write_dir(out, |staging| {
        written = write_all(
            loaded,
            staging,
            options,
            &hf,
            &tokenizer_text,
            &eot_text,
            bos,
            eos,
            pad,
        )?;
        Ok(())
    })?;
    let (weight_files, bytes) = written;
    Ok(Exported {
        dir: out.to_path_buf(),
        weight_files: weight_files.iter().map(|f| out.join(f)).collect(),
        bytes,
    })
}

/// Refuse an `out` that exists and is not an empty directory: an export never overwrites.
pub(crate) fn check_out_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_none();
        if !empty {
            return Err(super::error(
                out,
                "already exists and is not an empty directory; choose a new OUT_DIR",
            )
            .into());
        }
    }
    Ok(())
}

/// Assemble a directory beside `out` with `fill`, then rename it into place, so an
/// interrupted export leaves no directory that looks whole.
pub(crate) fn write_dir(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    // Assembled beside the destination, then renamed into place.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out
        .file_name()
        .ok_or_else(|| anyhow!("{} names no directory", out.display()))?
        .to_string_lossy()
        .into_owned();
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("clearing {}", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    if let Err(e) = fill(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&staging, out)
        .with_context(|| format!("moving {} to {}", staging.display(), out.display()))?;
    crate::fsio::fsync_dir(&parent).with_context(|| format!("syncing {}", parent.display()))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    loaded: &Loaded,
    dir: &Path,
    options: &ExportOptions,
    hf: &Map<String, Value>,
    tokenizer_text: &str,
    eot_text: &str,
    bos: u32,
    eos: u32,
    pad: Option<u32>,
) -> Result<(Vec<String>, u64)> {
    let write = |file: &str, bytes: &[u8]| -> Result<()> {
        crate::fsio::write_synced(&dir.join(file), bytes)
            .with_context(|| format!("writing {}", dir.join(file).display()))
    };
    let pretty = |v: &Value| -> Result<Vec<u8>> {
        let mut text = serde_json::to_string_pretty(v)?;
        text.push('\n');
        Ok(text.into_bytes())
    };
    write("config.json", &pretty(&Value::Object(hf.clone()))?)?;
    // The imported model's generation settings (sampling defaults, stop ids) survive, with
    // the run's bos and eos ids over them.
    let mut generation = original_generation_config(loaded).unwrap_or_else(|| json!({}));
    generation["bos_token_id"] = json!(bos);
    if generation
        .get("eos_token_id")
        .and_then(Value::as_array)
        .is_none_or(|ids| !ids.iter().any(|id| id.as_u64() == Some(u64::from(eos))))
    {
        // A list of stop ids (LLaMA 3's) is kept when it holds the run's eos id.
        generation["eos_token_id"] = json!(eos);
    }
    if let Some(pad) = pad {
        generation["pad_token_id"] = json!(pad);
    }
    write("generation_config.json", &pretty(&generation)?)?;

    // Weights, in declaration order, split into shards of at most max_shard_bytes.
    let tensors = match (&loaded.config.adapter, options.merge) {
        (Some(_), true) => loaded.store.export_merged(options.dtype),
        (None, _) => loaded.store.export_as(TensorGroup::Params, options.dtype),
        (Some(_), false) => bail!(
            "{} is a LoRA run's checkpoint: pass --adapter to write the adapter (PEFT's \
             format), or --merge to write the model with the adapter merged into it",
            loaded.checkpoint.display()
        ),
    }
    .context("reading the weights")?;
    let total: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    let mut shards: Vec<Vec<&ExportedTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &tensors {
        let n = t.bytes.len() as u64;
        if size > 0 && size + n > options.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let metadata = [("format", "pt")];
    let mut files = Vec::new();
    if shards.len() == 1 {
        let file = "model.safetensors".to_owned();
        write_safetensors(&dir.join(&file), &shards[0], &metadata)?;
        files.push(file);
    } else {
        let n = shards.len();
        let mut weight_map = Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write_safetensors(&dir.join(&file), shard, &metadata)?;
            for t in shard {
                weight_map.insert(t.name.clone(), json!(file));
            }
            files.push(file);
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write("model.safetensors.index.json", &pretty(&index)?)?;
    }

    // The tokenizer, with its special tokens where transformers looks for them.
    write("tokenizer.json", tokenizer_text.as_bytes())?;
    // A tokenizer that came from a Hugging Face directory keeps that directory's settings
    // (its own bos, chat template, class); one codex-ml made gets GPT-2's conventions.
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_text,
        "eos_token": eot_text,
        "unk_token": eot_text,
        "model_max_length": loaded.model.max_positions(),
        "clean_up_tokenization_spaces": false,
    });
    if let Some(original) = original_tokenizer_config(loaded) {
        if let (Value::Object(ours), Value::Object(theirs)) = (&mut tokenizer_config, original) {
            ours.extend(theirs);
            ours.insert("eos_token".into(), json!(eot_text));
        }
    }
    if let Some(pad) = pad {
        let tokenizer_json: Value = serde_json::from_str(tokenizer_text)?;
        if let Some(text) = token_text(&tokenizer_json, pad) {
            tokenizer_config["pad_token"] = json!(text);
        }
    }
    write("tokenizer_config.json", &pretty(&tokenizer_config)?)?;
    write("README.md", model_card(loaded, &files).as_bytes())?;
    crate::fsio::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    Ok((files, total))
}

/// The `tokenizer_config.json` beside the `tokenizer.json` an `hf` tokenizer was read from,
/// when it is still there.
fn original_tokenizer_config(loaded: &Loaded) -> Option<Value> {
    let config = &loaded.config;
    if config.tokenizer.name != "hf" {
        return None;
    }
    let path = config.tokenizer.params.get("path")?.as_str()?;
    let dir = config.dir.join(path);
    let text = std::fs::read_to_string(dir.parent()?.join("tokenizer_config.json")).ok()?;
    let mut value: Value = serde_json::from_str(&text).ok()?;
    if let Value::Object(map) = &mut value {
        // Files of the original directory that are not copied.
        map.remove("tokenizer_file");
        map.remove("auto_map");
    }
    Some(value)
}

/// The `generation_config.json` of the directory the run's model started from, when it is
/// still there.
fn original_generation_config(loaded: &Loaded) -> Option<Value> {
    let config = &loaded.config;
    let dir = super::locate(config.model_from.as_deref()?, &config.dir).ok()?;
    let text = std::fs::read_to_string(dir.join("generation_config.json")).ok()?;
    match serde_json::from_str(&text).ok()? {
        Value::Object(map) => Some(Value::Object(map)),
        _ => None,
    }
}

/// A model card stub: what the model is, what it started from, what it was trained on.
fn model_card(loaded: &Loaded, files: &[String]) -> String {
    let config = &loaded.config;
    let base = config
        .model_from
        .clone()
        .unwrap_or_else(|| "none (trained from scratch)".to_owned());
    let step = loaded
        .checkpoint
        .file_name()
        .and_then(|n| crate::checkpoint::parse_step(&n.to_string_lossy()))
        .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
    let data: Vec<String> = config
        .data
        .train
        .iter()
        .map(|s| format!("- `{}`", serde_json::to_string(s).unwrap_or_default()))
        .collect();
    format!(
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n\
         # {experiment}\n\n\
         A `{model}` model exported by codex-ml from checkpoint `{checkpoint}` (step {step}).\n\n\
         - Base model: {base}\n\
         - Weights: {files}\n\n\
         ## Training data\n\n{data}\n\n\
         ## Run config\n\n```ron\n{ron}\n```\n",
        experiment = config.experiment,
        model = config.model.name,
        checkpoint = loaded.checkpoint.display(),
        files = files.join(", "),
        data = data.join("\n"),
        ron = config.to_ron().trim_end(),
    )
}
