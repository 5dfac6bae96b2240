//! Parameter roles as they are spelled in optimizer parameters (`"bias"`, `"norm"`, ...).
//!
//! A serde enum of its own, so an unknown role is a parse error listing the valid ones,
//! mapped onto the plugin API's [`ParamRole`].

use codex_plugin_api::ParamRole;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Copy, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    Weight,
    Bias,
    Norm,
    Embedding,
}

impl Role {
    pub(crate) fn matches(self, role: ParamRole) -> bool {
        let mine = match self {
            Role::Weight => ParamRole::Weight,
            Role::Bias => ParamRole::Bias,
            Role::Norm => ParamRole::Norm,
            Role::Embedding => ParamRole::Embedding,
        };
        mine == role
    }
}
