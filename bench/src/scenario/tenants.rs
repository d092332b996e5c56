//! `scenario tenants`: two tenants share one pool. Tenant A floods batch traffic (objective
//! `batch`, priority −1) at 3× the pool's capacity; tenant B sends interactive traffic
//! (objective `interactive`, priority 10) at 20 % of it. With flow control on, B's band goes
//! first and A waits in its own band (bounded; the excess is refused with a dropped reason);
//! with it off, the reference's admission sheds A's sheddable requests only once the scraped
//! metrics say saturated, and B competes with A's backlog in the engines' queues.
//!
//! Reported: B's TTFT p90 against B alone, A's accepted throughput against the capacity B
//! leaves, every refusal by status and `x-llm-d-request-dropped-reason`, for both runs.
//! Verdicts (flow control on): B's p90 within 1.5× of alone, A's throughput ≥ 90 % of what B
//! leaves, every refused request carries its reason.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::harness::{self, Tools};
use crate::loadgen::{self, Control, LoadSpec, Mode, Record};
use crate::scenario::{self, ResponsePath};
use crate::stats::Quantiles;
use crate::workload::{Kind, WorkloadArgs};

/// The run's shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantsCfg {
    /// Simulated replicas.
    pub replicas: usize,
    /// Their `--max-num-seqs` (also the concurrency detector's `maxConcurrency`).
    pub max_num_seqs: usize,
    /// Seconds of the capacity measurement.
    pub capacity_s: f64,
    /// Seconds of arrivals per phase.
    pub phase_s: f64,
    /// A's rate over capacity.
    pub a_factor: f64,
    /// B's rate over capacity.
    pub b_share: f64,
    /// The batch band's saturation ceiling (`priority-holdback-policy` `minCeiling`; the
    /// interactive band's is 1.0): the share of slots batch work may fill, so that an
    /// interactive request finds a free slot instead of waiting for a batch request to end.
    pub batch_ceiling: f64,
    /// Route with `priority-packing-scorer`: batch work packed onto the busiest replicas
    /// with room, interactive work to the least busy.
    #[serde(default)]
    pub packing: bool,
}

impl TenantsCfg {
    /// Minutes on a quiet machine.
    pub fn full() -> Self {
        Self {
            replicas: 4,
            max_num_seqs: 16,
            capacity_s: 30.0,
            phase_s: 120.0,
            a_factor: 3.0,
            b_share: 0.2,
            batch_ceiling: 0.9,
            packing: true,
        }
    }

    /// A smoke run.
    pub fn quick() -> Self {
        Self {
            replicas: 2,
            max_num_seqs: 8,
            capacity_s: 10.0,
            phase_s: 20.0,
            ..Self::full()
        }
    }
}

/// One tenant in one phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TenantStats {
    /// Requests sent.
    pub sent: usize,
    /// Completed.
    pub ok: usize,
    /// Completed per second of the phase.
    pub ok_per_s: f64,
    /// TTFT of the completed ones, ms.
    pub ttft_ms: Quantiles,
    /// Refused or failed, by `"<status> <dropped reason or ->"`.
    pub refused: BTreeMap<String, usize>,
    /// Refused (an HTTP error status) without a dropped reason.
    pub refused_without_reason: usize,
}

impl TenantStats {
    fn of(records: &[Record], phase_s: f64) -> Self {
        let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
        let mut refused = BTreeMap::new();
        let mut without = 0;
        for r in records.iter().filter(|r| !r.ok()) {
            let reason = r.dropped_reason.clone().unwrap_or_else(|| "-".into());
            *refused.entry(format!("{} {reason}", r.status)).or_default() += 1;
            if r.status >= 400 && r.dropped_reason.is_none() {
                without += 1;
            }
        }
        Self {
            sent: records.len(),
            ok: ok.len(),
            ok_per_s: ok.len() as f64 / phase_s.max(1e-9),
            ttft_ms: Quantiles::of(ok.iter().filter_map(|r| r.ttft_ms).collect()),
            refused,
            refused_without_reason: without,
        }
    }
}

/// Both tenants together.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Mixed {
    /// Tenant A (batch flood).
    pub a: TenantStats,
    /// Tenant B (interactive).
    pub b: TenantStats,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantsRun {
    /// Its shape.
    pub cfg: TenantsCfg,
    /// Measured capacity, req/s.
    pub capacity_rps: f64,
    /// A's rate, req/s.
    pub a_rate: f64,
    /// B's rate, req/s.
    pub b_rate: f64,
    /// B alone (flow control on).
    pub b_alone: TenantStats,
    /// Both, flow control on.
    pub on: Mixed,
    /// Both, flow control off.
    pub off: Mixed,
    /// Verdicts (flow control on).
    pub checks: Vec<(String, bool)>,
}

/// The objectives of the two tenants, in the pool file.
const OBJECTIVES: &str =
    "objectives:\n- {name: interactive, priority: 10}\n- {name: batch, priority: -1}\n";

