//! `codex-ml eval`: loss, perplexity and token accuracy of a checkpoint.

use std::io::Write as _;

use anyhow::{bail, Result};

use super::EvalArgs;
use crate::data::{self, BatchShape, Source, ValBatches};
use crate::inference;
use crate::run::Latest;

/// Evaluate a run's newest valid checkpoint (or a named checkpoint).
pub fn eval(args: EvalArgs) -> Result<()> {
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    let target = super::run_target(&args.target, Latest::WithCheckpoint)?;
    let loaded = inference::load(&target, &registry)?;
    let config = &loaded.config;
    let sft = config.data.is_sft();
    let docs = if args.data.is_empty() {
        let split = data::load_documents(&config.data, &config.dir)?;
        if split.val.is_empty() {
            bail!(
                "the run has no validation documents; pass --data FILE_OR_GLOB to evaluate on other files"
            );
        }
        split.val
    } else if sft {
        // Supervised fine-tuning runs read other files as they read their training sources.
        let cwd = std::env::current_dir()?;
        let sources: Vec<Source> = args
            .data
            .iter()
            .map(|path| sft_source_like(&config.data.train[0], path))
            .collect();
        data::read_sources(&sources, &cwd, &config.data.read_settings())?.documents
    } else {
        let cwd = std::env::current_dir()?;
        let sources = [Source::Text {
            paths: args.data.clone(),
            exclude: Vec::new(),
        }];
        let read = data::read_sources(&sources, &cwd, &config.data.read_settings())?;
        data::preprocess(read.documents, &config.data.preprocess)
    };
    let shape = BatchShape {
        batch_size: config.train.batch_size,
        seq_len: config.train.seq_len,
    };
    let pad = data::pad_id(&loaded.tokenizer);
    let val = if sft {
        let dir = data::sft::tokenizer_dir(&config.tokenizer.name, &config.tokenizer.params);
        let encoder = data::SftEncoder::restored(
            &config.data,
            &loaded.tokenizer,
            dir.as_deref(),
            &loaded.checkpoint,
        )?;
        let fingerprint = data::TokenizerFingerprint::of(
            &loaded.tokenizer,
            &config.tokenizer.name,
            &config.tokenizer.params_json(),
        )?;
        let cache = data::TokenCache::new(data::cache_dir(&config.data, &config.dir)?);
        let rows = data::sft_rows(
            "eval",
            &docs,
            &encoder,
            &fingerprint,
            &cache,
            config.train.seq_len,
            config.data.sft.overlong,
        )?;
        ValBatches::examples(rows.tokens, rows.rows, shape, pad, config.data.sft.packing)?
    } else {
        let tokens = data::tokenize(&docs, &loaded.tokenizer)?;
        ValBatches::new(tokens.into(), shape, pad)?
    };
    // In the run's kernel and precision, on the pool as the run's own validation was.
    let _kernel = inference::kernel(&loaded, &registry)?;
    let totals = codex_engine::on_pool(|| {
        inference::evaluate(&loaded.model, &val, &loaded.device, args.batches)
    })?;
    super::say!("checkpoint {}", loaded.checkpoint.display());
    if args.json {
        return super::print_json(&serde_json::json!({
            "checkpoint": loaded.checkpoint,
            "data": if args.data.is_empty() { None } else { Some(&args.data) },
            "loss": totals.loss(),
            "perplexity": totals.perplexity(),
            "accuracy": totals.accuracy(),
            "tokens": totals.tokens as u64,
            "batches": totals.batches,
        }));
    }
    writeln!(
        std::io::stdout().lock(),
        "loss {:.4}  perplexity {:.3}  accuracy {:.4}  tokens {}  batches {}",
        totals.loss(),
        totals.perplexity(),
        totals.accuracy(),
        totals.tokens as u64,
        totals.batches
    )?;
    Ok(())
}

/// A source of the same kind and fields as the run's training source `like`, reading `path`.
fn sft_source_like(like: &Source, path: &str) -> Source {
    let path = path.to_string();
    match like {
        Source::PromptCompletion {
            prompt, completion, ..
        } => Source::PromptCompletion {
            path,
            prompt: prompt.clone(),
            completion: completion.clone(),
        },
        Source::Chat { field, .. } => Source::Chat {
            path,
            field: field.clone(),
        },
        _ => Source::Chat {
            path,
            field: "messages".to_string(),
        },
    }
}
