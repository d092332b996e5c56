//! Kubernetes-mode wiring: readiness follows "pool synced && leader", and the binary's
//! Kubernetes flags are validated before anything starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use endpoint_picker::datastore::{EndpointSpec, PoolSpec};
use ext_proc::server::{Listeners, PoolSource, Settings};
use ext_proc::service::ServiceOptions;
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
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let health_addr = listeners.health.local_addr().unwrap();
    let settings = Settings {
        config: endpoint_picker::config::load_default(1).unwrap(),
        options: ServiceOptions::default(),
        tls: None,
        scrape: None,
        refresh_prometheus_interval: Duration::from_secs(1),
        metrics_staleness: Duration::from_secs(2),
        pool: PoolSource::Kubernetes {
            discovery: Box::new(discovery),
            leader: Some(is_leader),
        },
        seed: 1,
        metrics_bearer_token: None,
        health_on_grpc_port: false,
        drain_grace: Duration::from_secs(1),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(ext_proc::server::serve_with_handles(
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
    // Leader election dying is the same as losing the lease.
    drop(leader);
    wait_for(&mut readiness, ServingStatus::NotServing).await;

    // An open Watch stream would hold the health server's graceful shutdown.
    drop(readiness);
    drop(health);
    shutdown.cancel();
    tokio::time::timeout(TIMEOUT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Runs `epp` with `args` and no reachable Kubernetes; returns (exit code, stderr).
fn epp(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
