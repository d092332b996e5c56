//! Kubernetes-mode wiring: readiness follows "pool synced && leader", and the binary's
//! Kubernetes flags are validated before anything starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use endpoint_picker::datastore::{EndpointSpec, PoolSpec};
use epp::server::{Listeners, PoolSource, Settings};
use ext_proc::stream::ServiceOptions;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Reads health updates until `want` arrives.
async fn wait_for(stream: &mut tonic::Streaming<HealthCheckResponse>, want: ServingStatus) {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let r = stream.next().await.unwrap().unwrap();
            if r.status == want as i32 {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("readiness never became {want:?}"));
}

fn pool() -> PoolSpec {
    PoolSpec {
        name: "pool-0".into(),
        namespace: "ns-0".into(),
        app_protocol: "http".into(),
        endpoints: vec![EndpointSpec {
            name: "a-rank-0".into(),
            pod_name: "a".into(),
            namespace: "ns-0".into(),
            address: "127.0.0.1:8000".parse().unwrap(),
            metrics_address: "127.0.0.1:8000".parse().unwrap(),
            rank: 0,
            labels: BTreeMap::new(),
        }],
    }
}

#[tokio::test]
async fn readiness_needs_the_pool_synced_and_the_lease() {
    // An API server that is not there: the watches retry with backoff and never sync, so the
    // test publishes the pool itself through the handles.
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    let discovery = k8s::watch::Discovery {
        client,
        pool: k8s::index::PoolRef {
            name: "pool-0".into(),
            namespace: "ns-0".into(),
            group: k8s::api::POOL_GROUP.into(),
        },
        metrics_port: None,
        standalone: None,
    };
    let (leader, is_leader) = tokio::sync::watch::channel(false);
    // Stands in for the lease task: it runs until told to end.
    let (end_lease, lease_ends) = tokio::sync::oneshot::channel::<()>();
    let lease_task = tokio::spawn(async move {
        let _ = lease_ends.await;
    });
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        grpc_uds: None,
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let health_addr = listeners.health.local_addr().unwrap();
    let settings = Settings {
        config: endpoint_picker::config::load_default(1).unwrap(),
        options: ServiceOptions::default(),
        debug_decisions: 0,
        tls: None,
        scrape: None,
        refresh_prometheus_interval: Duration::from_secs(1),
        metrics_staleness: Duration::from_secs(2),
        fairness_label_limit: epp::labels::DEFAULT_MAX_FAIRNESS_LABELS,
        pool: PoolSource::Kubernetes {
            discovery: Box::new(discovery),
            leader: Some(epp::server::Election::Running(is_leader, lease_task)),
        },
        seed: 1,
        admin_auth: epp::admin::AdminAuth::Open,
        debug_pool: false,
        pprof: false,
        health_on_grpc_port: false,
        drain_grace: Duration::from_secs(1),
        shutdown_delay: Default::default(),
        lora_placement: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(epp::server::serve_with_handles(
        settings,
        listeners,
        shutdown.clone(),
        move |h| {
            let _ = handles_tx.send(h);
        },
    ));
    let handles = handles_rx.await.unwrap();

    let channel = tonic::transport::Channel::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let liveness = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    let mut readiness = health
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut readiness, ServingStatus::NotServing).await;

    // Synced but a standby: not ready. Then the lease is won: ready.
    handles.datastore.apply(pool());
    leader.send_replace(true);
    wait_for(&mut readiness, ServingStatus::Serving).await;
    // Losing the lease drops readiness at once; winning it back restores it.
    leader.send_replace(false);
    wait_for(&mut readiness, ServingStatus::NotServing).await;
    leader.send_replace(true);
    wait_for(&mut readiness, ServingStatus::Serving).await;
    // The lease task ending (a supervised task readiness depends on) drops readiness, even
    // though the last word on the channel was "leader".
    end_lease.send(()).unwrap();
    wait_for(&mut readiness, ServingStatus::NotServing).await;
    drop(leader);

    // An open Watch stream would hold the health server's graceful shutdown.
    drop(readiness);
    drop(health);
    shutdown.cancel();
    // The lease task ended before the shutdown asked for it: the run reports it, so the
    // binary exits non-zero and the pod restarts rather than lingering unready.
    let ended = tokio::time::timeout(TIMEOUT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&ended, epp::server::ServeError::TaskEnded(t) if t.0 == "lease"),
        "{ended:?}"
    );
    assert_eq!(epp::supervisor::failure_exit_code(&ended), 1);
}

