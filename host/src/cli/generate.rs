//! `codex-ml generate`: continue a prompt with a trained model.

use std::io::Write as _;

use anyhow::Result;

use super::GenerateArgs;
use crate::inference::sampling::Sampling;
use crate::inference::{self, GenerateOptions};
use crate::run::Latest;

/// Print a continuation of the prompt; the same seed gives the same text.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    let target = super::run_target(&args.target, Latest::WithCheckpoint)?;
    let loaded = inference::load(&target, &registry)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k.unwrap_or(0),
            top_p: args.top_p.unwrap_or(1.0),
        },
        seed: args.seed.unwrap_or(loaded.config.seed),
    };
    // In the run's kernel and precision, as the sample at the end of the run was made.
    let _kernel = inference::kernel(&loaded, &registry)?;
    let generated = inference::generate(
        &loaded.model,
        &loaded.tokenizer,
        &loaded.device,
        &args.prompt,
        &options,
    )?;
    if args.json {
        return super::print_json(&serde_json::json!({
            "checkpoint": loaded.checkpoint,
            "prompt": args.prompt,
            "completion": generated.completion,
            "text": generated.text,
            "tokens": generated.tokens,
            "end_of_text": generated.end_of_text,
            "seed": options.seed,
        }));
    }
    writeln!(std::io::stdout().lock(), "{}", generated.text)?;
    Ok(())
}
