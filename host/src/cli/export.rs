//! `codex-ml export`: a checkpoint as a Hugging Face model directory (`crate::hf::export`).

use std::io::Write as _;

use anyhow::Result;
use codex_plugin_api::DType;

use super::ExportArgs;
use crate::hf::{self, ExportOptions};
use crate::inference;
use crate::run::Latest;

/// Export a run's newest valid checkpoint (or a named checkpoint).
pub fn export(args: ExportArgs) -> Result<()> {
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    let target = super::run_target(&args.target, Latest::WithCheckpoint)?;
    let loaded = inference::load(&target, &registry)?;
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    if args.adapter {
        let exported = crate::adapter::peft::export(&loaded, &args.out, dtype)?;
        super::say!("checkpoint {}", loaded.checkpoint.display());
        if args.json {
            return super::print_json(&serde_json::json!({
                "checkpoint": loaded.checkpoint,
                "out": exported.dir,
                "dtype": args.dtype,
                "tensors": exported.tensors,
                "bytes": exported.bytes,
            }));
        }
        writeln!(
            std::io::stdout().lock(),
            "exported the adapter to {} ({} tensors, {:.1} MB, {})",
            exported.dir.display(),
            exported.tensors,
            exported.bytes as f64 / 1e6,
            args.dtype
        )?;
        return Ok(());
    }
    if args.merge && loaded.config.adapter.is_none() {
        anyhow::bail!(
            "{}: the run trained the whole model, so there is no adapter to merge; export it \
             without --merge",
            loaded.checkpoint.display()
        );
    }
    let options = ExportOptions {
        dtype,
        max_shard_bytes: args.max_shard_size,
        merge: args.merge,
    };
    let exported = hf::export(&loaded, &args.out, &options)?;
    super::say!("checkpoint {}", loaded.checkpoint.display());
    if args.json {
        return super::print_json(&serde_json::json!({
            "checkpoint": loaded.checkpoint,
            "out": exported.dir,
            "dtype": args.dtype,
            "weight_files": exported.weight_files,
            "bytes": exported.bytes,
        }));
    }
    writeln!(
        std::io::stdout().lock(),
        "exported to {} ({} weight file{}, {:.1} MB, {})",
        exported.dir.display(),
        exported.weight_files.len(),
        if exported.weight_files.len() == 1 {
            ""
        } else {
            "s"
        },
        exported.bytes as f64 / 1e6,
        args.dtype
    )?;
    Ok(())
}
