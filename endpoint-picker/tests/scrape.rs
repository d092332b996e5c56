//! The scraper against real HTTP servers on loopback: metrics arrive, a failing endpoint goes
//! stale without losing its last values, recovery resumes updates, membership changes start and
//! stop scrapers, and a hung endpoint is cut off by the per-scrape timeout. Over https (a
//! self-signed TLS server): scraped without verification (the default) on one kept-alive
//! connection, refused with verification against roots that do not hold the certificate (a
//! `tls` scrape error), scraped with roots that do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, EndpointSpec, PoolSpec};
use endpoint_picker::scrape::scraper::{self, MetricsScheme, ScrapeConfig, ScrapeTls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How a fake engine answers `/metrics`.
const HEALTHY: u32 = 0;
const FAILING: u32 = 1;
const HUNG: u32 = 2;
/// 500s answered (only `scrapes_go_stale_on_failure_and_recover` makes an engine fail).
static FAILURES_ANSWERED: AtomicU32 = AtomicU32::new(0);

/// A minimal HTTP/1.1 server answering every request with the current queue value as vLLM
/// metrics (or a 500, or nothing at all).
async fn fake_engine(mode: Arc<AtomicU32>, queue: Arc<AtomicU32>) -> SocketAddr {
    fake_engine_with(mode, queue, None, Arc::default()).await
}

/// The same, over TLS when `tls` is given; `accepted` counts TCP connections.
async fn fake_engine_with(
    mode: Arc<AtomicU32>,
    queue: Arc<AtomicU32>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    accepted: Arc<AtomicU32>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let (mode, queue, tls) = (mode.clone(), queue.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        if let Ok(conn) = tls.accept(conn).await {
                            answer(conn, mode, queue).await;
                        }
                    }
                    None => answer(conn, mode, queue).await,
                }
            });
        }
    });
    addr
}

async fn answer(
    mut conn: impl AsyncRead + AsyncWrite + Unpin,
    mode: Arc<AtomicU32>,
    queue: Arc<AtomicU32>,
) {
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
                FAILURES_ANSWERED.fetch_add(1, Ordering::SeqCst);
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_owned()
            }
            _ => std::future::pending::<String>().await,
        };
        if conn.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        let _ = conn.flush().await;
    }
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
    // One endpoint's scrapes follow one another, so once a 500 is answered every good answer
    // before it is stored; three more failed scrapes then store nothing.
    let failures = || FAILURES_ANSWERED.load(Ordering::SeqCst);
    mode.store(FAILING, Ordering::SeqCst);
    until(|| failures() >= 1, "a failed scrape").await;
    let frozen = ep().metrics().updated_at;
    until(|| failures() >= 4, "three more failed scrapes").await;
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
    let outcomes = Arc::new(Outcomes::default());
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds.clone(),
        Arc::new(config),
        outcomes.clone(),
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
    // Only the hung endpoint can fail, and it does by the timeout.
    until(
        || {
            outcomes
                .0
                .lock()
                .iter()
                .any(|o| o.as_ref().is_err_and(|e| e.starts_with("Timeout(")))
        },
        "the hung scrape timed out",
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

/// A TLS acceptor for a fresh self-signed certificate naming 127.0.0.1, and that certificate.
fn self_signed_tls() -> (
    tokio_rustls::TlsAcceptor,
    rustls::pki_types::CertificateDer<'static>,
) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert)
}

/// Records every scrape outcome.
#[derive(Default)]
struct Outcomes(parking_lot::Mutex<Vec<Result<(), String>>>);

impl scraper::ScrapeObserver for Outcomes {
    fn scraped(
        &self,
        _: &endpoint_picker::datastore::Endpoint,
        result: Result<(), &scraper::ScrapeError>,
        _: Duration,
    ) {
        let outcome = result.map_err(|e| {
            // The kind, then the whole chain: the test looks for the TLS cause.
            let mut text = format!("{e:?}");
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(" <- {s}"));
                source = s.source();
            }
            text
        });
        self.0.lock().push(outcome);
    }
}

async fn scrape_tls_pool(tls: ScrapeTls, server_tls: tokio_rustls::TlsAcceptor) -> TlsRun {
    let queue = Arc::new(AtomicU32::new(6));
    let accepted = Arc::new(AtomicU32::new(0));
    let addr = fake_engine_with(
        Arc::new(AtomicU32::new(HEALTHY)),
        queue.clone(),
        Some(server_tls),
        accepted.clone(),
    )
    .await;
    let ds = Arc::new(Datastore::new());
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![spec(addr, 0)],
        ..Default::default()
    });
    let config = ScrapeConfig {
        interval: Duration::from_millis(10),
        timeout: Duration::from_secs(2),
        scheme: MetricsScheme::Https,
        tls,
        ..Default::default()
    };
    let outcomes = Arc::new(Outcomes::default());
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds.clone(),
        Arc::new(config),
        outcomes.clone(),
        token.clone(),
    ));
    TlsRun {
        ds,
        queue,
        accepted,
        outcomes,
        token,
        task,
    }
}