/// Runs `epp` with `args` and no reachable Kubernetes; returns (exit code, stderr).
fn epp(args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_epp"));
    command
        .arg("--bind-address=127.0.0.1")
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("POD_NAME")
        .env("HOME", "/nonexistent");
    let (code, stderr) = testkit::process::exit_within(command, Duration::from_secs(20));
    (code.unwrap_or(-1), stderr)
}

#[test]
fn kubernetes_flags_are_checked_before_anything_starts() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "no pool source"),
        (
            &["--pool-name=p", "--endpoint-selector=app=x"],
            "exactly one of --pool-name and --endpoint-selector",
        ),
        (
            &["--endpoint-selector=app", "--endpoint-target-ports=8000"],
            "is not key=value",
        ),
        (
            &[
                "--endpoint-selector=app=x",
                "--endpoint-target-ports=8000,8000",
            ],
            "1 to 8 unique ports",
        ),
        (
            &[
                "--pool-name=p",
                "--pool-group=inference.networking.x-k8s.io",
            ],
            "--pool-group",
        ),
        (
            &[
                "--pool-file=/nonexistent.yaml",
                "--ha-enable-leader-election",
            ],
            "--ha-enable-leader-election needs Kubernetes mode",
        ),
        // Every other check comes before the API server is dialled and the lease taken: a
        // start-up that fails must not hold a lease it would not hand back.
        (
            &["--pool-name=p", "--cert-path=/nonexistent"],
            "loading --cert-path",
        ),
        (
            &["--pool-name=p", "--ha-enable-leader-election"],
            "needs $POD_NAME",
        ),
        (
            &["--pool-name=p", "--refresh-metrics-interval=1h"],
            "metricsStalenessThreshold",
        ),
        (&["--pool-name=p"], "connecting to the Kubernetes API"),
    ];
    for (args, want) in cases {
        let (code, stderr) = epp(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: expected {want:?} in {stderr}"
        );
    }
}

/// A fake API server for the real binary: lists for the pool's namespace, watches that stay
/// open and silent, and an in-memory Lease with resourceVersions.
mod fake_api {
    use std::sync::Arc;

    use axum::body::{Body, Bytes};
    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::response::{IntoResponse, Response};
    use parking_lot::Mutex;
    use serde_json::{Value, json};

    /// What the fake has seen of the Lease.
    #[derive(Default)]
    pub struct Leases {
        pub current: Option<Value>,
        pub version: u64,
        pub writes: Vec<Value>,
    }

    pub type Shared = Arc<Mutex<Leases>>;

    /// The one bearer token the fake's TokenReview authenticates.
    pub const SCRAPER_TOKEN: &str = "scraper-token";
    /// Whom it authenticates.
    pub const SCRAPER: &str = "system:serviceaccount:monitoring:prometheus";

