//! The built-in plugins.

pub mod compat;
pub mod cost;
pub mod filters;
pub mod p2p;
pub mod pickers;
pub mod precise;
pub mod prefix;
pub mod profile;
pub mod response;
pub mod scorers;
pub mod session;

#[cfg(test)]
mod props;

#[cfg(test)]
pub(crate) mod test_util {
    use crate::config::ConfigError;
    use crate::config::params::Params;
    use crate::datastore::{Datastore, EngineMetrics, test_util::pool};
    use crate::scheduling::Candidate;

    /// What `build` makes of the YAML `parameters` of a plugin of type `type_name`, and the
    /// warnings it gave.
    pub fn build_from_yaml<T>(
        type_name: &str,
        parameters: &str,
        build: impl FnOnce(&mut Params<'_>) -> Result<T, ConfigError>,
    ) -> Result<(T, Vec<String>), ConfigError> {
        let value: yaml_serde::Value = yaml_serde::from_str(parameters).unwrap();
        let mut warnings = Vec::new();
        let built = build(&mut Params::new(
            "p",
            type_name,
            Some(&value),
            &mut warnings,
        ))?;
        Ok((built, warnings))
    }

    /// Metrics with the given queue, running and KV values.
    pub fn metrics(waiting: u64, running: u64, kv: f64) -> EngineMetrics {
        EngineMetrics {
            waiting_queue_size: waiting,
            running_requests: running,
            kv_cache_usage: kv,
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        }
    }

    /// Candidates `pod-1…pod-n` carrying the given metrics.
    pub fn candidates(ms: &[EngineMetrics]) -> Vec<Candidate> {
        let ds = Datastore::new();
        let snap = ds.apply(pool(ms.len() as u8));
        snap.endpoints
            .iter()
            .zip(ms)
            .map(|(e, m)| {
                e.store_metrics(m.clone());
                Candidate::new(e.clone())
            })
            .collect()
    }
}
