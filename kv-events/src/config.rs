//! vLLM's `--kv-events-config` JSON (`vllm/config/kv_events.py`, `KVEventsConfig`), with
//! vLLM's defaults; the simulator takes the same flag.

use serde::Deserialize;

/// Batches kept for replay, at most (vLLM's default is 10,000; this bounds a typo's memory).
pub const MAX_BUFFER_STEPS: usize = 1_000_000;
/// Batches queued for the publisher, at most.
pub const MAX_QUEUE_SIZE: usize = 1_000_000;
/// Bytes in the JSON text, at most.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// Which publisher an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherKind {
    /// None: events are dropped.
    Null,
    /// ZMQ PUB (plus the replay ROUTER).
    Zmq,
}

/// `KVEventsConfig` as vLLM reads it from `--kv-events-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsConfig {
    /// Whether the engine publishes events at all (default false).
    pub enable_kv_cache_events: bool,
    /// `zmq` when enabled and unset, else `null`.
    pub publisher: PublisherKind,
    /// Where the PUB socket binds or connects (default `tcp://*:5557`; see [`Self::binds`]).
    pub endpoint: String,
    /// Where the replay ROUTER binds (default none: no replay).
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay (default 10,000).
    pub buffer_steps: usize,
    /// ZMQ high-water mark of the PUB socket (default 100,000).
    pub hwm: usize,
    /// Batches queued between the engine and the publisher (default 100,000).
    pub max_queue_size: usize,
    /// The topic of every message (default empty).
    pub topic: String,
}

/// Why a `--kv-events-config` is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or not `KVEventsConfig`'s fields (unknown fields are refused, as vLLM does).
    #[error("invalid --kv-events-config: {0}")]
    Json(#[from] serde_json::Error),
    /// A value out of range.
    #[error("invalid --kv-events-config: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    enable_kv_cache_events: bool,
    #[serde(default)]
    publisher: Option<PublisherKind>,
    #[serde(default = "default_endpoint")]
    endpoint: String,
    #[serde(default)]
    replay_endpoint: Option<String>,
    #[serde(default = "default_buffer_steps")]
    buffer_steps: usize,
    #[serde(default = "default_hwm")]
    hwm: usize,
    #[serde(default = "default_max_queue_size")]
    max_queue_size: usize,
    #[serde(default)]
    topic: String,
}

fn default_endpoint() -> String {
    "tcp://*:5557".to_owned()
}
fn default_buffer_steps() -> usize {
    10_000
}
fn default_hwm() -> usize {
    100_000
}
fn default_max_queue_size() -> usize {
    100_000
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self::from_raw(Raw {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: default_endpoint(),
            replay_endpoint: None,
            buffer_steps: default_buffer_steps(),
            hwm: default_hwm(),
            max_queue_size: default_max_queue_size(),
            topic: String::new(),
        })
    }
}

// === impl KvEventsConfig ===

impl KvEventsConfig {
    /// Parses the flag's JSON text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid(format!(
                "{} bytes, more than {MAX_CONFIG_BYTES}",
                text.len()
            )));
        }
        // serde would also take a JSON array as the fields in order; vLLM takes an object.
        if !text.trim_start().starts_with('{') {
            return Err(ConfigError::Invalid("not a JSON object".to_owned()));
        }
        let config = Self::from_raw(serde_json::from_str(text)?);
        config.validate()?;
        Ok(config)
    }

    fn from_raw(raw: Raw) -> Self {
        Self {
            publisher: raw.publisher.unwrap_or(if raw.enable_kv_cache_events {
                PublisherKind::Zmq
            } else {
                PublisherKind::Null
            }),
            enable_kv_cache_events: raw.enable_kv_cache_events,
            endpoint: raw.endpoint,
            replay_endpoint: raw.replay_endpoint,
            buffer_steps: raw.buffer_steps,
            hwm: raw.hwm,
            max_queue_size: raw.max_queue_size,
            topic: raw.topic,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.buffer_steps > MAX_BUFFER_STEPS {
            return Err(ConfigError::Invalid(format!(
                "buffer_steps {} is more than {MAX_BUFFER_STEPS}",
                self.buffer_steps
            )));
        }
        if self.max_queue_size == 0 || self.max_queue_size > MAX_QUEUE_SIZE {
            return Err(ConfigError::Invalid(format!(
                "max_queue_size {} is not in 1..={MAX_QUEUE_SIZE}",
                self.max_queue_size
            )));
        }
        if self.endpoint.is_empty() {
            return Err(ConfigError::Invalid("endpoint is empty".to_owned()));
        }
        Ok(())
    }

    /// Whether events are published: enabled, with the ZMQ publisher (vLLM's
    /// `EventPublisherFactory.create`).
    pub fn publishes(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == PublisherKind::Zmq
    }

    /// Whether the PUB socket binds (else it connects), by vLLM's rule: an endpoint with a
    /// wildcard (`*`), an IPv6 `::`, or an `ipc://` / `inproc://` one binds.
    pub fn binds(&self) -> bool {
        endpoint_binds(&self.endpoint)
    }
}

/// vLLM's bind-or-connect rule for a PUB endpoint ([`KvEventsConfig::binds`]).
pub fn endpoint_binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vllms() {
        let c = KvEventsConfig::from_json("{}").unwrap();
        assert_eq!(c, KvEventsConfig::default());
        assert!(!c.enable_kv_cache_events);
        assert_eq!(c.publisher, PublisherKind::Null);
        assert_eq!(c.endpoint, "tcp://*:5557");
        assert_eq!(c.replay_endpoint, None);
        assert_eq!(
            (c.buffer_steps, c.hwm, c.max_queue_size),
            (10_000, 100_000, 100_000)
        );
        assert_eq!(c.topic, "");
        assert!(!c.publishes());
    }

    #[test]
    fn enabling_picks_zmq_unless_told_otherwise() {
        let c = KvEventsConfig::from_json(r#"{"enable_kv_cache_events": true}"#).unwrap();
        assert_eq!(c.publisher, PublisherKind::Zmq);
        assert!(c.publishes());
        let c = KvEventsConfig::from_json(
            r#"{"enable_kv_cache_events": true, "publisher": "null", "topic": "kv@a@b",
                "endpoint": "tcp://10.0.0.1:5557", "replay_endpoint": "tcp://*:5558",
                "buffer_steps": 5, "hwm": 7, "max_queue_size": 9}"#,
        )
        .unwrap();
        assert!(!c.publishes());
        assert_eq!(c.topic, "kv@a@b");
        assert_eq!(c.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert_eq!((c.buffer_steps, c.hwm, c.max_queue_size), (5, 7, 9));
        assert!(!c.binds());
    }

    #[test]
    fn refuses_unknown_fields_and_bad_values() {
        for bad in [
            r#"{"enable_kv_cache_event": true}"#,
            r#"{"publisher": "kafka"}"#,
            r#"{"buffer_steps": -1}"#,
            r#"{"buffer_steps": 100000000}"#,
            r#"{"max_queue_size": 0}"#,
            r#"{"endpoint": ""}"#,
            "[]",
        ] {
            assert!(KvEventsConfig::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bind_or_connect_follows_vllm() {
        for e in [
            "tcp://*:5557",
            "tcp://[::]:5557",
            "ipc:///tmp/kv",
            "inproc://kv",
        ] {
            assert!(endpoint_binds(e), "{e}");
        }
        for e in ["tcp://127.0.0.1:5557", "tcp://epp.ns.svc:5557"] {
            assert!(!endpoint_binds(e), "{e}");
        }
    }
}
