//! The scraper against real HTTP servers on loopback: metrics arrive, a failing endpoint goes
//! stale without losing its last values, recovery resumes updates, membership changes start and
//! stop scrapers, and a hung endpoint is cut off by the per-scrape timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, EndpointSpec, PoolSpec};
use endpoint_picker::scrape::scraper::{self, ScrapeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How a fake engine answers `/metrics`.
const HEALTHY: u32 = 0;
const FAILING: u32 = 1;
const HUNG: u32 = 2;

/// A minimal HTTP/1.1 server answering every request with the current queue value as vLLM
/// metrics (or a 500, or nothing at all).
async fn fake_engine(mode: Arc<AtomicU32>, queue: Arc<AtomicU32>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (mode, queue) = (mode.clone(), queue.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    // One request per read is enough for the scraper's small GETs.
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let response = match mode.load(Ordering::SeqCst) {
                        HEALTHY => {
                            let body = format!(
                                "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {}\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\nvllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"100\"}} 1\n",
                                queue.load(Ordering::SeqCst)
                            );
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        FAILING => {
                            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
                                .to_owned()
                        }
                        _ => std::future::pending::<String>().await,
                    };
                    if conn.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn spec(addr: SocketAddr, n: usize) -> EndpointSpec {
    EndpointSpec {
        name: format!("e{n}-rank-0"),
        pod_name: format!("e{n}"),
        namespace: "default".into(),
        address: addr,
        metrics_address: addr,
        rank: 0,
        labels: BTreeMap::new(),
    }
}

async fn until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn scrapes_go_stale_on_failure_and_recover() {
    let (mode, queue) = (
        Arc::new(AtomicU32::new(HEALTHY)),
        Arc::new(AtomicU32::new(3)),
    );
    let addr = fake_engine(mode.clone(), queue.clone()).await;
    let ds = Arc::new(Datastore::new());
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![spec(addr, 0)],
        ..Default::default()
    });
    let config = ScrapeConfig {
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds.clone(),
        Arc::new(config),
        Arc::new(()),
        token.clone(),
    ));
    let ep = || ds.snapshot().endpoints[0].clone();

    until(|| ep().metrics().waiting_queue_size == 3, "first scrape").await;
    let m = ep().metrics();
    assert_eq!(
        (m.running_requests, m.cache_block_size, m.cache_num_blocks),
        (2, Some(16), Some(100))
    );
    assert!((m.kv_cache_usage - 0.5).abs() < 1e-9);

    queue.store(7, Ordering::SeqCst);
    until(|| ep().metrics().waiting_queue_size == 7, "updated value").await;

    // Failing: values stay, the timestamp stops moving, so consumers see them go stale.
    mode.store(FAILING, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let frozen = ep().metrics().updated_at;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ep().metrics().updated_at, frozen, "no update while failing");
    assert_eq!(
        ep().metrics().waiting_queue_size,
        7,
        "last good values kept"
    );

    mode.store(HEALTHY, Ordering::SeqCst);
    until(|| ep().metrics().updated_at != frozen, "recovery").await;

    token.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn hung_endpoint_is_cut_by_the_timeout_and_others_keep_updating() {
    let (hung_mode, q1) = (Arc::new(AtomicU32::new(HUNG)), Arc::new(AtomicU32::new(1)));
    let (ok_mode, q2) = (
        Arc::new(AtomicU32::new(HEALTHY)),
        Arc::new(AtomicU32::new(4)),
    );
    let hung = fake_engine(hung_mode, q1).await;
    let ok = fake_engine(ok_mode, q2.clone()).await;
    let ds = Arc::new(Datastore::new());
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![spec(hung, 0), spec(ok, 1)],
        ..Default::default()
    });
    let config = ScrapeConfig {
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds.clone(),
        Arc::new(config),
        Arc::new(()),
        token.clone(),
    ));
    until(
        || ds.snapshot().endpoints[1].metrics().waiting_queue_size == 4,
        "healthy endpoint scraped",
    )
    .await;
    q2.store(5, Ordering::SeqCst);
    until(
        || ds.snapshot().endpoints[1].metrics().waiting_queue_size == 5,
        "healthy endpoint keeps updating",
    )
    .await;
    assert!(
        ds.snapshot().endpoints[0].metrics().updated_at.is_none(),
        "hung endpoint never produced metrics"
    );
    token.cancel();
    // The scraper stops promptly even with a hung scrape in flight.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn membership_changes_start_new_scrapers() {
    let (mode, queue) = (
        Arc::new(AtomicU32::new(HEALTHY)),
        Arc::new(AtomicU32::new(9)),
    );
    let addr = fake_engine(mode, queue).await;
    let ds = Arc::new(Datastore::new());
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![],
        ..Default::default()
    });
    let config = ScrapeConfig {
        interval: Duration::from_millis(10),
        ..Default::default()
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds.clone(),
        Arc::new(config),
        Arc::new(()),
        token.clone(),
    ));
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![spec(addr, 0)],
        ..Default::default()
    });
    until(
        || {
            ds.snapshot()
                .endpoints
                .first()
                .is_some_and(|e| e.metrics().waiting_queue_size == 9)
        },
        "new endpoint scraped",
    )
    .await;
    token.cancel();
    task.await.unwrap();
}

/// An observer whose first report panics, as a bug in metrics code would: the scrape task
/// that called it dies, and must be started again.
#[derive(Default)]
struct PanicsOnce {
    calls: AtomicU32,
    deaths: AtomicU32,
}

impl scraper::ScrapeObserver for PanicsOnce {
    fn scraped(
        &self,
        _: &endpoint_picker::datastore::Endpoint,
        _: Result<(), &scraper::ScrapeError>,
        _: Duration,
    ) {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("observer bug");
        }
    }

    fn scrape_task_died(&self, _: &endpoint_picker::datastore::Endpoint) {
        self.deaths.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_dead_scrape_task_is_restarted_and_reported() {
    let (mode, queue) = (
        Arc::new(AtomicU32::new(HEALTHY)),
        Arc::new(AtomicU32::new(7)),
    );
    let addr = fake_engine(mode, queue).await;
    let ds = Arc::new(Datastore::new());
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![spec(addr, 0)],
        ..Default::default()
    });
    let observer = Arc::new(PanicsOnce::default());
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds.clone(),
        Arc::new(ScrapeConfig {
            interval: Duration::from_millis(10),
            ..Default::default()
        }),
        observer.clone(),
        token.clone(),
    ));
    // The first scrape's report kills its task; the restarted one stores metrics.
    until(
        || ds.snapshot().endpoints[0].metrics().waiting_queue_size == 7,
        "metrics after the restart",
    )
    .await;
    assert_eq!(observer.deaths.load(Ordering::SeqCst), 1);
    token.cancel();
    task.await.unwrap();
    assert_eq!(
        observer.deaths.load(Ordering::SeqCst),
        1,
        "shutdown is no death"
    );
}
