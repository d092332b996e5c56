//! The syncer against the simulator (a vLLM-compatible engine on loopback): adapters added,
//! removed, a missing source retried with backoff, an engine restart detected and repaired, a
//! config naming another engine refused (neither calls nor the API key go there).
//!
//! Most tests drive reconcile passes one by one with an explicit `now` (no timers, no sleeps
//! as synchronisation): backoff is tested by moving `now`, not by waiting. The loop's tests
//! wait on the engine's state, polled with a deadline.

// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lora_syncer::config::{self, LoraConfig};
use lora_syncer::metrics::Metrics;
use lora_syncer::reconcile::{AdapterState, Reconciler};
use lora_syncer::target::{ConfigHost, EngineTarget};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The engine the syncer is pinned to: `engine`, on loopback (as `--engine-host=127.0.0.1
/// --engine-port=<its port>`).
fn pinned(engine: &sim::ReplicaHandle) -> EngineTarget {
    EngineTarget::pinned("127.0.0.1", engine.addr().port())
}

async fn engine(config: sim::Config) -> sim::ReplicaHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::spawn_replica(config, listener, 0).await.unwrap()
}

fn config_for(
    engine: &sim::ReplicaHandle,
    exist: &[(&str, &str)],
    not_exist: &[(&str, &str)],
) -> LoraConfig {
    config::parse(
        &config_text("127.0.0.1", engine.addr().port(), exist, not_exist),
        true,
    )
    .unwrap()
}

/// A config file naming the engine at `host:port`.
fn config_text(
    host: &str,
    port: u16,
    exist: &[(&str, &str)],
    not_exist: &[(&str, &str)],
) -> String {
    let list = |items: &[(&str, &str)]| -> String {
        items
            .iter()
            .map(|(id, source)| format!("    - id: {id}\n      source: {source}\n"))
            .collect()
    };
    let mut text =
        format!("vLLMLoRAConfig:\n  host: {host}\n  port: {port}\n  defaultBaseModel: {BASE}\n");
    if !exist.is_empty() {
        text += &format!("  ensureExist:\n    models:\n{}", list(exist));
    }
    if !not_exist.is_empty() {
        text += &format!("  ensureNotExist:\n    models:\n{}", list(not_exist));
    }
    text
}