    fn list(items: Vec<Value>) -> Response {
        axum::Json(json!({"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": "100"}, "items": items}))
        .into_response()
    }

    fn pod(name: &str, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "ns-0", "labels": {"app": "vllm"}},
               "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
    }

    fn not_found() -> Response {
        (
            StatusCode::NOT_FOUND,
            axum::Json(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": "NotFound", "code": 404}),
            ),
        )
            .into_response()
    }

    pub async fn handle(State(leases): State<Shared>, req: Request) -> Response {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let watch = req.uri().query().unwrap_or_default().contains("watch=true");
        if watch {
            // Open and silent, like a quiet cluster.
            let silent = futures::stream::pending::<Result<Bytes, std::io::Error>>();
            return Response::new(Body::from_stream(silent));
        }
        let lease_path = "/apis/coordination.k8s.io/v1/namespaces/ns-0/leases";
        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .unwrap();
        match (method, path.as_str()) {
            (
                Method::GET,
                "/apis/inference.networking.k8s.io/v1/namespaces/ns-0/inferencepools",
            ) => list(vec![json!({
                    "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                    "metadata": {"name": "pool-0", "namespace": "ns-0"},
                    "spec": {"selector": {"matchLabels": {"app": "vllm"}},
                             "targetPorts": [{"number": 8000}, {"number": 8001}]}})]),
            (Method::GET, "/api/v1/namespaces/ns-0/pods") => {
                list(vec![pod("pod-a", "127.0.0.2"), pod("pod-b", "127.0.0.3")])
            }
            (Method::GET, p) if p.contains("/inferenceobjectives") => list(vec![]),
            // The alpha rewrite CRD is "not installed": the EPP must not care.
            (Method::GET, p) if p.contains("/inferencemodelrewrites") => not_found(),
            (Method::GET, p) if p.starts_with(lease_path) => match leases.lock().current.clone() {
                Some(l) => axum::Json(l).into_response(),
                None => not_found(),
            },
            (Method::POST | Method::PUT, p) if p.starts_with(lease_path) => {
                let mut lease: Value = serde_json::from_slice(&body).unwrap();
                let mut state = leases.lock();
                state.version += 1;
                lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
                lease["metadata"]["namespace"] = json!("ns-0");
                state.writes.push(lease.clone());
                state.current = Some(lease.clone());
                (StatusCode::OK, axum::Json(lease)).into_response()
            }
            // --metrics-endpoint-auth: one scraper token is valid, and its subject may read the
            // EPP's own URLs.
            (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
                let mut review: Value = serde_json::from_slice(&body).unwrap();
                review["status"] = if review["spec"]["token"] == SCRAPER_TOKEN {
                    json!({"authenticated": true,
                           "user": {"username": SCRAPER, "groups": ["system:serviceaccounts"]}})
                } else {
                    json!({"authenticated": false, "error": "invalid token"})
                };
                axum::Json(review).into_response()
            }
            (Method::POST, "/apis/authorization.k8s.io/v1/subjectaccessreviews") => {
                let mut review: Value = serde_json::from_slice(&body).unwrap();
                let path = review["spec"]["nonResourceAttributes"]["path"].clone();
                let allowed = review["spec"]["user"] == SCRAPER
                    && review["spec"]["nonResourceAttributes"]["verb"] == "get"
                    && (path == "/metrics" || path == "/debug/pool");
                review["status"] = json!({"allowed": allowed});
                axum::Json(review).into_response()
            }
            (m, p) => panic!("unexpected request {m} {p}"),
        }
    }
}

/// The fake API server on loopback, and a kubeconfig (named after `test`) pointing at it.
async fn fake_cluster(
    test: &str,
) -> (
    fake_api::Shared,
    std::path::PathBuf,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let leases = fake_api::Shared::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(fake_api::handle)
        .with_state(leases.clone());
    let api_server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = std::env::temp_dir().join(format!("switchyard-k8s-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: c, context: {{cluster: fake, user: u, namespace: ns-0}}}}]\n"
        ),
    )
    .unwrap();
    (leases, kubeconfig, api_server)
}

