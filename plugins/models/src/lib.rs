//! Built-in models, written only against `codex-plugin-api`.
//!
//! They use exactly the tensor handles, op table and authoring traits a third-party plugin
//! uses, which is what proves that API complete: nothing here links the tensor engine.

#![warn(missing_docs, unreachable_pub)]

mod gpt2;
mod llama;

pub use gpt2::Gpt2;
pub use llama::Llama;

/// The model's vocabulary size: `vocab_size` as given, else the tokenizer's; never smaller
/// than the tokenizer's (its ids would index past the embedding) and never empty.
fn vocab_size(given: Option<usize>, tokenizer_vocab: usize) -> codex_plugin_api::Result<usize> {
    use codex_plugin_api::strict::invalid;
    let vocab_size = match given {
        None => tokenizer_vocab,
        Some(v) if v < tokenizer_vocab => {
            return Err(invalid(
                "vocab_size",
                format!(
                    "must be at least the tokenizer's vocabulary size ({tokenizer_vocab}), \
                     found {v}; leave it out to use the tokenizer's"
                ),
            ))
        }
        Some(v) => v,
    };
    if vocab_size == 0 {
        return Err(invalid(
            "vocab_size",
            "must be at least 1, found 0 (the tokenizer has an empty vocabulary)",
        ));
    }
    Ok(vocab_size)
}

codex_plugin_api::builtin!(codex_plugin_api::model::declare::<Gpt2>);
codex_plugin_api::builtin!(codex_plugin_api::model::declare::<Llama>);
