//! Dropout whose masks replay: one seed per dropout site, mixed from the forward call's seed.
//!
//! The host draws a dropout mask from the seed it is given, the same on every machine. The
//! trainer gives every forward call its own seed ([`ForwardCtx::seed`], a function of run seed,
//! step and micro-step), so a resumed run draws the same masks; a model with several dropout
//! sites numbers them and mixes each number into the call's seed with [`site_seed`], so the
//! sites' masks differ from each other yet a step replays exactly. The mix is part of the
//! numbers a run produces: changing it changes every run with dropout, so it never changes.

use codex_plugin_api::{ForwardCtx, Result, Tensor};

/// SplitMix64's finaliser: a bijective 64-bit mix, so nearby inputs give unrelated outputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of dropout site number `site` in a forward call seeded with `call_seed`.
pub fn site_seed(call_seed: u64, site: u64) -> u64 {
    mix64(call_seed ^ mix64(site.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Inverted dropout with probability `p` at site number `site` while training; `x` itself when
/// not training or when `p` is 0.
///
/// Ops: `dropout(x, p, site_seed(ctx.seed, site))`, or none.
pub fn dropout(x: Tensor, p: f64, ctx: ForwardCtx, site: u64) -> Result<Tensor> {
    if ctx.train && p > 0.0 {
        x.dropout(p, site_seed(ctx.seed, site))
    } else {
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    /// The mix is pinned: a change would silently change every run that uses dropout.
    #[test]
    fn site_seeds_are_pinned() {
        assert_eq!(site_seed(0, 0), 0x4821_8226_ff3c_d4bf);
        assert_eq!(site_seed(7, 3), 0x59f0_a990_a364_d3fd);
    }

    #[test]
    fn dropout_acts_only_while_training_with_a_positive_p() {
        let train = ForwardCtx {
            train: true,
            seed: 7,
        };
        let eval = ForwardCtx {
            train: false,
            seed: 7,
        };
        let t = trace(|_| {
            dropout(input("x"), 0.1, train, 3)?;
            dropout(input("x"), 0.0, train, 3)?;
            dropout(input("x"), 0.1, eval, 3)?;
            Ok(())
        });
        check(
            &t,
            &format!("dropout(x, 0.1, {:#x}) -> %1", site_seed(7, 3)),
        );
    }
}
