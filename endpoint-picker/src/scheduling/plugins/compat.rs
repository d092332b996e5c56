//! Parameters of the types accepted only so that reference configs load: they build nothing
//! here (the registry's inert entries say why), but their parameters are checked as the
//! reference checks them, so that a config failing there fails here too.

use serde::Deserialize;

use crate::config::ConfigError;
use crate::config::params::Params;

/// `inflight-load-producer` parameters. They shape its token counts, which nothing reads here:
/// `concurrency-detector` counts uncached prompt tokens itself, and `token-load-scorer` is not
/// implemented.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InFlightLoadYaml {
    #[serde(rename = "addEstimatedOutputTokens")]
    _add_estimated_output_tokens: Option<bool>,
    output_ratio: Option<f64>,
    max_estimated_output_tokens: Option<i64>,
    #[serde(rename = "prefixMatchInfoProducerName")]
    _prefix_match_info_producer_name: Option<String>,
    #[serde(rename = "syncCrossReplicaState")]
    _sync_cross_replica_state: Option<bool>,
}

/// `k8s-notification-source` parameters: the kind of object to watch.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationSourceYaml {
    #[serde(rename = "group")]
    _group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
}

/// Checks `inflight-load-producer` parameters.
pub fn inflight_load_producer(p: &mut Params<'_>) -> Result<(), ConfigError> {
    let y: InFlightLoadYaml = p.decode()?;
    if y.output_ratio.is_some_and(|r| r.is_nan() || r < 0.0) {
        return Err(p.invalid("outputRatio", "must be ≥ 0"));
    }
    p.non_negative("maxEstimatedOutputTokens", y.max_estimated_output_tokens)?;
    Ok(())
}

/// Checks `k8s-notification-source` parameters: `version` and `kind` are required.
pub fn k8s_notification_source(p: &mut Params<'_>) -> Result<(), ConfigError> {
    let y: NotificationSourceYaml = p.decode()?;
    if y.version.as_deref().is_none_or(str::is_empty) {
        return Err(p.invalid("version", "required"));
    }
    if y.kind.as_deref().is_none_or(str::is_empty) {
        return Err(p.invalid("kind", "required"));
    }
    Ok(())
}
