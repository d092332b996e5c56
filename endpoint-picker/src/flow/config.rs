//! Flow control's settings once loaded: what the `flowControl` section and its policy plugins
//! say, validated, with the reference's defaults filled in (see `config::flow_control` for the
//! loading, and the README's "Flow control" section for the table of names).

use std::sync::Arc;
use std::time::Duration;

use super::policy::{FairnessPolicy, OrderingPolicy, UsageLimitPolicy};

/// A band's default request cap (`maxRequests` omitted or 0).
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5_000;
/// A band's default byte cap (`maxBytes` omitted or 0).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// `defaultRequestTTL` when omitted.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// How long an idle band made on demand (not listed in `priorityBands`) is kept (the
/// reference's dynamic band GC: twice its 5-minute flow GC).
pub const DYNAMIC_BAND_IDLE: Duration = Duration::from_secs(600);
/// How often the dispatcher runs a cycle while anything is queued (the reference's ticker).
pub const DISPATCH_TICK: Duration = Duration::from_millis(1);

/// Flow control as configured.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// Global cap on queued body bytes (0 = unlimited).
    pub max_bytes: u64,
    /// Global cap on queued requests (0 = unlimited).
    pub max_requests: u64,
    /// Wait budget while the pool has endpoints (`None` = no TTL).
    pub request_ttl: Option<Duration>,
    /// Wait budget while the pool has none (`None` = wait until an endpoint comes).
    pub no_endpoint_ttl: Option<Duration>,
    /// Template of bands made on demand for priorities ≥ 0.
    pub default_band: BandConfig,
    /// Template of bands made on demand for priorities < 0.
    pub default_negative_band: BandConfig,
    /// Bands provisioned at start (always including priority 0), highest first.
    pub bands: Vec<BandConfig>,
    /// Ceilings per band.
    pub usage_limit: Arc<UsageLimitPolicy>,
    /// `enableEviction`: a request that does not fit the global caps displaces queued
    /// sheddable requests of lower priority (lowest priority first, newest first).
    pub eviction: bool,
}

/// One band's settings.
#[derive(Debug, Clone)]
pub struct BandConfig {
    /// Its priority.
    pub priority: i32,
    /// Cap on its queued requests (> 0).
    pub max_requests: u64,
    /// Cap on its queued body bytes (> 0).
    pub max_bytes: u64,
    /// Its fairness policy, and the plugin name it was configured under.
    pub fairness: (Arc<str>, FairnessPolicy),
    /// Its ordering policy, and the plugin name.
    pub ordering: (Arc<str>, OrderingPolicy),
}

impl Default for BandConfig {
    fn default() -> Self {
        Self {
            priority: 0,
            max_requests: DEFAULT_BAND_MAX_REQUESTS,
            max_bytes: DEFAULT_BAND_MAX_BYTES,
            fairness: (
                Arc::from("global-strict-fairness-policy"),
                FairnessPolicy::GlobalStrict,
            ),
            ordering: (Arc::from("fcfs-ordering-policy"), OrderingPolicy::Fcfs),
        }
    }
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            max_bytes: 0,
            max_requests: 0,
            request_ttl: Some(DEFAULT_REQUEST_TTL),
            no_endpoint_ttl: Some(DEFAULT_REQUEST_TTL),
            default_band: BandConfig::default(),
            default_negative_band: BandConfig::default(),
            bands: vec![BandConfig::default()],
            usage_limit: Arc::new(UsageLimitPolicy::Static { threshold: 1.0 }),
            eviction: false,
        }
    }
}

impl FlowConfig {
    /// The band template for `priority`.
    pub fn template(&self, priority: i32) -> BandConfig {
        let t = if priority < 0 {
            &self.default_negative_band
        } else {
            &self.default_band
        };
        BandConfig {
            priority,
            ..t.clone()
        }
    }
}

/// A Kubernetes `resource.Quantity` (`"1k"`, `"10Gi"`, `"500M"`, `1024`, `"1e3"`) as an integer,
/// rounded up as `Quantity.Value()` does. `None` when it is not a quantity.
pub fn parse_quantity(text: &str) -> Option<i128> {
    let s = text.trim();
    let (sign, s) = match s.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    if number.is_empty() || number == "." {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0f64.powi(2),
        "Gi" => 1024.0f64.powi(3),
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse::<i32>().ok()?.clamp(-30, 30)),
        _ => return None,
    };
    let v = sign * value * factor;
    if !v.is_finite() || v.abs() > 1e30 {
        return None;
    }
    Some(v.ceil() as i128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_does() {
        for (text, value) in [
            ("1k", 1_000),
            ("10Gi", 10 * (1 << 30)),
            ("500M", 500_000_000),
            ("1024", 1024),
            ("0", 0),
            ("1e3", 1_000),
            ("1.5k", 1_500),
            ("1500m", 2),
            ("-1", -1),
            ("+7", 7),
        ] {
            assert_eq!(parse_quantity(text), Some(value), "{text}");
        }
        for bad in ["", "k", "1kb", "ten", "1..2", "."] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }
}
