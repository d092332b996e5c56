//! A start-up reading of the request path's memory caps against the container's memory limit.
//!
//! What the EPP holds for clients is capped per kind: bodies being gathered
//! (`--max-gathered-request-bytes`), answers held to read or rewrite them (256 MiB), requests
//! queued in flow control (`maxBytes`). Each cap is sound alone, but nothing made them fit the
//! pod together: with the defaults and flow control on, a hostile client could make the EPP
//! hold more than the shipped 4 Gi limit, and the kernel would kill it mid-request. At start-up
//! the sum is compared with the cgroup's limit and, when it could pass three quarters of it,
//! a warning names the caps to lower. It is a warning, not a refusal: an operator may size
//! the caps for traffic that never fills them all at once.

use endpoint_picker::flow::FlowConfig;

/// The part of the container's memory the request path's caps may add up to before start-up
/// warns (the rest is the process itself, the indexes, the allocator's slack).
pub const SHARE_OF_LIMIT: (u64, u64) = (3, 4);

/// What flow control may hold at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowBound {
    /// Flow control is off.
    Off,
    /// The global `maxBytes`, or the provisioned bands' caps summed when it is unset.
    Bytes(u64),
    /// No global `maxBytes`: bands made on demand (one per priority seen) add their caps
    /// beyond the provisioned bands' sum.
    Unbounded {
        /// The provisioned bands' caps summed.
        provisioned: u64,
    },
}

impl FlowBound {
    /// The bound `config` sets (`None`: flow control off).
    pub fn of(config: Option<&FlowConfig>) -> Self {
        let Some(c) = config else {
            return FlowBound::Off;
        };
        if c.max_bytes > 0 {
            return FlowBound::Bytes(c.max_bytes);
        }
        let provisioned = c
            .bands
            .iter()
            .fold(0u64, |sum, b| sum.saturating_add(b.max_bytes));
        FlowBound::Unbounded { provisioned }
    }
}

/// The request path's memory caps.
#[derive(Debug, Clone, Copy)]
pub struct MemoryCaps {
    /// `--max-gathered-request-bytes`.
    pub gathered_request_bytes: u64,
    /// What held answers may take together.
    pub held_response_bytes: u64,
    /// Flow control's queues.
    pub flow_control: FlowBound,
}

impl MemoryCaps {
    /// Their sum, as far as it is bounded.
    pub fn bounded_sum(&self) -> u64 {
        let flow = match self.flow_control {
            FlowBound::Off => 0,
            FlowBound::Bytes(b) | FlowBound::Unbounded { provisioned: b } => b,
        };
        self.gathered_request_bytes
            .saturating_add(self.held_response_bytes)
            .saturating_add(flow)
    }

    /// The warning to give under a memory `limit` (bytes), if any.
    pub fn warning(&self, limit: u64) -> Option<String> {
        let allowed = limit / SHARE_OF_LIMIT.1 * SHARE_OF_LIMIT.0;
        let sum = self.bounded_sum();
        let flow = match self.flow_control {
            FlowBound::Off => String::new(),
            FlowBound::Bytes(b) => format!(", flow control's maxBytes {}", mib(b)),
            FlowBound::Unbounded { provisioned } => format!(
                ", flow control's bands {} (and as much again for each band made on demand: \
                 no global maxBytes)",
                mib(provisioned)
            ),
        };
        let unbounded = matches!(self.flow_control, FlowBound::Unbounded { .. });
        (sum > allowed || unbounded).then(|| {
            format!(
                "the request path's memory caps add up to {}{} against a container memory \
                 limit of {} (gathered bodies {}, held answers {}{flow}); a client that fills \
                 them could get the EPP killed for its memory: lower \
                 --max-gathered-request-bytes or flowControl's maxBytes, or raise the limit",
                mib(sum),
                if unbounded { " or more" } else { "" },
                mib(limit),
                mib(self.gathered_request_bytes),
                mib(self.held_response_bytes),
            )
        })
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

/// The container's memory limit from its cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`); `None` when there is none or it cannot be read.
pub fn container_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .into_iter()
    .find_map(|path| parse_limit(&std::fs::read_to_string(path).ok()?))
}

/// A cgroup limit file's value: `max` (v2) and v1's "no limit" (a page-rounded `i64::MAX`)
/// are none.
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v > 0 && v < 1 << 62).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_picker::flow::BandConfig;

    const GIB: u64 = 1 << 30;

    #[test]
    fn cgroup_limits_are_read_and_no_limit_is_none() {
        assert_eq!(parse_limit("4294967296\n"), Some(4 * GIB));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None, "v1 unlimited");
        assert_eq!(parse_limit("0"), None);
        assert_eq!(parse_limit("junk"), None);
    }

    #[test]
    fn the_defaults_fit_the_shipped_limit_until_flow_control_is_unbounded() {
        let defaults = MemoryCaps {
            gathered_request_bytes: GIB,
            held_response_bytes: GIB / 4,
            flow_control: FlowBound::Off,
        };
        assert_eq!(defaults.warning(4 * GIB), None);
        let w = defaults
            .warning(GIB)
            .expect("1.25 GiB of caps in a 1 GiB pod");
        assert!(
            w.contains("1280 MiB against a container memory limit of 1024 MiB"),
            "{w}"
        );
        // Flow control on with the reference's defaults: one 1 GB band, no global cap.
        let flow = FlowConfig::default();
        assert_eq!(flow.bands.len(), 1);
        assert_eq!(flow.bands[0].max_bytes, BandConfig::default().max_bytes);
        let on = MemoryCaps {
            flow_control: FlowBound::of(Some(&flow)),
            ..defaults
        };
        assert_eq!(
            on.flow_control,
            FlowBound::Unbounded {
                provisioned: 1_000_000_000
            }
        );
        let w = on
            .warning(64 * GIB)
            .expect("bands made on demand are unbounded");
        assert!(w.contains("no global maxBytes"), "{w}");
        // A global cap bounds it, and fits.
        let capped = MemoryCaps {
            flow_control: FlowBound::of(Some(&FlowConfig {
                max_bytes: GIB,
                ..flow
            })),
            ..defaults
        };
        assert_eq!(capped.flow_control, FlowBound::Bytes(GIB));
        assert_eq!(capped.warning(4 * GIB), None);
        assert!(
            capped.warning(5 * GIB / 2).is_some(),
            "2.25 GiB past ¾ of 2.5 GiB"
        );
    }
}
