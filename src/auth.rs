//! Who may pull and push. Without an `[auth]` section regmirror is an open registry, as
//! distribution is by default.

use crate::registry::names::RepoName;
use crate::registry::Ctx;

#[derive(Default)]
pub struct Access {}

impl Access {
    pub fn may_pull(&self, _ctx: &Ctx, _repo: &RepoName) -> bool {
        true
    }
}
