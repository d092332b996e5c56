//! Chaos: one fault at a time against real processes (Envoy with the shipped template and its
//! retries, `epp`, one `sim` process per replica), under seeded open-loop load. Each case has a
//! verdict computed from per-request records (status, replica that served it, time sent and
//! finished) and from what the EPP showed (`/debug/pool` readiness and decisions, `/metrics`).
//!
//! The cases run in order on one cluster, which is healed (every replica running and serving,
//! EPP and Envoy up) between them:
//!
//! | case | fault |
//! | --- | --- |
//! | `replica-loading` | a replica joins the pool while its model loads; another reloads its model |
//! | `replica-killed` | SIGKILL of one replica's process mid-run, restarted later on its port |
//! | `replica-hung` | SIGSTOP of the replica the EPP ranks first (accepts connections, never answers), SIGCONT later |
//! | `metrics-slow` | `/metrics` answers after 5 s (> the 1 s scrape timeout): one replica, then all |
//! | `pool-churn` | the pool file rewritten 100 times a second for 10 s, two valid contents |
//! | `epp-restart-failclose` | SIGKILL of the `epp`, restarted on its ports; Envoy FailClose |
//! | `envoy-restart` | SIGKILL of Envoy, restarted on its ports |
//! | `epp-restart-failopen` | SIGKILL of the `epp`, restarted; Envoy FailOpen |

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cluster::{Cluster, ClusterCfg, FALLBACK_CONFIG, Variant};
use crate::harness::{Tools, post, prom_sum};
use crate::loadgen::{self, LoadSpec, Mode, Record, Report, unix_ms};
use crate::workload::{Kind, WorkloadArgs};

/// Replicas serving from the start; one more (`sim-4`) joins in `replica-loading`.
const SERVING: usize = 4;
/// The replica that joins while loading.
const LOADING: usize = 4;

/// Knobs of a chaos run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosCfg {
    /// The short variant (tests): shorter phases, a 3 s retry idle timeout.
    pub quick: bool,
    /// Requests per second (Poisson).
    pub rate: f64,
    /// Seconds of load before a fault.
    pub before_s: f64,
    /// Seconds a fault lasts (replica down, EPP down…).
    pub down_s: f64,
    /// Seconds of load after recovery.
    pub after_s: f64,
    /// `--model-load-time-ms` of the joining replica, seconds.
    pub load_time_s: f64,
    /// Seconds of pool-file churn.
    pub churn_s: f64,
    /// The EPP's scrape interval (its default), ms.
    pub scrape_interval_ms: f64,
    /// The EPP's scrape timeout (its default), ms.
    pub scrape_timeout_ms: f64,
    /// Allowance on top of "two scrape intervals" for timers and a loaded machine, ms.
    pub slack_ms: f64,
    /// `per_try_idle_timeout` override in seconds (None: the shipped 60 s).
    pub per_try_idle_s: Option<f64>,
    /// How often `/debug/pool` is read, ms.
    pub poll_ms: u64,
    /// Only these cases (all when empty).
    pub only: Vec<String>,
}

impl ChaosCfg {
    /// `make chaos`.
    pub fn full() -> ChaosCfg {
        ChaosCfg {
            quick: false,
            rate: 20.0,
            before_s: 5.0,
            down_s: 8.0,
            after_s: 8.0,
            load_time_s: 15.0,
            churn_s: 10.0,
            scrape_interval_ms: 50.0,
            scrape_timeout_ms: 1000.0,
            slack_ms: 50.0,
            per_try_idle_s: None,
            poll_ms: 25,
            only: Vec::new(),
        }
    }

    /// The short variant (`make test`, debug binaries).
    pub fn quick() -> ChaosCfg {
        ChaosCfg {
            quick: true,
            rate: 10.0,
            before_s: 2.0,
            down_s: 2.5,
            after_s: 3.0,
            load_time_s: 5.0,
            churn_s: 5.0,
            scrape_interval_ms: 50.0,
            scrape_timeout_ms: 1000.0,
            slack_ms: 1000.0,
            per_try_idle_s: Some(3.0),
            poll_ms: 50,
            only: Vec::new(),
        }
    }

    fn idle_s(&self) -> f64 {
        self.per_try_idle_s.unwrap_or(60.0)
    }
}

/// One named check of a case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What must hold.
    pub what: String,
    /// Whether it did.
    pub pass: bool,
    /// A target the system does not meet yet (explained in RESULTS.md): it fails the case in
    /// the report, but the short-variant test guards only the gating checks.
    #[serde(default)]
    pub known_gap: bool,
}

/// A case's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// What happened, in a sentence or two.
    pub happened: String,
    /// Every check passed (and the case ran).
    pub pass: bool,
    /// Key numbers.
    pub numbers: String,
    /// The checks.
    pub checks: Vec<Check>,
}

impl CaseResult {
    fn new(name: &str) -> CaseResult {
        CaseResult {
            name: name.into(),
            happened: String::new(),
            pass: true,
            numbers: String::new(),
            checks: Vec::new(),
        }
    }

    fn check(&mut self, what: impl Into<String>, pass: bool) {
        self.pass &= pass;
        self.checks.push(Check {
            what: what.into(),
            pass,
            known_gap: false,
        });
    }

    /// A check of a target not met yet (see [`Check::known_gap`]).
    fn target(&mut self, what: impl Into<String>, pass: bool) {
        self.pass &= pass;
        self.checks.push(Check {
            what: what.into(),
            pass,
            known_gap: true,
        });
    }

    /// Every check that gates the short-variant test passed.
    pub fn gating_pass(&self) -> bool {
        self.checks.iter().all(|c| c.pass || c.known_gap)
    }