struct TlsRun {
    ds: Arc<Datastore>,
    queue: Arc<AtomicU32>,
    accepted: Arc<AtomicU32>,
    outcomes: Arc<Outcomes>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TlsRun {
    fn queue_seen(&self) -> u64 {
        self.ds.snapshot().endpoints[0].metrics().waiting_queue_size
    }

    async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn https_without_verification_scrapes_a_self_signed_server_on_one_connection() {
    let (server_tls, _) = self_signed_tls();
    // The default, as the reference's insecureSkipVerify: true.
    let run = scrape_tls_pool(ScrapeTls::default(), server_tls).await;
    until(|| run.queue_seen() == 6, "scraped over TLS").await;
    run.queue.store(8, Ordering::SeqCst);
    until(|| run.queue_seen() == 8, "updated over TLS").await;
    until(|| run.outcomes.0.lock().len() >= 5, "several scrapes").await;
    assert!(
        run.outcomes.0.lock().iter().all(Result::is_ok),
        "{:?}",
        run.outcomes.0.lock()
    );
    // Kept alive: every scrape so far went over one TLS connection.
    assert_eq!(run.accepted.load(Ordering::SeqCst), 1);
    run.stop().await;
}

#[tokio::test]
async fn https_with_verification_refuses_a_certificate_the_roots_do_not_hold_as_a_tls_scrape_error()
{
    let (server_tls, _) = self_signed_tls();
    let (_, other) = self_signed_tls();
    // Roots that do not hold the server's certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(other).unwrap();
    let run = scrape_tls_pool(ScrapeTls::Verify(Arc::new(roots)), server_tls).await;
    until(|| run.outcomes.0.lock().len() >= 3, "three scrape attempts").await;
    {
        let outcomes = run.outcomes.0.lock();
        for outcome in outcomes.iter() {
            let error = outcome.as_ref().expect_err("no scrape may succeed");
            assert!(error.starts_with("Tls("), "{error}");
            assert!(error.contains("InvalidCertificate"), "{error}");
        }
    }
    assert!(
        run.ds.snapshot().endpoints[0]
            .metrics()
            .updated_at
            .is_none(),
        "nothing stored from an unverified server"
    );
    run.stop().await;
}

#[tokio::test]
async fn https_with_verification_scrapes_a_server_whose_certificate_the_roots_hold() {
    let (server_tls, cert) = self_signed_tls();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let run = scrape_tls_pool(ScrapeTls::Verify(Arc::new(roots)), server_tls).await;
    // The certificate names 127.0.0.1, the endpoint's address: chain and name both verify.
    until(|| run.queue_seen() == 6, "scraped with verification").await;
    run.stop().await;
}

#[tokio::test]
async fn https_to_a_plain_http_server_is_a_tls_scrape_error() {
    let addr = fake_engine(
        Arc::new(AtomicU32::new(HEALTHY)),
        Arc::new(AtomicU32::new(1)),
    )
    .await;
    let ds = Arc::new(Datastore::new());
    ds.apply(PoolSpec {
        name: "p".into(),
        endpoints: vec![spec(addr, 0)],
        ..Default::default()
    });
    let outcomes = Arc::new(Outcomes::default());
    let token = CancellationToken::new();
    let task = tokio::spawn(scraper::run(
        ds,
        Arc::new(ScrapeConfig {
            interval: Duration::from_millis(10),
            scheme: MetricsScheme::Https,
            ..Default::default()
        }),
        outcomes.clone(),
        token.clone(),
    ));
    until(|| !outcomes.0.lock().is_empty(), "a scrape attempt").await;
    let first = outcomes.0.lock()[0]
        .clone()
        .expect_err("plain HTTP is not TLS");
    assert!(first.starts_with("Tls("), "{first}");
    token.cancel();
    task.await.unwrap();
}

#[test]
fn the_metrics_data_source_plugin_sets_scheme_and_verification() {
    let with = |params: &str| {
        endpoint_picker::config::load(
            &format!(
                "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: metrics-data-source\n  parameters: {params}\n"
            ),
            1,
        )
    };
    let c = with("{scheme: https, insecureSkipVerify: false}").unwrap();
    assert_eq!(c.scrape.scheme, Some(MetricsScheme::Https));
    assert_eq!(c.scrape.insecure_skip_verify, Some(false));
    assert!(
        c.warnings.iter().all(|w| !w.contains("https")),
        "{:?}",
        c.warnings
    );
    // Unset parameters leave the flags in charge.
    let c = with("{path: /m}").unwrap();
    assert_eq!(
        (c.scrape.scheme, c.scrape.insecure_skip_verify),
        (None, None)
    );
    let err = with("{scheme: ftp}").unwrap_err().to_string();
    assert!(err.contains("scheme") && err.contains("ftp"), "{err}");
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