fn exposition(metrics: &Metrics) -> String {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

#[tokio::test]
async fn adds_then_removes_adapters() {
    let sim = engine(sim::Config::fast()).await;
    let metrics = Arc::new(Metrics::default());
    let mut r = Reconciler::new(
        pinned(&sim),
        config_for(
            &sim,
            &[("food-review", "org/food-review"), ("sql", "org/sql")],
            &[],
        ),
        metrics.clone(),
    );
    let now = Instant::now();
    let report = r.pass(now).await;
    assert!(report.engine_available);
    assert_eq!(report.loaded, ["food-review", "sql"]);
    assert!(sim.engine().has_lora("food-review") && sim.engine().has_lora("sql"));
    assert_eq!(r.state("sql"), Some(AdapterState::Loaded));
    // A second pass has nothing to do.
    let report = r.pass(now).await;
    assert!(report.loaded.is_empty() && report.failed.is_empty());

    // "sql" moves to ensureNotExist; "food-review" is dropped from the file (left alone).
    r.set_config(config_for(&sim, &[], &[("sql", "org/sql")]));
    let report = r.pass(now).await;
    assert_eq!(report.unloaded, ["sql"]);
    assert!(!sim.engine().has_lora("sql"));
    assert!(
        sim.engine().has_lora("food-review"),
        "undeclared adapters are not touched"
    );
    assert_eq!(r.state("sql"), Some(AdapterState::Unloaded));
    assert_eq!(r.state("food-review"), None);
    let text = exposition(&metrics);
    assert!(
        text.contains(r#"lora_syncer_adapter_status{adapter_name="sql"} 0"#),
        "{text}"
    );
    assert!(!text.contains(r#"adapter_name="food-review""#), "{text}");
    assert!(text.contains(r#"lora_syncer_operations_total{operation="load",result="ok"} 2"#));
    assert!(text.contains(r#"lora_syncer_operations_total{operation="unload",result="ok"} 1"#));
}

/// An engine behind vLLM's `--api-key` refuses the syncer's calls without the key (401) and
/// takes them with it.
#[tokio::test]
async fn the_api_key_is_sent_to_an_engine_that_wants_one() {
    let sim = engine(sim::Config {
        api_key: Some("secret".into()),
        ..sim::Config::fast()
    })
    .await;
    let adapters = [("sql", "org/sql")];
    let now = Instant::now();
    let mut keyless = Reconciler::new(
        pinned(&sim),
        config_for(&sim, &adapters, &[]),
        Arc::default(),
    );
    let report = keyless.pass(now).await;
    assert!(!report.engine_available, "its model list refused");
    assert!(report.loaded.is_empty());
    assert!(!sim.engine().has_lora("sql"));
    let keyed_target = pinned(&sim).with_api_key(Some(Arc::from("secret")));
    let mut keyed = Reconciler::new(
        keyed_target,
        config_for(&sim, &adapters, &[]),
        Arc::default(),
    );
    let report = keyed.pass(now).await;
    assert_eq!(report.loaded, ["sql"]);
    assert!(sim.engine().has_lora("sql"));
    // A config change keeps the engine and its key.
    keyed.set_config(config_for(&sim, &[], &[("sql", "org/sql")]));
    assert_eq!(keyed.pass(now).await.unloaded, ["sql"]);
}

#[tokio::test]
async fn a_missing_source_fails_backs_off_and_loads_once_it_exists() {
    let sim = engine(sim::Config {
        // 1,000 bytes at 10,000 bytes/s: the load takes at least 100 ms.
        lora_load_bytes_per_second: 10_000,
        ..sim::Config::fast()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("lora-syncer-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let source = dir.join("ski-resorts");
    let metrics = Arc::new(Metrics::default());
    let mut r = Reconciler::new(
        pinned(&sim),
        config_for(&sim, &[("ski-resorts", source.to_str().unwrap())], &[]),
        metrics.clone(),
    );
    let t0 = Instant::now();
    let report = r.pass(t0).await;
    assert_eq!(report.failed, ["ski-resorts"]);
    assert_eq!(r.state("ski-resorts"), Some(AdapterState::Failed));
    let error = r.last_error("ski-resorts").unwrap();
    assert!(
        error.contains("404") && error.contains("No adapter found"),
        "{error}"
    );
    // The engine refused the request: the first retry waits 30 s from the refusal.
    let retry = r.next_retry().unwrap();
    assert!(
        retry >= t0 + Duration::from_secs(30) && retry <= Instant::now() + Duration::from_secs(30)
    );
    let report = r.pass(t0 + Duration::from_secs(29)).await;
    assert_eq!(report.waiting, ["ski-resorts"]);
    assert!(report.failed.is_empty(), "no call during the backoff");

    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("adapter_model.safetensors"), vec![0u8; 1_000]).unwrap();
    let began = std::time::Instant::now();
    let report = r.pass(retry).await;
    assert_eq!(report.loaded, ["ski-resorts"]);
    assert!(
        began.elapsed() >= Duration::from_millis(100),
        "the simulator charges the load by size: {:?}",
        began.elapsed()
    );
    assert!(sim.engine().has_lora("ski-resorts"));
    assert_eq!(r.next_retry(), None);
    let text = exposition(&metrics);
    assert!(
        text.contains(r#"lora_syncer_adapter_state{adapter_name="ski-resorts",state="loaded"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"lora_syncer_operations_total{operation="load",result="error"} 1"#));
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn post(url: &str, body: &str) -> u16 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    client.request(req).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn an_engine_restart_is_detected_and_adapters_are_loaded_again() {
    let sim = engine(sim::Config {
        lora_modules: vec!["preloaded".into()],
        ..sim::Config::fast()
    })
    .await;
    let metrics = Arc::new(Metrics::default());
    let mut r = Reconciler::new(
        pinned(&sim),
        config_for(
            &sim,
            &[("food-review", "org/food-review"), ("preloaded", "org/p")],
            &[],
        ),
        metrics.clone(),
    );
    let now = Instant::now();
    let report = r.pass(now).await;
    assert_eq!(
        report.loaded,
        ["food-review"],
        "the preloaded adapter is found, not loaded"
    );
    assert_eq!(r.state("preloaded"), Some(AdapterState::Loaded));

    // The engine restarts and is still loading: /v1/models answers 503; nothing is done.
    assert_eq!(
        post(
            &format!("{}/admin/reload", sim.url()),
            r#"{"seconds": 3600}"#
        )
        .await,
        200
    );
    assert!(
        !sim.engine().has_lora("food-review"),
        "a restart forgets run-time adapters"
    );
    let report = r.pass(now).await;
    assert!(!report.engine_available);
    assert_eq!(
        r.state("food-review"),
        Some(AdapterState::Loaded),
        "unknown until it answers"
    );

    // Loaded: the syncer sees the adapter gone and loads it again.
    sim.set_loading(Duration::ZERO);
    let report = r.pass(now).await;
    assert!(report.engine_available);
    assert_eq!(report.lost, ["food-review"]);
    assert_eq!(report.loaded, ["food-review"]);
    assert!(sim.engine().has_lora("food-review"));
    let text = exposition(&metrics);
    assert!(
        text.contains("lora_syncer_engine_restarts_total 1"),
        "{text}"
    );
    assert!(text.contains(r#"lora_syncer_reconciles_total{result="engine_unavailable"} 1"#));
}

#[tokio::test]
async fn conflicts_are_left_alone() {
    let sim = engine(sim::Config::fast()).await;
    let mut cfg = config_for(&sim, &[("a", "org/a")], &[("a", "org/a")]);
    assert_eq!(cfg.conflicts.len(), 1);
    cfg.ensure_exist.insert(
        "b".into(),
        config::Adapter {
            id: "b".into(),
            source: "org/b".into(),
            base_model: None,
        },
    );
    let mut r = Reconciler::new(pinned(&sim), cfg, Arc::new(Metrics::default()));
    let report = r.pass(Instant::now()).await;
    assert_eq!(report.loaded, ["b"]);
    assert_eq!(r.state("a"), Some(AdapterState::Conflict));
    assert!(!sim.engine().has_lora("a"));
}

/// The loop itself: a pass at start, one at once on a config change, and the repair after a
/// restart within `--reconcile-trigger`. Waits are on the engine's state, bounded.
#[tokio::test]
async fn the_loop_follows_config_changes_and_restarts() {
    use lora_syncer::run::{Pacing, reconcile_loop};
    let sim = engine(sim::Config::fast()).await;
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = tokio::sync::watch::channel(Some(config_for(&sim, &[("a", "org/a")], &[])));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(reconcile_loop(
        rx,
        Pacing {
            reconcile_every: Duration::from_millis(50),
            health_check_interval: Duration::from_millis(10),
            health_check_timeout: Duration::from_secs(10),
        },
        pinned(&sim),
        metrics.clone(),
        shutdown.clone(),
    ));
    until("a loaded", || sim.engine().has_lora("a")).await;
    tx.send(Some(config_for(&sim, &[("b", "org/b")], &[("a", "org/a")])))
        .unwrap();
    until("a unloaded, b loaded", || {
        !sim.engine().has_lora("a") && sim.engine().has_lora("b")
    })
    .await;
    assert_eq!(
        post(&format!("{}/admin/reload", sim.url()), r#"{"seconds": 0}"#).await,
        200
    );
    until("b loaded again after the restart", || {
        sim.engine().has_lora("b")
    })
    .await;
    until("the restart counted", || metrics.engine_restarts.get() == 1).await;
    shutdown.cancel();
    task.await.unwrap();
}

/// A simulator that loads adapters at 1 byte/s (paused time makes that virtual), and a
/// directory of adapter sources, made by size (`source`) and removed with it.
struct SlowLoads {
    sim: sim::ReplicaHandle,
    dir: std::path::PathBuf,
}

impl SlowLoads {
    async fn new(tag: &str) -> Self {
        let sim = engine(sim::Config {
            lora_load_bytes_per_second: 1,
            ..sim::Config::fast()
        })
        .await;
        let dir = std::env::temp_dir().join(format!("lora-syncer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self { sim, dir }
    }

    /// An adapter directory of `bytes` of weights: `bytes` seconds to load.
    fn source(&self, name: &str, bytes: usize) -> String {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), vec![0u8; bytes]).unwrap();
        d.to_str().unwrap().to_owned()
    }
}

impl Drop for SlowLoads {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An engine that lists its adapters but hangs on loads costs a pass one call timeout, not one
/// per adapter: the pass ends at the first call with no answer, and the unloads went first.
/// Paused time: the engine's load (by size, 1 byte/s) and the client's timeout are virtual.
#[tokio::test(start_paused = true)]
async fn a_hanging_engine_ends_the_pass_at_its_first_timeout() {
    let loads = SlowLoads::new("hang").await;
    let (sim, source) = (&loads.sim, |name: &str, bytes: usize| {
        loads.source(name, bytes)
    });
    let (old, slow) = (source("old", 0), source("slow", 1_000));
    let url = format!("http://{}/v1/load_lora_adapter", sim.addr());
    let loaded = post(
        &url,
        &format!(r#"{{"lora_name":"old","lora_path":"{old}"}}"#),
    )
    .await;
    assert_eq!(loaded, 200);
    let metrics = Arc::new(Metrics::default());
    let mut r = Reconciler::new(
        pinned(sim),
        config_for(
            sim,
            &[("slow-1", &slow), ("slow-2", &slow), ("slow-3", &slow)],
            &[("old", &old)],
        ),
        metrics.clone(),
    );
    let began = Instant::now();
    let report = r.pass(began).await;
    let took = began.elapsed();
    assert_eq!(report.unloaded, ["old"], "unloads first");
    assert_eq!(report.failed, ["slow-1"]);
    assert!(report.cut_short);
    assert!(report.loaded.is_empty());
    assert!(
        took < Duration::from_secs(200),
        "one call timeout (120 s), not three: {took:?}"
    );
    assert_eq!(r.state("slow-2"), Some(AdapterState::Pending));
    let text = exposition(&metrics);
    assert!(
        text.contains(r#"lora_syncer_reconciles_total{result="engine_unavailable"} 1"#),
        "{text}"
    );
}

/// A pass cut short by an adapter whose load hangs backs that adapter off from when its call
/// gave up (not from when the pass began, which with a 120 s call timeout left every back-off
/// under two minutes already spent), and the next pass starts with the adapters after it, so one
/// hanging adapter cannot keep the others from ever being tried. Paused time.
#[tokio::test(start_paused = true)]
async fn a_pass_cut_short_resumes_after_the_adapter_that_hung() {
    let loads = SlowLoads::new("resume").await;
    let (sim, source) = (&loads.sim, |name: &str, bytes: usize| {
        loads.source(name, bytes)
    });
    let (slow, quick) = (source("slow", 1_000), source("quick", 0));
    let mut r = Reconciler::new(
        pinned(sim),
        config_for(sim, &[("a-slow", &slow), ("b-quick", &quick)], &[]),
        Arc::new(Metrics::default()),
    );
    let report = r.pass(Instant::now()).await;
    assert_eq!(report.failed, ["a-slow"]);
    assert!(report.cut_short && report.loaded.is_empty());
    let retry = r.next_retry().unwrap();
    assert!(
        retry >= Instant::now() + lora_syncer::reconcile::INITIAL_BACKOFF,
        "backed off from the failure, not from the pass's start ({:?} early)",
        (Instant::now() + lora_syncer::reconcile::INITIAL_BACKOFF) - retry
    );
    // At once: the hung adapter waits out its back-off, the one after it loads.
    let report = r.pass(Instant::now()).await;
    assert_eq!(
        (report.loaded.as_slice(), report.waiting.as_slice()),
        (&["b-quick".to_owned()][..], &["a-slow".to_owned()][..])
    );
    // Past its back-off, a-slow is tried first again (the last pass was not cut short) and cuts
    // this pass short before c-quick; the next pass resumes after it: c-quick, then a-slow last.
    r.set_config(config_for(
        sim,
        &[("a-slow", &slow), ("b-quick", &quick), ("c-quick", &quick)],
        &[],
    ));
    let report = r.pass(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(report.failed, ["a-slow"]);
    assert!(report.cut_short);
    assert!(report.loaded.is_empty(), "{report:?}");
    let report = r.pass(Instant::now() + Duration::from_secs(60)).await;
    assert_eq!(
        report.loaded,
        ["c-quick"],
        "resumed after a-slow: {report:?}"
    );
    assert_eq!(report.failed, ["a-slow"], "then a-slow, last");
}

/// A config change ends the pass under way: an adapter the operator pulls (`ensureNotExist`)
/// is unloaded at once, not after every slow load left in the pass. Paused time: loads take
/// 100 s each (by size, 1 byte/s), within the call timeout.
#[tokio::test(start_paused = true)]
async fn a_config_change_ends_the_pass_under_way() {
    use lora_syncer::run::{Pacing, reconcile_loop};
    let loads = SlowLoads::new("interrupt").await;
    let (sim, source) = (&loads.sim, |name: &str, bytes: usize| {
        loads.source(name, bytes)
    });
    let (bad, slow) = (source("bad", 0), source("slow", 100));
    let load = format!("{}/v1/load_lora_adapter", sim.url());
    let body = format!(r#"{{"lora_name":"bad","lora_path":"{bad}"}}"#);
    assert_eq!(post(&load, &body).await, 200);
    let exist = [
        ("slow-1", slow.as_str()),
        ("slow-2", &slow),
        ("slow-3", &slow),
    ];
    let (tx, rx) = tokio::sync::watch::channel(Some(config_for(sim, &exist, &[])));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(reconcile_loop(
        rx,
        Pacing {
            reconcile_every: Duration::from_secs(5),
            health_check_interval: Duration::from_millis(10),
            health_check_timeout: Duration::from_secs(10),
        },
        pinned(sim),
        Arc::new(Metrics::default()),
        shutdown.clone(),
    ));
    // Virtual time: the first pass is loading slow-1 (0–100 s into it).
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert!(!sim.engine().has_lora("slow-1"), "still loading");
    let asked = Instant::now();
    tx.send(Some(config_for(sim, &exist, &[("bad", &bad)])))
        .unwrap();
    while sim.engine().has_lora("bad") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "unloaded at once, not after the pass's loads: {:?}",
        asked.elapsed()
    );
    assert!(!sim.engine().has_lora("slow-2") && !sim.engine().has_lora("slow-3"));
    shutdown.cancel();
    task.await.unwrap();
}

/// An engine that answers loads but does not keep the adapter (here: unloaded behind the
/// syncer's back right after each load) is reloaded once, as after a restart; gone again at
/// once, it is a failure, backed off, instead of a load every pass.
#[tokio::test]
async fn an_adapter_lost_twice_right_after_its_load_backs_off() {
    let sim = engine(sim::Config::fast()).await;
    let mut r = Reconciler::new(
        pinned(&sim),
        config_for(&sim, &[("food-review", "org/food-review")], &[]),
        Arc::new(Metrics::default()),
    );
    let unload = format!("{}/v1/unload_lora_adapter", sim.url());
    let t0 = Instant::now();
    assert_eq!(r.pass(t0).await.loaded, ["food-review"]);
    assert_eq!(post(&unload, r#"{"lora_name":"food-review"}"#).await, 200);
    let report = r.pass(t0 + Duration::from_secs(5)).await;
    assert_eq!(
        (report.lost.len(), report.loaded.len()),
        (1, 1),
        "as after a restart"
    );
    assert_eq!(post(&unload, r#"{"lora_name":"food-review"}"#).await, 200);
    let t2 = t0 + Duration::from_secs(10);
    let report = r.pass(t2).await;
    assert_eq!(report.failed, ["food-review"]);
    assert!(report.loaded.is_empty());
    assert_eq!(r.state("food-review"), Some(AdapterState::Failed));
    assert!(
        r.last_error("food-review")
            .unwrap()
            .contains("does not list")
    );
    assert_eq!(r.next_retry(), Some(t2 + Duration::from_secs(2)));
    // Listed after a later load: back to normal.
    let report = r.pass(t2 + Duration::from_secs(2)).await;
    assert_eq!(report.loaded, ["food-review"]);
    let report = r.pass(t2 + Duration::from_secs(7)).await;
    assert!(report.lost.is_empty() && report.failed.is_empty());
    assert_eq!(r.state("food-review"), Some(AdapterState::Loaded));
}

/// One request: `METHOD /path` and its Authorization header.
type Seen = (String, Option<String>);

/// What an HTTP server on loopback was asked.
#[derive(Clone, Default)]
struct Recorder(Arc<parking_lot::Mutex<Vec<Seen>>>);

impl Recorder {
    fn requests(&self) -> Vec<Seen> {
        self.0.lock().clone()
    }
}

/// Another team's engine, as far as the syncer can tell: answers everything 200 with an
/// empty model list, and records what it was asked.
async fn recording_engine() -> (std::net::SocketAddr, Recorder) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Recorder::default();
    let app = axum::Router::new().fallback({
        let seen = seen.clone();
        move |req: axum::extract::Request| async move {
            let auth = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            seen.0
                .lock()
                .push((format!("{} {}", req.method(), req.uri().path()), auth));
            axum::Json(serde_json::json!({"object": "list", "data": []}))
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// Waits for `cond`, 30 s at most, polling (the loop's passes are what it waits on).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Replaces `path`'s contents at once (as the kubelet swaps a ConfigMap volume's files): the
/// poller never reads half a file.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A ConfigMap edit that names another engine (B) gets neither the API key nor a single call
/// there: the syncer stays on the engine it is pinned to (A), applies the file's adapter lists
/// to it, and counts the refusal. The whole path: the file, its poller, the loop.
#[tokio::test]
async fn a_config_naming_another_engine_is_refused_and_the_key_stays_home() {
    use lora_syncer::run::{ConfigFile, Pacing, reconcile_loop};
    let a = engine(sim::Config {
        api_key: Some("secret".into()),
        ..sim::Config::fast()
    })
    .await;
    let (b, b_seen) = recording_engine().await;
    let dir = std::env::temp_dir().join(format!("lora-syncer-pin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("configmap.yaml");
    let a_port = a.addr().port();
    write_atomically(
        &path,
        &config_text("127.0.0.1", a_port, &[("a", "org/a")], &[]),
    );

    let target = pinned(&a).with_api_key(Some(Arc::from("secret")));
    let metrics = Arc::new(Metrics::default());
    let configs = Arc::new(tokio::sync::watch::channel(None).0);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn(ConfigFile::new(&path, true).run(
        Duration::from_millis(20),
        configs.clone(),
        metrics.clone(),
        target.clone(),
        shutdown.clone(),
    ));
    let reconciler = tokio::spawn(reconcile_loop(
        configs.subscribe(),
        Pacing {
            reconcile_every: Duration::from_millis(50),
            health_check_interval: Duration::from_millis(10),
            health_check_timeout: Duration::from_secs(10),
        },
        target,
        metrics.clone(),
        shutdown.clone(),
    ));
    until("a loaded on A", || a.engine().has_lora("a")).await;

    // The edit: B's address, a new adapter and the old one pulled.
    write_atomically(
        &path,
        &config_text("127.0.0.1", b.port(), &[("b", "org/b")], &[("a", "org/a")]),
    );
    until("b loaded and a unloaded, on A", || {
        a.engine().has_lora("b") && !a.engine().has_lora("a")
    })
    .await;
    // A keeps being reconciled: an engine restart is repaired there.
    assert_eq!(
        post(&format!("{}/admin/reload", a.url()), r#"{"seconds": 0}"#).await,
        200
    );
    until("b loaded again on A after its restart", || {
        a.engine().has_lora("b")
    })
    .await;
    until("the restart counted", || metrics.engine_restarts.get() == 1).await;
    // A non-loopback host is refused the same way (and counted once more).
    write_atomically(
        &path,
        &config_text("engine-b.other-team.svc", 8000, &[("b", "org/b")], &[]),
    );
    until("the second refusal counted", || {
        exposition(&metrics)
            .contains(r#"lora_syncer_config_reloads_total{result="engine_refused"} 2"#)
    })
    .await;
    assert!(
        b_seen.requests().is_empty(),
        "B was called: {:?}",
        b_seen.requests()
    );
    let text = exposition(&metrics);
    assert!(
        text.contains(r#"lora_syncer_config_reloads_total{result="ok"} 1"#),
        "{text}"
    );
    assert!(text.contains("lora_syncer_config_valid 1"), "{text}");
    shutdown.cancel();
    poller.await.unwrap();
    reconciler.await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--allow-config-host` follows the file to B; B on loopback gets the key (the pod's, or with
/// host networking the node's, own address). Non-loopback hosts are `target`'s unit tests:
/// a test cannot reach one.
#[tokio::test]
async fn an_allowed_config_host_is_called_with_the_key_on_loopback() {
    let a = engine(sim::Config::fast()).await;
    let (b, b_seen) = recording_engine().await;
    let target = pinned(&a)
        .with_api_key(Some(Arc::from("secret")))
        .with_config_host(ConfigHost::Follow);
    let on_b = config::parse(
        &config_text("localhost", b.port(), &[("b", "org/b")], &[]),
        true,
    )
    .unwrap();
    let mut r = Reconciler::new(target, on_b, Arc::default());
    assert_eq!(r.engine().url(), format!("http://localhost:{}", b.port()));
    let report = r.pass(Instant::now()).await;
    assert!(report.engine_available);
    assert!(!a.engine().has_lora("b"), "A is not the file's engine");
    let seen = b_seen.requests();
    assert!(
        seen.iter()
            .any(|(call, _)| call == "POST /v1/load_lora_adapter"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(_, auth)| auth.as_deref() == Some("Bearer secret")),
        "{seen:?}"
    );
    // Back to a file naming A: A again, nothing known about it yet.
    r.set_config(config_for(&a, &[("b", "org/b")], &[]));
    assert_eq!(r.state("b"), Some(AdapterState::Pending));
    assert_eq!(r.pass(Instant::now()).await.loaded, ["b"]);
    assert!(a.engine().has_lora("b"));
}
