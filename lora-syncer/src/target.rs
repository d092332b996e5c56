//! Which engine the syncer calls, and whether its API key goes with the calls.
//!
//! The engine is the operator's (`--engine-host`, `--engine-port`), not the config file's. The
//! file is a ConfigMap, which is commonly writable by more people than can read the Secret that
//! holds the engine's API key; were its `host`/`port` followed, anyone able to edit it could
//! have the key sent to a server of theirs, or aim loads and unloads at another team's engine.
//!
//! So a file's `host`/`port` are only checked against the pinned engine. Upstream's files
//! (gateway-api-inference-extension `tools/dynamic-lora-sidecar`, which reads `host` from the
//! file, default `localhost`) name the engine beside the sidecar, so a file that names the
//! pinned engine is accepted, any loopback spelling included (`localhost`, `127.0.0.1`, `::1`
//! for a loopback pin). A file naming another engine has its `host`/`port` refused and its
//! adapter lists applied to the pinned engine: the lists are what the file's editor may decide
//! anyway, and the file is mounted next to this engine by the operator. With
//! [`ConfigHost::Follow`] (`--allow-config-host`) the file's engine is called, as upstream does,
//! but the key goes only to loopback or to the pinned host, unless
//! [`ConfigHost::FollowWithKey`] (`--api-key-to-config-host`) says it may go anywhere.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::LoraConfig;
use crate::engine::{CALL_TIMEOUT, Engine, Engines};

/// What a config file's `host`/`port` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigHost {
    /// Ignored unless they name the pinned engine (the default).
    #[default]
    Refuse,
    /// Followed; the key goes only to loopback hosts and the pinned host.
    Follow,
    /// Followed; the key goes to whatever host the file names.
    FollowWithKey,
}

/// The engine the operator pinned, the key, and what a config file may change of them.
#[derive(Clone)]
pub struct EngineTarget {
    host: String,
    port: u16,
    config_host: ConfigHost,
    api_key: Option<Arc<str>>,
}

// By hand: whether there is a key, never the key (a `?target` in a log line would print it).
impl std::fmt::Debug for EngineTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("config_host", &self.config_host)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where one config's calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The host called.
    pub host: String,
    /// The port called.
    pub port: u16,
    /// The API key goes with the calls.
    pub with_key: bool,
    /// The engine the config names, `host:port`.
    pub named: String,
    /// The config named another engine than the pinned one, and it was refused: the pinned
    /// one is called.
    pub refused: bool,
    /// The config's engine is followed but not trusted with the key there is.
    pub key_withheld: bool,
}

impl Resolved {
    /// The same engine called the same way (what the config named aside).
    pub fn same_engine(&self, other: &Resolved) -> bool {
        (&self.host, self.port, self.with_key) == (&other.host, other.port, other.with_key)
    }

    /// `host:port`, as a URL spells it.
    pub fn address(&self) -> String {
        address(&self.host, self.port)
    }
}