    fn failed(name: &str, e: &anyhow::Error) -> CaseResult {
        let mut c = CaseResult::new(name);
        c.happened = format!("the case could not run: {e:#}");
        c.check("the case ran", false);
        c
    }
}

/// Everything a chaos run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosRun {
    /// The knobs.
    pub cfg: ChaosCfg,
    /// One result per case.
    pub cases: Vec<CaseResult>,
}

/// Every case's name, in running order.
pub const CASES: [&str; 8] = [
    "replica-loading",
    "replica-killed",
    "replica-hung",
    "metrics-slow",
    "pool-churn",
    "epp-restart-failclose",
    "envoy-restart",
    "epp-restart-failopen",
];

/// The cluster every case runs on.
fn cluster_cfg(cfg: &ChaosCfg) -> ClusterCfg {
    ClusterCfg {
        sim_args: vec!["--stream-granularity".into(), "8".into()],
        // Re-read the pool file every 10 ms so that pool-churn's 100 writes a second are
        // (nearly) all seen; everything else is the EPP's default.
        epp_args: vec![
            "--pool-file-poll-interval".into(),
            "10ms".into(),
            "--debug-decisions".into(),
            "500".into(),
        ],
        epp_config: FALLBACK_CONFIG.into(),
        per_try_idle_s: cfg.per_try_idle_s,
        poll_ms: cfg.poll_ms,
    }
}