/// The reference's default profile, with or without flow control.
fn epp_config(flow_control: bool, cfg: &TenantsCfg) -> String {
    let slots = cfg.replicas * cfg.max_num_seqs;
    let mut s = String::from("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n");
    if flow_control {
        s.push_str("featureGates: [flowControl]\n");
    }
    s.push_str(
        "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n",
    );
    if flow_control {
        s.push_str(&format!(
            "- type: concurrency-detector\n  parameters: {{maxConcurrency: {}}}\n- type: round-robin-fairness-policy\n- type: priority-holdback-policy\n  parameters: {{minCeiling: {}}}\n",
            cfg.max_num_seqs, cfg.batch_ceiling
        ));
        if cfg.packing {
            s.push_str(&format!(
                "- type: priority-packing-scorer\n  parameters: {{endpointCapacity: {}}}\n",
                cfg.max_num_seqs
            ));
        }
    }
    s.push_str(
        "schedulingProfiles:\n- name: default\n  plugins:\n  - {pluginRef: queue-scorer, weight: 2}\n  - {pluginRef: kv-cache-utilization-scorer, weight: 2}\n  - {pluginRef: prefix-cache-scorer, weight: 3}\n",
    );
    if flow_control && cfg.packing {
        s.push_str("  - {pluginRef: priority-packing-scorer, weight: 10}\n");
    }
    if flow_control {
        // The batch band holds at most two pools' worth of requests: a bounded wait; the
        // rest of the flood is refused at once (rejected-saturated).
        s.push_str(&format!(
            "flowControl:\n  saturationDetector: {{pluginRef: concurrency-detector}}\n  usageLimitPolicyPluginRef: priority-holdback-policy\n  defaultRequestTTL: 30s\n  priorityBands:\n  - priority: 10\n    fairnessPolicyRef: round-robin-fairness-policy\n  - priority: -1\n    maxRequests: \"{}\"\n    fairnessPolicyRef: round-robin-fairness-policy\n",
            2 * slots
        ));
    }
    s
}

fn workload(seed: u64) -> Box<dyn crate::workload::Workload> {
    WorkloadArgs {
        workload: Kind::Mixed,
        seed,
        prompt_median: 300.0,
        prompt_sigma: 0.6,
        output_median: 64.0,
        output_sigma: 0.5,
        ..WorkloadArgs::default()
    }
    .build()
}

fn tenant(objective: &str, fairness: &str) -> Control {
    Control {
        headers: vec![
            ("x-llm-d-inference-objective".into(), objective.into()),
            ("x-llm-d-inference-fairness-id".into(), fairness.into()),
        ],
        ..Control::default()
    }
}

fn spec(url: &str, rate: f64, secs: f64, seed: u64) -> LoadSpec {
    LoadSpec {
        url: url.to_owned(),
        mode: Mode::Rate(rate),
        duration_s: Some(secs),
        count: None,
        drain_timeout_s: 60.0,
        seed,
        progress: false,
    }
}

/// Runs the scenario.
pub async fn run(tools: &Tools, cfg: &TenantsCfg, dir: &Path) -> anyhow::Result<TenantsRun> {
    let dir = dir.join("tenants");
    std::fs::create_dir_all(&dir)?;
    let sim_args = vec![
        "--stream-granularity".to_owned(),
        "16".into(),
        "--max-num-seqs".into(),
        cfg.max_num_seqs.to_string(),
    ];
    let (_sim, backends) = scenario::start_sim(tools, cfg.replicas, &sim_args, &dir)?;
    let pool = format!("{}{OBJECTIVES}", harness::pool_yaml(&backends));
    let start = |flow_control: bool| {
        let (pool, dir) = (
            pool.clone(),
            dir.join(if flow_control { "on" } else { "off" }),
        );
        let config = epp_config(flow_control, cfg);
        let backends = backends.clone();
        async move {
            std::fs::create_dir_all(&dir)?;
            scenario::start_switchyard_pool(
                tools,
                Some(&config),
                pool,
                &backends,
                &dir,
                &[],
                ResponsePath::Full,
            )
            .await
        }
    };

    // Capacity: every engine slot busy, flow control off.
    let off = start(false).await?;
    let slots = cfg.replicas * cfg.max_num_seqs;
    let cap = loadgen::run(
        LoadSpec {
            mode: Mode::Concurrency(2 * slots),
            duration_s: Some(cfg.capacity_s),
            ..spec(&off.url, 1.0, cfg.capacity_s, 7)
        },
        workload(7),
    )
    .await?;
    let capacity = cap.summary.req_per_s;
    anyhow::ensure!(capacity > 0.0, "the capacity run completed nothing");
    let (a_rate, b_rate) = (capacity * cfg.a_factor, capacity * cfg.b_share);
    eprintln!("tenants: capacity {capacity:.1} req/s; A at {a_rate:.1}, B at {b_rate:.1}");

    let mixed = |url: String| async move {
        let a = loadgen::run_with(
            spec(&url, a_rate, cfg.phase_s, 11),
            workload(11),
            tenant("batch", "tenant-a"),
        );
        let b = loadgen::run_with(
            spec(&url, b_rate, cfg.phase_s, 12),
            workload(12),
            tenant("interactive", "tenant-b"),
        );
        let (a, b) = tokio::join!(a, b);
        anyhow::Ok(Mixed {
            a: TenantStats::of(&a?.records, cfg.phase_s),
            b: TenantStats::of(&b?.records, cfg.phase_s),
        })
    };
    let off_run = mixed(off.url.clone()).await?;
    drop(off);

    let on = start(true).await?;
    let alone = loadgen::run_with(
        spec(&on.url, b_rate, cfg.phase_s, 12),
        workload(12),
        tenant("interactive", "tenant-b"),
    )
    .await?;
    let b_alone = TenantStats::of(&alone.records, cfg.phase_s);
    let on_run = mixed(on.url.clone()).await?;
    drop(on);

    let p90 = |s: &TenantStats| s.ttft_ms.p90.unwrap_or(f64::INFINITY);
    let left = (capacity - b_rate).max(0.0);
    let checks = vec![
        (
            format!(
                "B's TTFT p90 with A flooding ≤ 1.5× B alone ({:.0} vs {:.0} ms)",
                p90(&on_run.b),
                p90(&b_alone)
            ),
            on_run.b.ok > 0 && p90(&on_run.b) <= 1.5 * p90(&b_alone).max(1.0),
        ),
        (
            format!(
                "A's accepted throughput ≥ 90 % of the capacity B leaves ({:.1} vs {left:.1} req/s)",
                on_run.a.ok_per_s
            ),
            on_run.a.ok_per_s >= 0.9 * left,
        ),
        (
            "every refused request carries its dropped reason".into(),
            on_run.a.refused_without_reason + on_run.b.refused_without_reason == 0,
        ),
    ];
    Ok(TenantsRun {
        cfg: cfg.clone(),
        capacity_rps: capacity,
        a_rate,
        b_rate,
        b_alone,
        on: on_run,
        off: off_run,
        checks,
    })
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.0}"))
}

