//! Leader election against a mocked API server, on paused time: each test plays the Lease API
//! request by request and watches the "is leader" channel.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::*;
use crate::fixtures::NS;
use crate::mock::{self, ApiServer, json_body, respond_json};

const NAME: &str = "epp-ns-0-pool-0.gateway-api-inference-extension.sigs.k8s.io";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ns-0/leases";

fn lease_path() -> String {
    format!("{LEASES}/{NAME}")
}

fn lease(holder: Option<&str>, rv: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 3},
    })
}

fn start() -> (
    watch::Receiver<bool>,
    JoinHandle<()>,
    ApiServer,
    CancellationToken,
) {
    let (client, server) = mock::client(NS);
    let shutdown = CancellationToken::new();
    let config = LeaseConfig::new(lease_name(NS, "pool-0"), "me".into());
    let (rx, task) = spawn(Api::namespaced(client, NS), config, shutdown.clone());
    (rx, task, server, shutdown)
}

async fn changed(rx: &mut watch::Receiver<bool>) -> bool {
    tokio::time::timeout(Duration::from_secs(60), rx.changed())
        .await
        .expect("leadership did not change in time")
        .unwrap();
    *rx.borrow_and_update()
}

/// Answers a GET of the lease.
async fn get(server: &mut ApiServer, body: Value) {
    let (_, send) = server.expect(Method::GET, &lease_path()).await;
    respond_json(send, StatusCode::OK, &body);
}

/// Expects a replace of the lease and answers it; returns what was written.
async fn put(server: &mut ApiServer, status: StatusCode, new_rv: &str) -> Value {
    let (req, send) = server.expect(Method::PUT, &lease_path()).await;
    let written = json_body(req).await;
    let mut answer = written.clone();
    answer["metadata"]["resourceVersion"] = json!(new_rv);
    if status == StatusCode::OK {
        respond_json(send, status, &answer);
    } else {
        respond_json(send, status, &mock::status(status.as_u16(), "Conflict"));
    }
    written
}

/// Plays creation: GET 404, POST 201.
async fn acquire_by_creation(server: &mut ApiServer, rx: &mut watch::Receiver<bool>) {
    let (_, send) = server.expect(Method::GET, &lease_path()).await;
    respond_json(send, StatusCode::NOT_FOUND, &mock::status(404, "NotFound"));
    let (req, send) = server.expect(Method::POST, LEASES).await;
    let created = json_body(req).await;
    assert_eq!(created["metadata"]["name"], NAME);
    assert_eq!(created["spec"]["holderIdentity"], "me");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    let mut answer = created;
    answer["metadata"]["resourceVersion"] = json!("1");
    respond_json(send, StatusCode::CREATED, &answer);
    assert!(changed(rx).await, "leader after creating the lease");
}

#[test]
fn lease_name_is_the_reference_one() {
    assert_eq!(lease_name("ns-0", "pool-0"), NAME);
}

