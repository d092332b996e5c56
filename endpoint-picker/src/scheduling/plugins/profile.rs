//! Profile handlers.

use super::scorers::plugin_named;
use crate::request::InferenceRequest;
use crate::scheduling::framework::{Plugin, ProfileHandler};
use crate::scheduling::{Profile, ProfileResult};

/// `single-profile-handler`: runs the one profile once; it is primary.
#[derive(Debug)]
pub struct SingleProfileHandler {
    /// Configured name.
    pub name: String,
}
plugin_named!(SingleProfileHandler, "single-profile-handler");

impl ProfileHandler for SingleProfileHandler {
    fn next_profiles<'p>(
        &self,
        _: &InferenceRequest,
        profiles: &'p [Profile],
        done: &[ProfileResult],
    ) -> Vec<&'p Profile> {
        if done.is_empty() {
            profiles.iter().take(1).collect()
        } else {
            Vec::new()
        }
    }
}