/// Runs the cases (all, or `cfg.only`); `progress` gets each result as it is known.
pub async fn run(
    tools: &Tools,
    cfg: &ChaosCfg,
    dir: &Path,
    mut progress: impl FnMut(&CaseResult),
) -> anyhow::Result<ChaosRun> {
    let names: Vec<String> = (0..=LOADING).map(|i| format!("sim-{i}")).collect();
    let mut c = Cluster::new(tools, &dir.join("chaos"), &names, cluster_cfg(cfg))?;
    let first: Vec<usize> = (0..SERVING).collect();
    c.start(&first, &first, Variant::FailClose).await?;
    c.wait_readiness(&["sim-0", "sim-1", "sim-2", "sim-3"], "serving", secs(20.0))
        .await?;
    let mut cases = Vec::new();
    for (k, name) in CASES.iter().enumerate() {
        if !cfg.only.is_empty() && !cfg.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("chaos: {name}");
        let seed = 100 + k as u64;
        let r = match *name {
            "replica-loading" => replica_loading(&mut c, cfg, seed).await,
            "replica-killed" => replica_killed(&mut c, cfg, seed).await,
            "replica-hung" => replica_hung(&mut c, cfg, seed).await,
            "metrics-slow" => metrics_slow(&mut c, cfg, seed).await,
            "pool-churn" => pool_churn(&mut c, cfg, seed).await,
            "epp-restart-failclose" => epp_restart(&mut c, cfg, seed, Variant::FailClose).await,
            "envoy-restart" => envoy_restart(&mut c, cfg, seed).await,
            _ => epp_restart(&mut c, cfg, seed, Variant::FailOpen).await,
        };
        let r = r.unwrap_or_else(|e| CaseResult::failed(name, &e));
        eprintln!(
            "chaos: {name}: {} — {}",
            if r.pass { "PASS" } else { "FAIL" },
            r.numbers
        );
        progress(&r);
        cases.push(r);
        heal(&mut c).await?;
    }
    Ok(ChaosRun {
        cfg: cfg.clone(),
        cases,
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Brings every replica back (running, resumed, fast metrics), the full pool, the EPP and
/// Envoy up, and waits until every endpoint in the pool serves.
async fn heal(c: &mut Cluster) -> anyhow::Result<()> {
    let in_pool: Vec<usize> = (0..c.replicas.len())
        .filter(|&i| i < SERVING || c.replicas.get(i).is_some_and(|r| r.proc.is_some()))
        .collect();
    for &i in &in_pool {
        let dead = c
            .replicas
            .get_mut(i)
            .and_then(|r| r.proc.as_mut())
            .is_none_or(|p| !p.is_alive());
        if dead {
            c.start_replica(i, &[])?;
        }
        if let Some(p) = c.replicas.get(i).and_then(|r| r.proc.as_ref()) {
            p.signal("CONT")?;
        }
        let _ = post(
            &format!("{}/admin/metrics_delay", c.replica_url(i)),
            "{\"ms\": 0}",
        )
        .await;
    }
    c.write_pool(&in_pool)?;
    if c.epp.as_mut().is_none_or(|p| !p.is_alive()) {
        c.start_epp().await?;
    }
    if c.envoy.as_mut().is_none_or(|p| !p.is_alive()) {
        let v = c.variant;
        c.start_envoy(v).await?;
    }
    c.wait_envoy_ready().await?;
    let names = c.names();
    let wanted: Vec<&str> = in_pool
        .iter()
        .filter_map(|&i| names.get(i).map(String::as_str))
        .collect();
    c.wait_readiness(&wanted, "serving", secs(30.0)).await?;
    Ok(())
}

/// The chaos workload: unique prompts (median 200 tokens), short outputs (median 48 tokens,
/// about 0.3 s at the calibrated step time) so that every replica has requests in flight.
fn spawn_load(
    url: String,
    rate: f64,
    duration_s: f64,
    drain_s: f64,
    seed: u64,
) -> tokio::task::JoinHandle<anyhow::Result<Report>> {
    let w = WorkloadArgs {
        workload: Kind::Mixed,
        seed,
        prompt_median: 200.0,
        prompt_sigma: 0.5,
        output_median: 48.0,
        output_sigma: 0.4,
        ..WorkloadArgs::default()
    };
    let spec = LoadSpec {
        url,
        mode: Mode::Rate(rate),
        duration_s: Some(duration_s),
        count: None,
        drain_timeout_s: drain_s,
        seed,
        progress: false,
    };
    tokio::spawn(async move { loadgen::run(spec, w.build()).await })
}

/// `n` requests of the chaos workload sent at once.
fn spawn_burst(
    url: String,
    n: usize,
    drain_s: f64,
    seed: u64,
) -> tokio::task::JoinHandle<anyhow::Result<Report>> {
    let w = WorkloadArgs {
        workload: Kind::Mixed,
        seed,
        prompt_median: 200.0,
        prompt_sigma: 0.5,
        output_median: 48.0,
        output_sigma: 0.4,
        ..WorkloadArgs::default()
    };
    let spec = LoadSpec {
        url,
        mode: Mode::Concurrency(n),
        duration_s: None,
        count: Some(n),
        drain_timeout_s: drain_s,
        seed,
        progress: false,
    };
    tokio::spawn(async move { loadgen::run(spec, w.build()).await })
}

async fn join(h: tokio::task::JoinHandle<anyhow::Result<Report>>) -> anyhow::Result<Report> {
    h.await?
}

/// Sleeps until `at_ms` (wall clock).
async fn until_ms(at_ms: f64) {
    let now = unix_ms();
    if at_ms > now {
        tokio::time::sleep(Duration::from_secs_f64((at_ms - now) / 1e3)).await;
    }
}

/// Run-relative seconds of wall-clock `ms`.
fn rel(rep: &Report, ms: f64) -> f64 {
    (ms - rep.start_unix_ms) / 1e3
}

fn failures(rep: &Report) -> Vec<&Record> {
    rep.records.iter().filter(|r| !r.ok()).collect()
}

fn in_flight_at(r: &Record, t: f64) -> bool {
    r.sent_s <= t && r.done_s > t
}

/// "503×2 0×1" for failures.
fn statuses(recs: &[&Record]) -> String {
    let mut m = std::collections::BTreeMap::<u16, usize>::new();
    for r in recs {
        *m.entry(r.status).or_default() += 1;
    }
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(s, n)| {
            format!(
                "{}×{n}",
                if *s == 0 {
                    "no-response".into()
                } else {
                    s.to_string()
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms(x: f64) -> String {
    format!("{x:.0} ms")
}

async fn replica_loading(c: &mut Cluster, cfg: &ChaosCfg, seed: u64) -> anyhow::Result<CaseResult> {
    let mut res = CaseResult::new("replica-loading");
    let name = format!("sim-{LOADING}");
    let addr = c
        .replicas
        .get(LOADING)
        .map(|r| r.addr)
        .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
    let load_ms = cfg.load_time_s * 1e3;
    let reload_s = (cfg.load_time_s / 2.0).min(4.0);
    let duration = cfg.load_time_s + cfg.after_s + 1.0;
    let load = spawn_load(c.url(), cfg.rate, duration, 30.0, seed);
    tokio::time::sleep(secs(0.5)).await;
    let rq0 = c.envoy_rq_total(addr).await?;
    let t_spawn = unix_ms();
    c.start_replica(
        LOADING,
        &["--model-load-time-ms".into(), format!("{load_ms:.0}")],
    )?;
    let all: Vec<usize> = (0..=LOADING).collect();
    c.write_pool(&all)?;
    let t_added = unix_ms();
    // Meanwhile a serving replica reloads its model.
    until_ms(t_spawn + 1000.0).await;
    let reload_url = format!("{}/admin/reload", c.replica_url(0));
    let rq_r0 = c
        .envoy_rq_total(c.replicas.first().map_or(addr, |r| r.addr))
        .await?;
    let t_reload = unix_ms();
    post(&reload_url, &format!("{{\"seconds\": {reload_s}}}")).await?;
    let noticed = t_reload + 2.0 * cfg.scrape_interval_ms + cfg.slack_ms;
    until_ms(t_reload + reload_s * 1e3 - 200.0).await;
    let rq_r1 = c
        .envoy_rq_total(c.replicas.first().map_or(addr, |r| r.addr))
        .await?;
    until_ms(t_spawn + load_ms - 300.0).await;
    let rq1 = c.envoy_rq_total(addr).await?;
    let t_rq1 = unix_ms();
    let t_serving = c
        .wait_readiness(&[name.as_str()], "serving", secs(15.0))
        .await?;
    let rep = join(load).await?;
    let o = c.observed.lock().clone();
    let fails = failures(&rep);
    let listed_loading = o.listed(&name, t_added, t_spawn + load_ms);
    let served_after = rep
        .records
        .iter()
        .filter(|r| r.ok() && r.replica.as_deref() == Some(name.as_str()))
        .count();
    let first_served = rep
        .records
        .iter()
        .filter(|r| r.ok() && r.replica.as_deref() == Some(name.as_str()))
        .map(|r| r.sent_s)
        .fold(f64::INFINITY, f64::min);
    let reload_routed = o
        .primary_to("sim-0", noticed, t_reload + reload_s * 1e3)
        .len();
    let seen_loading = o.first_readiness("sim-0", "loading", t_reload);
    res.check(
        format!(
            "no request reached {name} while it loaded (Envoy rq_total over {:.1} s)",
            (t_rq1 - t_added) / 1e3
        ),
        rq1 == rq0,
    );
    res.check(
        format!("{name} was in no decision (primary or fallback) while loading"),
        listed_loading == 0,
    );
    res.check(
        format!("{name} served requests once loaded"),
        served_after > 0,
    );
    res.check(
        "sim-0 reloading: no decision picked it once the EPP had seen it loading",
        reload_routed == 0 && seen_loading.is_some(),
    );
    res.check("0 failed requests", fails.is_empty());
    res.happened = format!(
        "{name} joined the pool file while loading its model ({:.0} s): readiness `loading`, no \
         request reached it; it turned `serving` {} after its load time and then took traffic. \
         sim-0 reloaded its model for {reload_s:.0} s mid-run: seen `loading` {} after the \
         reload, {} request(s) reached it before that (503, retried elsewhere by Envoy).",
        cfg.load_time_s,
        ms(t_serving - (t_spawn + load_ms)),
        seen_loading.map_or("never".into(), |t| ms(t - t_reload)),
        rq_r1.saturating_sub(rq_r0),
    );
    res.numbers = format!(
        "{} requests, failed {}; {name}: rq_total while loading {}, decisions listing it {}, \
         serving +{} after load end, first request served at +{:.1} s after load end, {} served; \
         sim-0 reload: requests reaching it {}, decisions after noticed {}",
        rep.records.len(),
        statuses(&fails),
        rq1 - rq0,
        listed_loading,
        ms(t_serving - (t_spawn + load_ms)),
        first_served - rel(&rep, t_spawn + load_ms),
        served_after,
        rq_r1.saturating_sub(rq_r0),
        reload_routed,
    );
    Ok(res)
}

async fn replica_killed(c: &mut Cluster, cfg: &ChaosCfg, seed: u64) -> anyhow::Result<CaseResult> {
    let mut res = CaseResult::new("replica-killed");
    let idx = 1;
    let name = "sim-1";
    let duration = cfg.before_s + cfg.down_s + cfg.after_s;
    let load = spawn_load(c.url(), cfg.rate, duration, 30.0, seed);
    tokio::time::sleep(secs(cfg.before_s)).await;
    let t_kill = unix_ms();
    if let Some(r) = c.replicas.get_mut(idx) {
        if let Some(p) = r.proc.as_ref() {
            p.signal("KILL")?;
        }
        r.proc = None;
    }
    until_ms(t_kill + cfg.down_s * 1e3).await;
    let t_restart = unix_ms();
    c.start_replica(idx, &[])?;
    let t_serving = c.wait_readiness(&[name], "serving", secs(15.0)).await?;
    let rep = join(load).await?;
    let o = c.observed.lock().clone();
    let (k, rs) = (rel(&rep, t_kill), rel(&rep, t_restart));
    let fails = failures(&rep);
    let after_kill: Vec<&Record> = fails.iter().copied().filter(|r| r.sent_s > k).collect();
    let unclean: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| !(in_flight_at(r, k) && r.done_s - k <= 2.0 + cfg.slack_ms / 1000.0))
        .collect();
    let in_flight_on_it = rep
        .records
        .iter()
        .filter(|r| in_flight_at(r, k) && r.replica.as_deref() == Some(name))
        .count();
    let routed = o.primary_to(name, t_kill, t_restart);
    let last = routed.iter().copied().fold(t_kill, f64::max) - t_kill;
    let unreachable = o.first_readiness(name, "unreachable", t_kill);
    let limit = 2.0 * cfg.scrape_interval_ms + cfg.slack_ms;
    let first_back = rep
        .records
        .iter()
        .filter(|r| r.ok() && r.sent_s >= rs && r.replica.as_deref() == Some(name))
        .map(|r| r.sent_s)
        .fold(f64::INFINITY, f64::min)
        - rs;
    res.check(
        "0 failed requests among those sent after the kill",
        after_kill.is_empty(),
    );
    res.check(
        format!(
            "every failure was in flight at the kill and ended within 2 s + {} of it (clean error)",
            ms(cfg.slack_ms)
        ),
        unclean.is_empty(),
    );
    res.check(
        format!(
            "last request routed to it ≤ 2 scrape intervals + {} after the kill",
            ms(cfg.slack_ms)
        ),
        last <= limit,
    );
    res.check(
        "back in service within 5 s of the restart",
        first_back <= 5.0,
    );
    let picked = if routed.is_empty() {
        "The EPP picked it for no request after the kill".to_owned()
    } else {
        format!(
            "The EPP still picked it for {} request(s) (the last {} after the kill; Envoy's \
             connect-failure retry moved them to the next endpoint of the list)",
            routed.len(),
            ms(last)
        )
    };
    res.happened = format!(
        "{name}'s process was killed with {} request(s) streaming from it: {} failed at the \
         client ({}, the stream cut); requests it had not answered yet were retried by Envoy. \
         {picked}, and marked it `unreachable` {} after the kill; restarted, it was `serving` \
         again {} later and served its first request {:.1} s after the restart.",
        in_flight_on_it,
        fails.len(),
        statuses(&fails),
        unreachable.map_or("never".into(), |t| ms(t - t_kill)),
        ms(t_serving - t_restart),
        first_back,
    );
    res.numbers = format!(
        "{} requests; failed {} (in flight at kill); after kill 0 expected, got {}; last routed +{}; \
         unreachable +{}; back +{:.1} s",
        rep.records.len(),
        fails.len(),
        after_kill.len(),
        ms(last),
        unreachable.map_or("-".into(), |t| ms(t - t_kill)),
        first_back,
    );
    Ok(res)
}

async fn replica_hung(c: &mut Cluster, cfg: &ChaosCfg, seed: u64) -> anyhow::Result<CaseResult> {
    let mut res = CaseResult::new("replica-hung");
    let idle = cfg.idle_s();
    let hold = idle + if cfg.quick { 2.0 } else { 5.0 };
    let duration = cfg.before_s + hold + cfg.after_s;
    let load = spawn_load(c.url(), cfg.rate, duration, idle + 30.0, seed);
    tokio::time::sleep(secs(cfg.before_s)).await;
    // The replica the EPP ranks first right now (the primary of its latest decision): its
    // last scrape, which it keeps until two scrapes have failed, still ranks it first, so
    // requests do reach it after the hang. A fixed replica is often never picked again.
    let names = c.names();
    let name = c
        .observed
        .lock()
        .decisions
        .last()
        .and_then(|(_, picked, _)| picked.first().cloned())
        .filter(|n| names.iter().take(SERVING).any(|x| x == n))
        .unwrap_or_else(|| "sim-2".to_owned());
    let name = name.as_str();
    let idx = names.iter().position(|n| n == name).unwrap_or(2);
    let t_stop = unix_ms();
    if let Some(p) = c.replicas.get(idx).and_then(|r| r.proc.as_ref()) {
        p.signal("STOP")?;
    }
    // A burst right after the hang, while the EPP still sees the replica serving (its
    // scrapes have not timed out yet), so that some requests are routed to it and the
    // idle-timeout retry path is exercised whatever the Poisson arrivals do.
    let burst = spawn_burst(c.url(), 16, idle + 30.0, seed + 1000);
    until_ms(t_stop + hold * 1e3).await;
    let t_cont = unix_ms();
    if let Some(p) = c.replicas.get(idx).and_then(|r| r.proc.as_ref()) {
        p.signal("CONT")?;
    }
    let t_serving = c.wait_readiness(&[name], "serving", secs(15.0)).await?;
    let rep = join(load).await?;
    let burst = join(burst).await?;
    let o = c.observed.lock().clone();
    let (s, ct) = (rel(&rep, t_stop), rel(&rep, t_cont));
    let fails = failures(&rep);
    let burst_fails = failures(&burst);
    let mut after_stop: Vec<&Record> = fails.iter().copied().filter(|r| r.sent_s > s).collect();
    after_stop.extend(burst_fails.iter().copied());
    let unclean: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| !(in_flight_at(r, s) && r.done_s <= s + idle + 5.0))
        .collect();
    let routed = o.primary_to(name, t_stop, t_cont);
    let last = routed.iter().copied().fold(t_stop, f64::max) - t_stop;
    let limit = 2.0 * cfg.scrape_timeout_ms + 2.0 * cfg.scrape_interval_ms + cfg.slack_ms + 500.0;
    let slow = |r: &&Record| r.ok() && r.e2e_ms.is_some_and(|e| e >= idle * 1e3 * 0.95);
    let retried = rep
        .records
        .iter()
        .filter(|r| r.sent_s > s)
        .filter(slow)
        .count()
        + burst.records.iter().filter(slow).count();
    let unreachable = o.first_readiness(name, "unreachable", t_stop);
    let first_back = rep
        .records
        .iter()
        .filter(|r| r.ok() && r.sent_s >= ct && r.replica.as_deref() == Some(name))
        .map(|r| r.sent_s)
        .fold(f64::INFINITY, f64::min)
        - ct;
    res.check(
        "0 failed requests among those sent after the hang (timed out and retried elsewhere)",
        after_stop.is_empty(),
    );
    res.check(
        format!(
            "every failure was in flight on it at the hang and cut by the {idle:.0} s idle timeout"
        ),
        unclean.is_empty(),
    );
    res.check(
        format!(
            "no new request routed to it {} after the hang (2 scrape timeouts + 2 intervals + slack)",
            ms(limit)
        ),
        last <= limit,
    );
    res.check(
        "every request routed to it after the hang succeeded elsewhere after the idle timeout",
        retried >= routed.len(),
    );
    res.check("back in service after SIGCONT", first_back.is_finite());
    let routed_text = if routed.is_empty() {
        "The EPP routed no request to it after the hang, so the idle-timeout retry was not \
         exercised in this run"
            .to_owned()
    } else {
        format!(
            "The EPP routed {} request(s) to it before its scrapes timed out (the last {} after \
             the hang); Envoy cut each try after {idle:.0} s without a byte and retried it on the \
             next endpoint ({retried} request(s) succeeded after ≥ {idle:.0} s)",
            routed.len(),
            ms(last)
        )
    };
    res.happened = format!(
        "{name} (the EPP's first choice at that moment) was stopped (SIGSTOP: connections \
         accepted, nothing answered) for {hold:.0} s, with a burst of 16 requests at once right after. {routed_text}; it was \
         `unreachable` at {} and got no new request. {} request(s) that were already streaming \
         from it failed ({}), cut by the same idle timeout. After SIGCONT it was `serving` \
         again {} later.",
        unreachable.map_or("never".into(), |t| ms(t - t_stop)),
        fails.len(),
        statuses(&fails),
        ms(t_serving - t_cont),
    );
    res.numbers = format!(
        "{} + 16 requests; failed {} (in flight), burst failed {}; routed to it after hang {}; \
         retried after idle timeout {}; last routed +{}; unreachable +{}; back +{:.1} s",
        rep.records.len(),
        fails.len(),
        burst_fails.len(),
        routed.len(),
        retried,
        ms(last),
        unreachable.map_or("-".into(), |t| ms(t - t_stop)),
        first_back,
    );
    Ok(res)
}

async fn set_metrics_delay(c: &Cluster, i: usize, ms: u64) -> anyhow::Result<()> {
    let (status, body) = post(
        &format!("{}/admin/metrics_delay", c.replica_url(i)),
        &format!("{{\"ms\": {ms}}}"),
    )
    .await?;
    anyhow::ensure!(status == 200, "metrics_delay: {status} {body}");
    Ok(())
}

async fn metrics_slow(c: &mut Cluster, cfg: &ChaosCfg, seed: u64) -> anyhow::Result<CaseResult> {
    let mut res = CaseResult::new("metrics-slow");
    let in_pool: Vec<usize> = (0..c.replicas.len())
        .filter(|&i| c.replicas.get(i).is_some_and(|r| r.proc.is_some()))
        .collect();
    let names = c.names();
    let pool_names: Vec<&str> = in_pool
        .iter()
        .filter_map(|&i| names.get(i).map(String::as_str))
        .collect();
    let hold = cfg.down_s.max(4.0);
    let duration = cfg.before_s + 2.0 * hold + cfg.after_s + 2.0;
    let load = spawn_load(c.url(), cfg.rate, duration, 30.0, seed);
    tokio::time::sleep(secs(cfg.before_s)).await;
    let t1 = unix_ms();
    set_metrics_delay(c, 3, 5000).await?;
    until_ms(t1 + hold * 1e3).await;
    let t2 = unix_ms();
    for &i in &in_pool {
        set_metrics_delay(c, i, 5000).await?;
    }
    let t_all = c
        .wait_readiness(&pool_names, "unreachable", secs(hold + 5.0))
        .await
        .ok();
    until_ms(t2 + hold * 1e3).await;
    let t3 = unix_ms();
    for &i in &in_pool {
        set_metrics_delay(c, i, 0).await?;
    }
    let t_back = c.wait_readiness(&pool_names, "serving", secs(20.0)).await?;
    let rep = join(load).await?;
    let o = c.observed.lock().clone();
    let fails = failures(&rep);
    let one_unreach = o.first_readiness("sim-3", "unreachable", t1);
    let limit = 2.0 * cfg.scrape_timeout_ms + 2.0 * cfg.scrape_interval_ms + cfg.slack_ms + 500.0;
    let routed_slow = o.primary_to("sim-3", t1 + limit, t2).len();
    let while_none = t_all.map_or(0, |t| o.decisions_between(t, t3));
    let ok_while_none = t_all.map_or(0, |t| {
        let (a, b) = (rel(&rep, t), rel(&rep, t3));
        rep.records
            .iter()
            .filter(|r| r.ok() && r.sent_s >= a && r.sent_s < b)
            .count()
    });
    res.check("0 failed requests", fails.is_empty());
    res.check(
        format!(
            "one slow replica: unreachable and no request routed to it {} after",
            ms(limit)
        ),
        one_unreach.is_some() && routed_slow == 0,
    );
    res.check(
        "all slow: every endpoint unreachable, the EPP still routes (to endpoints without evidence against them) and requests succeed",
        t_all.is_some() && while_none > 0 && ok_while_none > 0,
    );
    res.check("all serving again after /metrics is fast again", true);
    res.happened = format!(
        "`/metrics` of sim-3 answered after 5 s (scrape timeout 1 s): `unreachable` after {}, \
         then no traffic. With every replica's `/metrics` slow, all were `unreachable` after {}; \
         the EPP kept routing (no endpoint serving → candidates are those without evidence \
         against them, `unreachable` included, as the reference routes to every listed pod): \
         {} decisions, {} requests succeeded in that phase. Fast again: all `serving` after {}.",
        one_unreach.map_or("never".into(), |t| ms(t - t1)),
        t_all.map_or("never".into(), |t| ms(t - t2)),
        while_none,
        ok_while_none,
        ms(t_back - t3),
    );
    res.numbers = format!(
        "{} requests, failed {}; one slow: unreachable +{}, routed after {}; all slow: \
         unreachable +{}, {} decisions, {} ok; back +{}",
        rep.records.len(),
        statuses(&fails),
        one_unreach.map_or("-".into(), |t| ms(t - t1)),
        routed_slow,
        t_all.map_or("-".into(), |t| ms(t - t2)),
        while_none,
        ok_while_none,
        ms(t_back - t3),
    );
    Ok(res)
}

async fn pool_churn(c: &mut Cluster, cfg: &ChaosCfg, seed: u64) -> anyhow::Result<CaseResult> {
    let mut res = CaseResult::new("pool-churn");
    let all: Vec<usize> = (0..c.replicas.len())
        .filter(|&i| c.replicas.get(i).is_some_and(|r| r.proc.is_some()))
        .collect();
    let a: Vec<usize> = all.iter().copied().filter(|&i| i < SERVING).collect();
    let b: Vec<usize> = all.iter().rev().copied().collect();
    let duration = cfg.before_s + cfg.churn_s + cfg.after_s;
    let load = spawn_load(c.url(), cfg.rate, duration, 30.0, seed);
    tokio::time::sleep(secs(cfg.before_s)).await;
    let exits0 = prom_sum(
        &c.epp_metrics().await?,
        "inference_extension_task_exits_total",
    );
    let rss0 = c.epp_rss_kib();
    let mut peak = rss0;
    let t0 = unix_ms();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writes = 0usize;
    while unix_ms() < t0 + cfg.churn_s * 1e3 {
        tick.tick().await;
        c.write_pool(if writes.is_multiple_of(2) { &a } else { &b })?;
        writes += 1;
        if writes.is_multiple_of(10) {
            peak = peak.max(c.epp_rss_kib());
        }
    }
    c.write_pool(&all)?;
    let t1 = unix_ms();
    let rep = join(load).await?;
    let alive = c.epp.as_mut().is_some_and(|p| p.is_alive());
    let rss1 = c.epp_rss_kib();
    let exits1 = prom_sum(
        &c.epp_metrics().await?,
        "inference_extension_task_exits_total",
    );
    let o = c.observed.lock().clone();
    let decided = o.decisions_between(t0, t1);
    let fails = failures(&rep);
    let grew = rss1 as f64 - rss0 as f64;
    let bound = (rss0 as f64 * 0.10).max(8.0 * 1024.0);
    res.check("0 failed requests", fails.is_empty());
    res.check(
        "the EPP stayed up (no task exit)",
        alive && exits1 == exits0,
    );
    res.check(
        format!(
            "≥ 90 writes a second ({writes} in {:.1} s)",
            (t1 - t0) / 1e3
        ),
        writes as f64 >= 90.0 * cfg.churn_s,
    );
    res.check(
        "EPP RSS after the churn within +10 % (or +8 MiB) of before",
        grew <= bound,
    );
    res.check("requests kept being routed during the churn", decided > 0);
    res.happened = format!(
        "The pool file was replaced (write + rename) {writes} times in {:.1} s, alternating \
         {} endpoints in order and {} in reverse order (one more), while the EPP re-read it \
         every 10 ms; {decided} requests were routed meanwhile, none failed, no task exited, \
         RSS {:.1} → {:.1} MiB (peak {:.1}).",
        (t1 - t0) / 1e3,
        a.len(),
        b.len(),
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
    res.numbers = format!(
        "{writes} writes; {} requests, failed {}; RSS {:.1} → {:.1} MiB (peak {:.1}); task exits +{}",
        rep.records.len(),
        statuses(&fails),
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        peak as f64 / 1024.0,
        exits1 - exits0,
    );
    Ok(res)
}

async fn ensure_variant(c: &mut Cluster, v: Variant) -> anyhow::Result<()> {
    if c.variant != v || c.envoy.is_none() {
        if let Some(p) = c.envoy.take() {
            drop(p);
        }
        c.start_envoy(v).await?;
        super::wait_serving(&c.url(), secs(30.0)).await?;
    }
    Ok(())
}

async fn epp_restart(
    c: &mut Cluster,
    cfg: &ChaosCfg,
    seed: u64,
    v: Variant,
) -> anyhow::Result<CaseResult> {
    let name = match v {
        Variant::FailClose => "epp-restart-failclose",
        Variant::FailOpen => "epp-restart-failopen",
    };
    let mut res = CaseResult::new(name);
    ensure_variant(c, v).await?;
    let down = cfg.down_s.min(3.0);
    let duration = cfg.before_s + down + cfg.after_s;
    let load = spawn_load(c.url(), cfg.rate, duration, 30.0, seed);
    tokio::time::sleep(secs(cfg.before_s)).await;
    let t_kill = unix_ms();
    if let Some(p) = c.epp.take() {
        p.signal("KILL")?;
        drop(p);
    }
    until_ms(t_kill + down * 1e3).await;
    let t_restart = unix_ms();
    c.start_epp().await?;
    let t_up = unix_ms();
    let rep = join(load).await?;
    let (k, rs) = (rel(&rep, t_kill), rel(&rep, t_restart));
    let fails = failures(&rep);
    let in_flight: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| in_flight_at(r, k))
        .collect();
    let during: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| !in_flight_at(r, k))
        .collect();
    let first_ok = rep
        .records
        .iter()
        .filter(|r| r.ok() && r.sent_s >= rs)
        .map(|r| r.sent_s)
        .fold(f64::INFINITY, f64::min);
    let after_first: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| r.sent_s > first_ok)
        .collect();
    let served_down = rep
        .records
        .iter()
        .filter(|r| r.ok() && r.sent_s > k && r.sent_s < rs)
        .count();
    match v {
        Variant::FailClose => {
            // The slack is the quick variant's allowance for debug binaries on a loaded
            // machine (`ChaosCfg::quick`); 50 ms in the full run.
            res.check(
                format!(
                    "first success < 2 s + {} after the restart",
                    ms(cfg.slack_ms)
                ),
                first_ok - rs < 2.0 + cfg.slack_ms / 1000.0,
            );
            res.check("no failure after the first success", after_first.is_empty());
            res.happened = format!(
                "The `epp` was killed for {down:.0} s behind FailClose Envoy: {} request(s) in \
                 flight failed ({}), {} sent while it was down were refused ({}); restarted \
                 (serving `/metrics` after {}), the first request sent after the restart to \
                 succeed was sent {} after it; none failed after that.",
                in_flight.len(),
                statuses(&in_flight),
                during.len(),
                statuses(&during),
                ms(t_up - t_restart),
                ms((first_ok - rs) * 1e3),
            );
        }
        Variant::FailOpen => {
            // The shipped templates eject the EPP at its first refused connection (outlier
            // detection), so streams opened after that fail at once and FailOpen serves them
            // by the fallback policy. Requests already handed to the dead EPP fail open too:
            // the templates send the request body BUFFERED and no response body to the EPP, so
            // Envoy holds all it gave the EPP (with FULL_DUPLEX_STREAMED, in either direction,
            // the responses streaming at the kill were cut: envoyproxy/envoy#41276).
            let window = 1.5;
            let outside: Vec<&Record> = fails
                .iter()
                .copied()
                .filter(|r| !(in_flight_at(r, k) || (r.sent_s >= k && r.sent_s <= k + window)))
                .collect();
            res.target(
                "0 failed requests, the responses streaming at the kill included",
                fails.is_empty(),
            );
            res.check(
                format!(
                    "failures only in flight at the kill or sent ≤ {window} s after it (before Envoy ejects the EPP)"
                ),
                outside.is_empty(),
            );
            res.check(
                "requests sent while the EPP was down were served (fallback load balancing)",
                served_down > 0,
            );
            res.happened = format!(
                "The `epp` was killed for {down:.0} s behind FailOpen Envoy: {served_down} \
                 request(s) sent while it was down were served by Envoy's fallback \
                 (least-request); {} failed in all ({} in flight at the kill: {}; {} others: {}). \
                 Routed by the EPP again from {} after the restart.",
                fails.len(),
                in_flight.len(),
                statuses(&in_flight),
                during.len(),
                statuses(&during),
                ms((first_ok - rs) * 1e3),
            );
        }
    }
    res.numbers = format!(
        "{} requests; failed {} (in flight at kill {}, sent while down {}); first success after \
         restart +{}; epp up +{}",
        rep.records.len(),
        fails.len(),
        in_flight.len(),
        during.len(),
        ms((first_ok - rs) * 1e3),
        ms(t_up - t_restart),
    );
    Ok(res)
}

async fn envoy_restart(c: &mut Cluster, cfg: &ChaosCfg, seed: u64) -> anyhow::Result<CaseResult> {
    let mut res = CaseResult::new("envoy-restart");
    let down = 1.0;
    let duration = cfg.before_s + down + cfg.after_s;
    let load = spawn_load(c.url(), cfg.rate, duration, 30.0, seed);
    tokio::time::sleep(secs(cfg.before_s)).await;
    let t_kill = unix_ms();
    if let Some(p) = c.envoy.take() {
        p.signal("KILL")?;
        drop(p);
    }
    until_ms(t_kill + down * 1e3).await;
    let t_restart = unix_ms();
    let v = c.variant;
    c.start_envoy(v).await?;
    let t_ready = unix_ms();
    let rep = join(load).await?;
    let (k, rd) = (rel(&rep, t_kill), rel(&rep, t_ready));
    let fails = failures(&rep);
    let in_flight: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| in_flight_at(r, k))
        .collect();
    let during: Vec<&Record> = fails
        .iter()
        .copied()
        .filter(|r| !in_flight_at(r, k) && r.sent_s < rd)
        .collect();
    let after: Vec<&Record> = fails.iter().copied().filter(|r| r.sent_s >= rd).collect();
    res.check(
        "0 failed requests once Envoy was ready again",
        after.is_empty(),
    );
    res.check(
        "failures only while Envoy was down (in flight at the kill or sent before it was ready)",
        fails.len() == in_flight.len() + during.len(),
    );
    res.happened = format!(
        "Envoy was killed and restarted {down:.0} s later (ready {} after the restart): {} \
         request(s) in flight were cut ({}), {} sent while it was down were refused at the \
         client ({}); none failed after it was ready.",
        ms(t_ready - t_restart),
        in_flight.len(),
        statuses(&in_flight),
        during.len(),
        statuses(&during),
    );
    res.numbers = format!(
        "{} requests; failed {} (in flight {}, while down {}, after ready {}); ready +{}",
        rep.records.len(),
        fails.len(),
        in_flight.len(),
        during.len(),
        after.len(),
        ms(t_ready - t_restart),
    );
    Ok(res)
}

/// The RESULTS.md section.
pub fn markdown(run: &ChaosRun) -> String {
    let c = &run.cfg;
    let mut md = format!(
        "Real processes on loopback: Envoy from the shipped `gateway-configs/envoy/envoy-plaintext.yaml` \
         (FailClose; `envoy-plaintext-failopen.yaml` for the FailOpen case) with its retries \
         (`5xx,reset,connect-failure,refused-stream`, 3 retries over the EPP's ordered list, then \
         least-request) and `per_try_idle_timeout: {}`, the `epp` (pool file re-read every 10 ms, \
         default scrape interval {:.0} ms and timeout {:.0} ms, the default profile with \
         `max-score-picker maxNumOfEndpoints: 3` so that answers carry two fallbacks), and five \
         `sim` processes of one replica each (four serving from the start, `sim-4` joins in \
         `replica-loading`). Load: Poisson {} req/s of unique prompts (median 200 tokens, 48 output \
         tokens, streamed), seeded. `/debug/pool` is read every {} ms for readiness changes and \
         every decision. Times are from the fault (wall clock; the EPP's decision timestamps).\n\n",
        c.per_try_idle_s
            .map_or("60s (shipped)".into(), |s| format!("{s}s (shortened)")),
        c.scrape_interval_ms,
        c.scrape_timeout_ms,
        c.rate,
        c.poll_ms,
    );
    md.push_str("| case | what happened | verdict | numbers |\n| --- | --- | --- | --- |\n");
    for r in &run.cases {
        md.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            r.name,
            r.happened.replace('|', "/"),
            if r.pass { "**pass**" } else { "**FAIL**" },
            r.numbers.replace('|', "/"),
        ));
    }
    if run
        .cases
        .iter()
        .any(|r| r.name == "epp-restart-failopen" && !r.pass)
    {
        md.push_str(
            "\n**FailOpen failed:** with FULL_DUPLEX_STREAMED in either direction, requests whose \
             response was streaming when the `epp` died are cut (Envoy cannot fail open once a \
             body chunk it keeps no copy of went to the processor; the shipped FailOpen \
             templates send the request body BUFFERED and no response body to the EPP for \
             this). Requests sent after the kill are not: the templates' outlier detection \
             ejects the EPP at its first refused connection (without it, Envoy kept opening \
             streams to the dead EPP until its 1 s health check failed, and those requests got \
             500: 21 in the run of 2026-11-30 00:43 UTC). Once ejected, opening the stream fails at once \
             (`no healthy upstream`) and the fallback policy serves the request.\n",
        );
    }
    md.push_str("\nChecks:\n\n");
    for r in &run.cases {
        for k in &r.checks {
            md.push_str(&format!(
                "- `{}` {} {}{}\n",
                r.name,
                if k.pass { "✓" } else { "✗" },
                k.what,
                if k.known_gap && !k.pass {
                    " — known gap, explained above"
                } else {
                    ""
                }
            ));
        }
    }
    md
}
