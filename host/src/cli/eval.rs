//! `codex-ml eval`.

use super::EvalArgs;

/// Run `codex-ml eval`.
pub fn eval(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`codex-ml eval` is not available in this build")
}
