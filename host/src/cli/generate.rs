//! `codex-ml generate`: continue a prompt with a trained model.

use std::io::Write as _;

use anyhow::Result;

use super::GenerateArgs;
use crate::inference::sampling::Sampling;
use crate::inference::{self, GenerateOptions};

/// Print a continuation of the prompt; the same seed gives the same text.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    let loaded = inference::load(&args.target, &registry)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k.unwrap_or(0),
            top_p: args.top_p.unwrap_or(1.0),
        },
        seed: args.seed.unwrap_or(loaded.config.seed),
    };
    let text = inference::generate(
        &loaded.model,
        &loaded.tokenizer,
        &loaded.device,
        &args.prompt,
        &options,
    )?;
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}
