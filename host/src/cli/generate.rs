//! `codex-ml generate`.

use super::GenerateArgs;

/// Run `codex-ml generate`.
pub fn generate(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`codex-ml generate` is not available in this build")
}
