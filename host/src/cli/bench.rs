//! `codex-ml bench`.

use super::BenchArgs;

/// Run `codex-ml bench`.
pub fn bench(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`codex-ml bench` is not available in this build")
}
