//! `codex-ml run`.

use super::RunArgs;

/// Run `codex-ml run`.
pub fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("`codex-ml run` is not available in this build")
}