/// A start-up that fails on its configuration after the API server was dialled (a tokenizer
/// that does not load, checked inside `serve`) exits 2 without having taken the lease: the
/// lease is competed for only once everything is checked, so no standby waits out a lease
/// that nobody hands back.
#[tokio::test]
async fn a_start_up_that_fails_never_takes_the_lease() {
    let (leases, kubeconfig, api_server) = fake_cluster("fails").await;
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
                  plugins:\n- type: token-producer\n  parameters:\n    local:\n      \
                  tokenizerPath: /nonexistent/tokenizer.json\n";
    let mut command = Command::new(env!("CARGO_BIN_EXE_epp"));
    command
        .args([
            "--pool-name=pool-0",
            "--pool-namespace=ns-0",
            "--ha-enable-leader-election",
            "--bind-address=127.0.0.1",
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--secure-serving=false",
        ])
        .arg(format!("--config-text={config}"))
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("POD_NAME", "epp-0");
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        testkit::process::exit_within(command, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("tokenizer"), "{stderr}");
    // It got as far as the API server (its client was built), but never wrote the lease.
    assert!(leases.lock().writes.is_empty(), "the lease was written");
    assert!(leases.lock().current.is_none());
    api_server.abort();
    std::fs::remove_dir_all(kubeconfig.parent().unwrap()).unwrap();
}

#[tokio::test]
async fn the_binary_discovers_its_pool_and_leads_before_it_is_ready() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let (leases, kubeconfig, api_server) = fake_cluster("leads").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args([
            "--pool-name=pool-0",
            "--pool-namespace=ns-0",
            "--ha-enable-leader-election",
            "--bind-address=127.0.0.1",
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--secure-serving=false",
            "--zap-encoder=json",
            "--drain-grace-period=1s",
            "--debug-pool",
            "--seed=11",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("POD_NAME", "epp-0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("switchyard epp starting") {
                return line;
            }
        }
        panic!("epp exited before starting");
    })
    .await
    .expect("start-up line");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let v: serde_json::Value = serde_json::from_str(&started).unwrap();
    let health: std::net::SocketAddr = v["health"].as_str().unwrap().parse().unwrap();
    let metrics: std::net::SocketAddr = v["metrics"].as_str().unwrap().parse().unwrap();

    let channel = tonic::transport::Channel::from_shared(format!("http://{health}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let mut readiness = client
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut readiness, ServingStatus::Serving).await;
    drop(readiness);
    drop(client);
    {
        let state = leases.lock();
        let lease = state
            .current
            .as_ref()
            .expect("the lease was taken before readiness");
        assert_eq!(lease["spec"]["holderIdentity"], "epp-0");
        assert_eq!(
            lease["metadata"]["name"],
            "epp-ns-0-pool-0.gateway-api-inference-extension.sigs.k8s.io"
        );
    }
    // --metrics-endpoint-auth is on by default: a scraper needs a token that the API server's
    // TokenReview accepts and whose subject the SubjectAccessReview allows.
    use testkit::http::get_with;
    let bearer = format!("Bearer {}", fake_api::SCRAPER_TOKEN);
    for path in ["/metrics", "/debug/pool"] {
        assert_eq!(
            get_with(metrics, path, &[]).await.0,
            401,
            "{path} without a token"
        );
        let wrong = [("authorization", "Bearer guessed")];
        assert_eq!(
            get_with(metrics, path, &wrong).await.0,
            401,
            "{path} bad token"
        );
    }
    let (status, text) = get_with(metrics, "/metrics", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("inference_pool_ready_pods"), "{text}");
    // Two ready pods × two target ports, named by rank.
    let (status, pool) = get_with(metrics, "/debug/pool", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{pool}");
    for name in [
        "pod-a-rank-0",
        "pod-a-rank-1",
        "pod-b-rank-0",
        "pod-b-rank-1",
    ] {
        assert!(pool.contains(name), "{name} missing from {pool}");
    }

    // SIGTERM: the EPP drains and hands the lease back.
    testkit::process::sigterm(child.id().unwrap());
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("drains in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let state = leases.lock();
    let last = state.writes.last().unwrap();
    assert!(last["spec"]["holderIdentity"].is_null(), "released: {last}");
    drop(state);
    api_server.abort();
    std::fs::remove_dir_all(kubeconfig.parent().unwrap()).unwrap();
}
