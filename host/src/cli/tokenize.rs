//! `codex-ml tokenize`: the ids a run's tokenizer, or a Hugging Face directory's, gives a
//! text, encoded exactly as training data is, so that they can be compared with Python.

use std::io::Write as _;

use anyhow::{anyhow, Context, Result};

use super::TokenizeArgs;
use crate::config::Config;
use crate::hf::ModelDir;
use crate::plugins::build;
use crate::run::Latest;

/// Print the ids of the text.
pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    let text = match (&args.text, &args.file) {
        (Some(text), None) => text.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| super::UsageError(format!("{}: cannot be read: {e}", file.display())))?,
        _ => {
            return Err(super::UsageError(
                "give the text to encode, or --file FILE (not both)".into(),
            )
            .into())
        }
    };
    let target = super::run_target(&args.target, Latest::WithCheckpoint)?;
    let tokenizer =
        if target.join("config.json").is_file() && target.join("tokenizer.json").is_file() {
            // A Hugging Face model directory: its tokenizer as a run would use it.
            let dir = ModelDir::open(&target)?;
            let params = serde_json::Value::Object(dir.tokenizer_params()?);
            build::tokenizer(&registry, "hf", &params, "", &[], None)?
        } else {
            let checkpoint = crate::checkpoint::resolve(&target)?;
            let config = Config::load(&checkpoint.join("config.ron"), &[])
                .with_context(|| format!("reading the config saved in {}", checkpoint.display()))?;
            let saved_path = checkpoint.join("tokenizer.json");
            let saved = std::fs::read_to_string(&saved_path).ok();
            let dir = config.dir.to_string_lossy().into_owned();
            build::tokenizer(
                &registry,
                &config.tokenizer.name,
                &config.tokenizer.params,
                &dir,
                &[],
                saved.as_deref(),
            )?
        };
    let ids: Vec<u32> = tokenizer
        .encode(text.as_str().into())
        .into_result()
        .map_err(|e| anyhow!("tokenizer: {e}"))?
        .into_vec();
    if args.json {
        return super::print_json(&serde_json::json!({
            "ids": ids,
            "tokens": ids.len(),
            "eot_id": tokenizer.eot_id(),
            "vocab_size": tokenizer.vocab_size(),
        }));
    }
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    writeln!(std::io::stdout().lock(), "{}", line.join(" "))?;
    Ok(())
}