#[tokio::test(start_paused = true)]
async fn acquire_renew_then_lose_to_another_holder() {
    let (mut rx, task, mut server, shutdown) = start();
    assert!(!*rx.borrow());
    acquire_by_creation(&mut server, &mut rx).await;

    // Renew: the write carries the resourceVersion read (optimistic concurrency) and keeps
    // the acquire time and transition count.
    let started = tokio::time::Instant::now();
    get(&mut server, {
        let mut l = lease(Some("me"), "1");
        l["spec"]["acquireTime"] = json!("2026-01-01T00:00:00.000000Z");
        l
    })
    .await;
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "renewed every retry period"
    );
    let written = put(&mut server, StatusCode::OK, "2").await;
    assert_eq!(written["metadata"]["resourceVersion"], "1");
    assert_eq!(written["spec"]["holderIdentity"], "me");
    assert_eq!(written["spec"]["leaseTransitions"], 3);
    assert_eq!(
        written["spec"]["acquireTime"],
        "2026-01-01T00:00:00.000000Z"
    );
    assert!(written["spec"]["renewTime"].is_string());
    assert!(*rx.borrow(), "still leader after renewing");

    // Someone else holds it now: leadership (and readiness) ends on the spot, and for good:
    // the task ends by itself (the EPP then drains and stops), no shutdown asked.
    get(&mut server, lease(Some("other"), "7")).await;
    assert!(!changed(&mut rx).await);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!shutdown.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_conflicting_write_loses_the_round() {
    let (mut rx, task, mut server, shutdown) = start();
    acquire_by_creation(&mut server, &mut rx).await;
    get(&mut server, lease(Some("me"), "1")).await;
    put(&mut server, StatusCode::CONFLICT, "").await;
    assert!(!changed(&mut rx).await, "a 409 means another writer won");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn failing_renewals_end_leadership_at_the_renew_deadline() {
    let (mut rx, task, mut server, shutdown) = start();
    acquire_by_creation(&mut server, &mut rx).await;
    let acquired = tokio::time::Instant::now();
    // The API server errors from now on.
    let lost = async {
        loop {
            let (_, send) = server.expect(Method::GET, &lease_path()).await;
            respond_json(
                send,
                StatusCode::INTERNAL_SERVER_ERROR,
                &mock::status(500, "InternalError"),
            );
        }
    };
    tokio::select! {
        _ = lost => unreachable!(),
        leader = changed(&mut rx) => assert!(!leader),
    }
    let after = acquired.elapsed();
    assert!(
        after >= Duration::from_secs(10) && after < Duration::from_secs(15),
        "readiness dropped after {after:?}: past the renew deadline, before the lease expires for others"
    );
    // Review: the API server is back and another replica holds the lease now. This one, which
    // led (and may still serve the gateways' open connections), stops by itself, though it
    // was no longer leader when it found out.
    get(&mut server, lease(Some("other"), "9")).await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!shutdown.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_hung_api_server_cannot_keep_a_leader_ready() {
    let (mut rx, task, mut server, shutdown) = start();
    acquire_by_creation(&mut server, &mut rx).await;
    let acquired = tokio::time::Instant::now();
    // The renewal GET is never answered.
    let (_req, _send) = server.expect(Method::GET, &lease_path()).await;
    assert!(!changed(&mut rx).await);
    assert!(acquired.elapsed() <= Duration::from_secs(10));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn standby_takes_over_an_expired_lease_and_releases_it_on_shutdown() {
    let (mut rx, task, mut server, shutdown) = start();
    let started = tokio::time::Instant::now();
    // "other" holds the lease and stops renewing: the record never changes again.
    let mut attempts = 0;
    loop {
        let (req, send) = server.next().await;
        if req.method() == Method::PUT {
            let written = json_body(req).await;
            assert_eq!(written["metadata"]["resourceVersion"], "5");
            assert_eq!(written["spec"]["holderIdentity"], "me");
            assert_eq!(written["spec"]["leaseTransitions"], 4);
            let mut answer = written;
            answer["metadata"]["resourceVersion"] = json!("6");
            respond_json(send, StatusCode::OK, &answer);
            break;
        }
        attempts += 1;
        respond_json(send, StatusCode::OK, &lease(Some("other"), "5"));
        assert!(!*rx.borrow(), "a live lease held by another is respected");
    }
    assert!(changed(&mut rx).await, "took over");
    assert!(
        started.elapsed() >= Duration::from_secs(15),
        "only after the lease duration"
    );
    assert_eq!(attempts, 9, "tried every retry period meanwhile");

    // Shutdown hands the lease back at once.
    shutdown.cancel();
    get(&mut server, lease(Some("me"), "6")).await;
    let released = put(&mut server, StatusCode::OK, "7").await;
    assert!(released["spec"]["holderIdentity"].is_null());
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!*rx.borrow());
}

/// A renewal counts from when it was sent: its answer may come late (the write committed and
/// seen by the others long before), and the leader must not stay ready past what the others
/// measure. The renewal's answer here takes 6 s; every later attempt fails; the leader steps
/// down 10 s (the renew deadline) after the renewal was sent, not after it was answered.
#[tokio::test(start_paused = true)]
async fn a_late_answer_does_not_stretch_the_renew_deadline() {
    let (mut rx, task, mut server, shutdown) = start();
    acquire_by_creation(&mut server, &mut rx).await;
    get(&mut server, lease(Some("me"), "1")).await;
    let (req, send) = server.expect(Method::PUT, &lease_path()).await;
    let sent = tokio::time::Instant::now();
    let mut answer = json_body(req).await;
    answer["metadata"]["resourceVersion"] = json!("2");
    tokio::time::sleep(Duration::from_secs(6)).await;
    respond_json(send, StatusCode::OK, &answer);
    // The API server fails every later call until leadership ends.
    let path = lease_path();
    loop {
        tokio::select! {
            r = rx.changed() => {
                r.unwrap();
                break;
            }
            (_, send) = server.expect(Method::GET, &path) => {
                respond_json(send, StatusCode::INTERNAL_SERVER_ERROR, &mock::status(500, "InternalError"));
            }
        }
    }
    assert!(!*rx.borrow());
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_secs(10) && after < Duration::from_secs(13),
        "stepped down {after:?} after the renewal was sent"
    );
    shutdown.cancel();
    task.await.unwrap();
}