fn address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host` without IPv6 brackets, lower case: the spellings a resolver treats as one. A final
/// dot is kept: `name.` is looked up as is, `name` may go through the search domains, so
/// they can be different hosts.
fn normal(host: &str) -> String {
    host.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// `localhost` or a loopback address (an IPv4-mapped one included). Names under
/// `.localhost`, and `localhost.`, are not: outside `/etc/hosts` they may go to the cluster's
/// DNS, which may answer anything.
fn is_loopback(host: &str) -> bool {
    let host = normal(host);
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn same_host(a: &str, b: &str) -> bool {
    let (a, b) = (normal(a), normal(b));
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
        _ => a == b,
    }
}

impl EngineTarget {
    /// The engine at `host:port`, without a key; a config's `host`/`port` refused unless they
    /// name it.
    pub fn pinned(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            config_host: ConfigHost::Refuse,
            api_key: None,
        }
    }

    /// Sends `key` as a bearer token (vLLM's and SGLang's `--api-key` refuse every path under
    /// `/v1` without it), to the engines [`EngineTarget::resolve`] allows.
    pub fn with_api_key(mut self, key: Option<Arc<str>>) -> Self {
        self.api_key = key;
        self
    }

    /// What a config's `host`/`port` may do.
    pub fn with_config_host(mut self, config_host: ConfigHost) -> Self {
        self.config_host = config_host;
        self
    }

    /// The pinned engine, `host:port`.
    pub fn address(&self) -> String {
        address(&self.host, self.port)
    }

    /// The config names the pinned engine: the same port, and the same host or, for a
    /// loopback pin, any loopback host (the same engine beside the sidecar).
    pub fn names_pinned(&self, config: &LoraConfig) -> bool {
        config.port == self.port
            && (same_host(&config.host, &self.host)
                || (is_loopback(&config.host) && is_loopback(&self.host)))
    }

    /// Where `config`'s calls go, and whether the key goes with them.
    pub fn resolve(&self, config: &LoraConfig) -> Resolved {
        let named = address(&config.host, config.port);
        let pinned = self.names_pinned(config);
        if pinned || self.config_host == ConfigHost::Refuse {
            return Resolved {
                host: self.host.clone(),
                port: self.port,
                with_key: self.api_key.is_some(),
                named,
                refused: !pinned,
                key_withheld: false,
            };
        }
        // Followed. The pinned host is the operator's choice, loopback is this pod (or this
        // node, with host networking); anything else needs the operator's explicit word.
        let trusted = self.config_host == ConfigHost::FollowWithKey
            || is_loopback(&config.host)
            || same_host(&config.host, &self.host);
        Resolved {
            host: config.host.clone(),
            port: config.port,
            with_key: self.api_key.is_some() && trusted,
            named,
            refused: false,
            key_withheld: self.api_key.is_some() && !trusted,
        }
    }

    /// A client for `at` (from [`EngineTarget::resolve`]), with the key if `at` allows it.
    pub fn engine(&self, at: &Resolved) -> Engine {
        let key = if at.with_key {
            self.api_key.clone()
        } else {
            None
        };
        Engines::new(CALL_TIMEOUT)
            .with_api_key(key)
            .at(&at.host, at.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(host: &str, port: u16) -> LoraConfig {
        let text = format!("vLLMLoRAConfig:\n  host: \"{host}\"\n  port: {port}\n");
        crate::config::parse(&text, true).unwrap()
    }

    fn keyed(host: &str, port: u16, config_host: ConfigHost) -> EngineTarget {
        EngineTarget::pinned(host, port)
            .with_api_key(Some(Arc::from("k")))
            .with_config_host(config_host)
    }

    #[test]
    fn loopback_spellings_name_a_loopback_pin() {
        let t = keyed("localhost", 8000, ConfigHost::Refuse);
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            let at = t.resolve(&config(host, 8000));
            assert!(!at.refused, "{host}");
            assert_eq!(
                (at.host.as_str(), at.port, at.with_key),
                ("localhost", 8000, true)
            );
        }
        // Not loopback: the cluster's DNS, or another machine.
        for host in [
            "localhost.",
            "vllm.localhost",
            "0.0.0.0",
            "10.0.0.7",
            "vllm.other.svc",
        ] {
            assert!(t.resolve(&config(host, 8000)).refused, "{host}");
        }
        let pinned = keyed("vllm.ns.svc", 8000, ConfigHost::Refuse);
        assert!(!pinned.resolve(&config("VLLM.ns.svc", 8000)).refused);
        assert!(pinned.resolve(&config("vllm.ns.svc.", 8000)).refused);
        assert!(pinned.resolve(&config("localhost", 8000)).refused);
    }

    /// Refused: the pinned engine is called, with its key, whatever the file names.
    #[test]
    fn another_engine_is_refused_by_default() {
        let t = keyed("localhost", 8000, ConfigHost::Refuse);
        for (host, port) in [
            ("10.0.0.7", 8000),
            ("localhost", 9000),
            ("evil.example", 80),
        ] {
            let at = t.resolve(&config(host, port));
            assert_eq!(
                (at.host.as_str(), at.port, at.with_key),
                ("localhost", 8000, true)
            );
            assert!(at.refused && !at.key_withheld);
            assert_eq!(at.named, address(host, port));
        }
        assert_eq!(t.resolve(&config("fd00::1", 8001)).named, "[fd00::1]:8001");
    }

    /// Followed: loopback and the pinned host get the key, other hosts only with
    /// `FollowWithKey`.
    #[test]
    fn a_followed_host_gets_the_key_only_if_loopback_pinned_or_allowed() {
        let follow = keyed("vllm.ns.svc", 8000, ConfigHost::Follow);
        let with_key = |host: &str, port: u16| {
            let at = follow.resolve(&config(host, port));
            assert_eq!((at.host.as_str(), at.port), (host, port));
            assert!(!at.refused);
            assert_eq!(at.key_withheld, !at.with_key);
            at.with_key
        };
        assert!(with_key("127.0.0.1", 9000));
        assert!(with_key("localhost", 8001));
        assert!(with_key("vllm.ns.svc", 9000));
        assert!(!with_key("10.0.0.7", 8000));
        assert!(!with_key("other.team.svc", 8000));
        let anywhere = keyed("localhost", 8000, ConfigHost::FollowWithKey);
        assert!(anywhere.resolve(&config("10.0.0.7", 8000)).with_key);
        // No key, nothing sent, whatever the policy.
        let keyless = EngineTarget::pinned("localhost", 8000).with_config_host(ConfigHost::Follow);
        let at = keyless.resolve(&config("10.0.0.7", 8000));
        assert!(!at.with_key && !at.key_withheld);
    }

    #[test]
    fn debug_output_does_not_show_the_key() {
        let text = format!("{:?}", keyed("localhost", 8000, ConfigHost::Refuse));
        assert!(
            text.contains("<redacted>") && !text.contains("\"k\""),
            "{text}"
        );
    }
}