/// The results section.
pub fn markdown(r: &TenantsRun) -> String {
    let row = |name: &str, s: &TenantStats| {
        let refused: Vec<String> = s.refused.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        format!(
            "| {name} | {} | {} | {:.1} | {} | {} | {} |\n",
            s.sent,
            s.ok,
            s.ok_per_s,
            ms(s.ttft_ms.p50),
            ms(s.ttft_ms.p90),
            if refused.is_empty() {
                "—".into()
            } else {
                refused.join(", ")
            }
        )
    };
    let mut md = format!(
        "{} replicas × {} slots; capacity {:.1} req/s (closed loop, flow control off). Tenant A \
         (objective `batch`, priority −1) at {:.1} req/s, tenant B (`interactive`, priority 10) at \
         {:.1} req/s, {:.0} s of arrivals each. Flow control on: the batch band's ceiling \
         {:.2} (`priority-holdback-policy`), {}.\n\n\
         | run | sent | ok | ok/s | TTFT p50 ms | TTFT p90 ms | refused (status reason: n) |\n\
         |---|---|---|---|---|---|---|\n",
        r.cfg.replicas,
        r.cfg.max_num_seqs,
        r.capacity_rps,
        r.a_rate,
        r.b_rate,
        r.cfg.phase_s,
        r.cfg.batch_ceiling,
        if r.cfg.packing {
            "`priority-packing-scorer` ×10 (batch packed, interactive to the least busy)"
        } else {
            "no packing"
        }
    );
    md.push_str(&row("B alone (flow control on)", &r.b_alone));
    md.push_str(&row("B, A flooding, flow control on", &r.on.b));
    md.push_str(&row("A, flow control on", &r.on.a));
    md.push_str(&row("B, A flooding, flow control off", &r.off.b));
    md.push_str(&row("A, flow control off", &r.off.a));
    md.push_str("\nVerdicts (flow control on):\n\n");
    for (what, pass) in &r.checks {
        md.push_str(&format!(
            "- {} {what}\n",
            if *pass { "PASS" } else { "FAIL" }
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_load_in_the_epp() {
        let cfg = TenantsCfg::quick();
        for on in [true, false] {
            let c = endpoint_picker::config::load(&epp_config(on, &cfg), 1).unwrap();
            assert_eq!(c.flow_control.is_some(), on);
        }
        let c = endpoint_picker::config::load(&epp_config(true, &cfg), 1).unwrap();
        let f = c.flow_control.unwrap();
        assert_eq!(
            f.bands.iter().map(|b| b.priority).collect::<Vec<_>>(),
            [10, 0, -1]
        );
        assert_eq!(f.bands[2].max_requests, 32);
    }

    #[test]
    fn refusals_are_counted_by_status_and_reason() {
        let recs = vec![
            Record {
                status: 429,
                dropped_reason: Some("rejected-saturated".into()),
                ..Record::default()
            },
            Record {
                status: 503,
                ..Record::default()
            },
        ];
        let s = TenantStats::of(&recs, 10.0);
        assert_eq!(s.refused.get("429 rejected-saturated"), Some(&1));
        assert_eq!(s.refused_without_reason, 1);
    }
}
