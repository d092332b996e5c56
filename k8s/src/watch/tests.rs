//! Watch-level tests against a mocked API server: the real watchers and a real `kube::Client`
//! talk to a scripted `tower-test` service. Time is paused, so the watchers' backoff elapses
//! instantly once everything else is idle.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

use super::*;
use crate::fixtures::*;
use crate::mock::{self, respond_json};

const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/ns-0/inferencepools";
const PODS: &str = "/api/v1/namespaces/ns-0/pods";
const OBJECTIVES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns-0/inferenceobjectives";
const REWRITES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns-0/inferencemodelrewrites";

fn v<T: serde::Serialize>(obj: T) -> Value {
    serde_json::to_value(obj).unwrap()
}

/// Waits (bounded) for the datastore to publish a new snapshot.
async fn next_snapshot(rx: &mut tokio::sync::watch::Receiver<u64>) {
    tokio::time::timeout(Duration::from_secs(60), rx.changed())
        .await
        .expect("no new snapshot in time")
        .unwrap();
}

async fn join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("watch task did not stop")
            .unwrap();
    }
}

/// Runs one watch until the token ends it.
fn run(task: WatchTask, token: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn((task.run)(token))
}

#[tokio::test(start_paused = true)]
async fn list_watch_error_and_relist_with_readiness_gating() {
    let publisher = publisher();
    let index = Index::new(pool_ref(), None, publisher.clone()).shared();
    let (pool_client, mut pool_server) = mock::client(NS);
    let (pod_client, mut pod_server) = mock::client(NS);
    let shutdown = CancellationToken::new();
    let tasks = vec![
        run(
            pools(Api::namespaced(pool_client, NS), POOL, index.clone()),
            shutdown.child_token(),
        ),
        run(
            pods(
                Api::namespaced(pod_client, NS),
                watch_config(),
                index.clone(),
            ),
            shutdown.child_token(),
        ),
    ];
    let mut versions = publisher.datastore.subscribe();

    // The pool is listed by name.
    let req = pool_server
        .expect_list(POOLS, vec![v(pool(POOL, "vllm", &[8000]))], "10")
        .await;
    assert!(
        req.uri()
            .query()
            .unwrap()
            .contains("fieldSelector=metadata.name%3Dpool-0"),
        "{}",
        req.uri()
    );
    // The watch only starts once the listing has been handed to the index.
    let (req, pool_watch) = pool_server.expect_watch(POOLS).await;
    // The server ends each watch within a minute, so a watch on a dead connection is noticed
    // then, not after kube's 290 s.
    assert!(
        req.uri().query().unwrap().contains("timeoutSeconds=60"),
        "{}",
        req.uri()
    );
    assert!(
        !publisher.datastore.is_synced(),
        "not ready: the pods have not been listed yet"
    );

    pod_server
        .expect_list(
            PODS,
            vec![
                v(pod("a", "vllm", "10.0.0.1")),
                v(unready(pod("b", "vllm", "10.0.0.2"))),
            ],
            "20",
        )
        .await;
    let (req, pod_watch) = pod_server.expect_watch(PODS).await;
    assert!(req.uri().query().unwrap().contains("resourceVersion=20"));
    assert!(publisher.datastore.is_synced(), "both lists done: ready");
    assert_eq!(
        endpoints(&publisher),
        vec![("a-rank-0".into(), "10.0.0.1:8000".into())]
    );
    versions.mark_unchanged();

    // Watch events.
    pod_watch
        .send("ADDED", v(pod("c", "vllm", "10.0.0.3")))
        .await;
    next_snapshot(&mut versions).await;
    assert_eq!(endpoints(&publisher).len(), 2);
    pod_watch
        .send("MODIFIED", v(pod("b", "vllm", "10.0.0.2")))
        .await;
    next_snapshot(&mut versions).await;
    assert_eq!(endpoints(&publisher).len(), 3);
    pod_watch
        .send("DELETED", v(pod("a", "vllm", "10.0.0.1")))
        .await;
    next_snapshot(&mut versions).await;
    let names: Vec<String> = endpoints(&publisher).into_iter().map(|e| e.0).collect();
    assert_eq!(names, vec!["b-rank-0", "c-rank-0"]);
    pool_watch
        .send("MODIFIED", v(pool(POOL, "vllm", &[8000, 8001])))
        .await;
    next_snapshot(&mut versions).await;
    assert_eq!(endpoints(&publisher).len(), 4);

    // The watch expires (410 Gone): the watcher relists. The first relist fails with a 500,
    // the backoff retries, and the second relist replaces the pod set (b vanished meanwhile).
    pod_watch.send("ERROR", mock::status(410, "Expired")).await;
    let (_, send) = pod_server.expect_get(PODS, false).await;
    respond_json(
        send,
        StatusCode::INTERNAL_SERVER_ERROR,
        &mock::status(500, "InternalError"),
    );
    pod_server
        .expect_list(PODS, vec![v(pod("c", "vllm", "10.0.0.3"))], "30")
        .await;
    let (req, _pod_watch) = pod_server.expect_watch(PODS).await;
    assert!(req.uri().query().unwrap().contains("resourceVersion=30"));
    let names: Vec<String> = endpoints(&publisher).into_iter().map(|e| e.0).collect();
    assert_eq!(names, vec!["c-rank-0", "c-rank-1"]);
    assert!(publisher.datastore.is_synced());

    shutdown.cancel();
    join(tasks).await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_pool_keeps_readiness_back_until_it_appears() {
    let publisher = publisher();
    let index = Index::new(pool_ref(), None, publisher.clone()).shared();
    let (pool_client, mut pool_server) = mock::client(NS);
    let (pod_client, mut pod_server) = mock::client(NS);
    let shutdown = CancellationToken::new();
    let tasks = vec![
        run(
            pools(Api::namespaced(pool_client, NS), POOL, index.clone()),
            shutdown.child_token(),
        ),
        run(
            pods(
                Api::namespaced(pod_client, NS),
                watcher::Config::default(),
                index.clone(),
            ),
            shutdown.child_token(),
        ),
    ];
    pool_server.expect_list(POOLS, vec![], "1").await;
    let (_, pool_watch) = pool_server.expect_watch(POOLS).await;
    pod_server
        .expect_list(PODS, vec![v(pod("a", "vllm", "10.0.0.1"))], "2")
        .await;
    let (_, _pod_watch) = pod_server.expect_watch(PODS).await;
    assert!(!publisher.datastore.is_synced());
    let mut versions = publisher.datastore.subscribe();
    pool_watch
        .send("ADDED", v(pool(POOL, "vllm", &[8000])))
        .await;
    next_snapshot(&mut versions).await;
    assert!(publisher.datastore.is_synced());
    assert_eq!(endpoints(&publisher).len(), 1);
    shutdown.cancel();
    join(tasks).await;
}

/// The pool, pod, objective and rewrite watches of one index that awaits the policies, each
/// on its own mocked API server.
struct AllWatches {
    publisher: Publisher,
    pool_server: mock::ApiServer,
    pod_server: mock::ApiServer,
    objective_server: mock::ApiServer,
    rewrite_server: mock::ApiServer,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

fn all_watches() -> AllWatches {
    let publisher = publisher();
    let index = Index::new(pool_ref(), None, publisher.clone())
        .awaiting_policies()
        .shared();
    let (pool_client, pool_server) = mock::client(NS);
    let (pod_client, pod_server) = mock::client(NS);
    let (oc, objective_server) = mock::client(NS);
    let (rc, rewrite_server) = mock::client(NS);
    let shutdown = CancellationToken::new();
    let tasks = vec![
        run(
            pools(Api::namespaced(pool_client, NS), POOL, index.clone()),
            shutdown.child_token(),
        ),
        run(
            pods(
                Api::namespaced(pod_client, NS),
                watch_config(),
                index.clone(),
            ),
            shutdown.child_token(),
        ),
        run(
            task::<InferenceObjective>(
                "inferenceobjectives",
                Api::namespaced(oc, NS),
                watch_config(),
                index.clone(),
            ),
            shutdown.child_token(),
        ),
        run(
            task::<InferenceModelRewrite>(
                "inferencemodelrewrites",
                Api::namespaced(rc, NS),
                watch_config(),
                index,
            ),
            shutdown.child_token(),
        ),
    ];
    AllWatches {
        publisher,
        pool_server,
        pod_server,
        objective_server,
        rewrite_server,
        shutdown,
        tasks,
    }
}

/// Lists the pool and one pod of it, and keeps their watches open (the caller holds them).
async fn list_the_pool_and_one_pod(
    pool_server: &mut mock::ApiServer,
    pod_server: &mut mock::ApiServer,
) -> (mock::WatchStream, mock::WatchStream) {
    pool_server
        .expect_list(POOLS, vec![v(pool(POOL, "vllm", &[8000]))], "1")
        .await;
    let (_, pool_watch) = pool_server.expect_watch(POOLS).await;
    pod_server
        .expect_list(PODS, vec![v(pod("a", "vllm", "10.0.0.1"))], "2")
        .await;
    let (_, pod_watch) = pod_server.expect_watch(PODS).await;
    (pool_watch, pod_watch)
}

/// Readiness waits for the objectives and rewrites to answer once: a listing, or a 404 or 403
/// (the kind is not installed, or not granted). A 500 is retried and keeps it waiting.
#[tokio::test(start_paused = true)]
async fn readiness_waits_for_the_policies_to_answer_once() {
    let AllWatches {
        publisher,
        mut pool_server,
        mut pod_server,
        mut objective_server,
        mut rewrite_server,
        shutdown,
        tasks,
    } = all_watches();
    let _watches = list_the_pool_and_one_pod(&mut pool_server, &mut pod_server).await;
    // The rewrite CRD is not installed: that is an answer.
    let (_, send) = rewrite_server.expect_get(REWRITES, false).await;
    respond_json(send, StatusCode::NOT_FOUND, &mock::status(404, "NotFound"));
    // The objectives fail with a 500: no answer yet, and the retry is awaited.
    let (_, send) = objective_server.expect_get(OBJECTIVES, false).await;
    respond_json(
        send,
        StatusCode::INTERNAL_SERVER_ERROR,
        &mock::status(500, "InternalError"),
    );
    // The rewrites' retry proves the 404 was handled (the watch is retried after it).
    let (_, send) = rewrite_server.expect_get(REWRITES, false).await;
    assert!(
        !publisher.datastore.is_synced(),
        "pool and pods listed, the objectives unheard: not ready"
    );
    respond_json(send, StatusCode::NOT_FOUND, &mock::status(404, "NotFound"));
    objective_server
        .expect_list(OBJECTIVES, vec![v(objective("batch", POOL, Some(-1)))], "3")
        .await;
    let (_, _objective_watch) = objective_server.expect_watch(OBJECTIVES).await;
    assert!(publisher.datastore.is_synced(), "every kind answered");
    assert_eq!(
        publisher
            .director
            .as_ref()
            .unwrap()
            .policies()
            .objectives
            .get("batch"),
        Some(&-1),
        "the objectives arrived with the pool, not after it"
    );
    assert_eq!(endpoints(&publisher).len(), 1);
    shutdown.cancel();
    join(tasks).await;
}

/// Review: a kind that fails with a 500 for good (a conversion webhook down) kept readiness
/// down for good. After [`UNAVAILABLE_AFTER`] of failures the pool goes on without it.
#[tokio::test(start_paused = true)]
async fn a_kind_failing_for_good_holds_readiness_only_so_long() {
    let AllWatches {
        publisher,
        mut pool_server,
        mut pod_server,
        mut objective_server,
        mut rewrite_server,
        shutdown,
        tasks,
    } = all_watches();
    let started = tokio::time::Instant::now();
    let _watches = list_the_pool_and_one_pod(&mut pool_server, &mut pod_server).await;
    rewrite_server.expect_list(REWRITES, vec![], "3").await;
    let (_, _rewrite_watch) = rewrite_server.expect_watch(REWRITES).await;
    let mut failures = 0;
    while !publisher.datastore.is_synced() {
        assert!(failures < 100, "never ready");
        // Retries go on after readiness too, so this never waits for nothing.
        let (_, send) = objective_server.expect_get(OBJECTIVES, false).await;
        respond_json(
            send,
            StatusCode::INTERNAL_SERVER_ERROR,
            &mock::status(500, "InternalError"),
        );
        failures += 1;
    }
    // Ready no sooner than the grace (an early readiness would have ended the loop early).
    let waited = started.elapsed();
    assert!(
        waited >= UNAVAILABLE_AFTER && waited < UNAVAILABLE_AFTER * 3,
        "{waited:?} after {failures} failures"
    );
    assert_eq!(endpoints(&publisher).len(), 1);
    shutdown.cancel();
    join(tasks).await;
}

#[tokio::test(start_paused = true)]
async fn objectives_and_rewrites_reach_the_director() {
    let publisher = publisher();
    let index = Index::new(pool_ref(), None, publisher.clone()).shared();
    let (oc, mut objective_server) = mock::client(NS);
    let (rc, mut rewrite_server) = mock::client(NS);
    let shutdown = CancellationToken::new();
    let tasks = vec![
        run(
            task::<InferenceObjective>(
                "inferenceobjectives",
                Api::namespaced(oc, NS),
                watcher::Config::default(),
                index.clone(),
            ),
            shutdown.child_token(),
        ),
        run(
            task::<InferenceModelRewrite>(
                "inferencemodelrewrites",
                Api::namespaced(rc, NS),
                watcher::Config::default(),
                index.clone(),
            ),
            shutdown.child_token(),
        ),
    ];
    let director = publisher.director.clone().unwrap();

    // The alpha CRDs may not be installed: a 404 is retried with backoff, nothing breaks.
    let (_, send) = objective_server.expect_get(OBJECTIVES, false).await;
    respond_json(send, StatusCode::NOT_FOUND, &mock::status(404, "NotFound"));
    objective_server
        .expect_list(OBJECTIVES, vec![v(objective("batch", POOL, Some(-1)))], "5")
        .await;
    let (_, objective_watch) = objective_server.expect_watch(OBJECTIVES).await;
    assert_eq!(director.policies().objectives.get("batch"), Some(&-1));

    objective_watch
        .send("ADDED", v(objective("chat", POOL, Some(7))))
        .await;
    // Closing the stream makes the watcher re-watch; that request proves the event before it
    // was handled.
    drop(objective_watch);
    let (_, _objective_watch) = objective_server.expect_watch(OBJECTIVES).await;
    assert_eq!(director.policies().objectives.get("chat"), Some(&7));

    rewrite_server
        .expect_list(
            REWRITES,
            vec![
                v(rewrite("b", POOL, 200, &[(&["m"], &[("m-b", 1)])])),
                v(rewrite("a", POOL, 100, &[(&["m"], &[("m-a", 1)])])),
            ],
            "6",
        )
        .await;
    let (_, _rewrite_watch) = rewrite_server.expect_watch(REWRITES).await;
    let policies = director.policies();
    let (res, rule) = policies.rewrite_rule("m").unwrap();
    assert_eq!(
        (res.name.as_str(), rule.targets[0].model.as_str()),
        ("a", "m-a")
    );
    // Policies do not gate readiness.
    assert!(!publisher.datastore.is_synced());

    shutdown.cancel();
    join(tasks).await;
}

#[test]
fn standalone_flags_parse() {
    let spec = standalone_spec("app=vllm, tier = gpu", &[8000, 8001]).unwrap();
    assert_eq!(spec.selector.match_labels.len(), 2);
    assert_eq!(spec.selector.match_labels["tier"], "gpu");
    assert_eq!(spec.target_ports.len(), 2);
    assert!(standalone_spec("", &[8000]).is_err());
    assert!(standalone_spec("app", &[8000]).is_err());
    assert!(standalone_spec("app=x", &[]).is_err());
    assert!(standalone_spec("app=x", &[8000, 8000]).is_err());
    assert!(standalone_spec("app=x", &[1, 2, 3, 4, 5, 6, 7, 8, 9]).is_err());
    // What the API server would read otherwise than the index matches it.
    for bad in [
        "app==x", "app!=x", "a b=c", "app=x y", "app=-x", "/app=x", "app=", "=x",
    ] {
        let parsed = standalone_spec(bad, &[8000]);
        if bad == "app=" {
            // An empty value is a label value.
            assert!(parsed.is_ok(), "{bad}");
        } else {
            assert!(parsed.is_err(), "{bad}");
        }
    }
    let spec = standalone_spec("app.kubernetes.io/name=vllm_1.2", &[8000]).unwrap();
    assert_eq!(
        spec.selector.match_labels["app.kubernetes.io/name"],
        "vllm_1.2"
    );
    assert!(standalone_spec(&format!("app={}", "x".repeat(64)), &[8000]).is_err());
}

#[tokio::test(start_paused = true)]
async fn standalone_discovery_filters_pods_by_label_and_watches_no_pool() {
    let publisher = publisher();
    let (client, mut server) = mock::client(NS);
    let shutdown = CancellationToken::new();
    let discovery = Discovery {
        client,
        pool: PoolRef {
            name: "standalone".into(),
            namespace: NS.into(),
            group: crate::api::POOL_GROUP.into(),
        },
        metrics_port: None,
        standalone: Some(standalone_spec("app=vllm", &[8000, 8001]).unwrap()),
    };
    let (_index, tasks) = discovery.start(publisher.clone(), &shutdown);
    // Three watches share one client, so their requests arrive in any order: answer by path
    // until each has listed and started watching.
    let mut open = Vec::new();
    while open.len() < 3 {
        let (req, send) = server.next().await;
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(
            !path.contains("inferencepools"),
            "standalone mode watches no pool: {path}"
        );
        if query.contains("watch=true") {
            open.push(mock::respond_watch(send));
            continue;
        }
        let items = if path == PODS {
            assert!(query.contains("labelSelector=app%3Dvllm"), "{query}");
            vec![
                v(pod("a", "vllm", "10.0.0.1")),
                v(unready(pod("b", "vllm", "10.0.0.2"))),
            ]
        } else {
            assert!(path == OBJECTIVES || path == REWRITES, "{path}");
            vec![]
        };
        mock::respond_list(send, items);
    }
    assert!(publisher.datastore.is_synced());
    let names: Vec<String> = endpoints(&publisher).into_iter().map(|e| e.0).collect();
    assert_eq!(names, vec!["a-rank-0", "a-rank-1"]);
    shutdown.cancel();
    join(tasks).await;
}

/// Review: every pod of the namespace was held whole (annotations of up to 256 KiB each, the
/// full status) until a relist finished. A pod is trimmed to what the index reads, and the
/// index sees the same endpoint either way.
#[test]
fn a_pod_is_trimmed_to_what_the_index_reads() {
    use k8s_openapi::api::core::v1::{ContainerStatus, PodCondition};
    let full = |mut p: Pod| {
        p.metadata.annotations = Some(BTreeMap::from([
            ("big".to_owned(), "x".repeat(256 * 1024)),
            (
                endpoint_picker::discovery::file::ACTIVE_PORTS_ANNOTATION.to_owned(),
                "8000".to_owned(),
            ),
        ]));
        let status = p.status.as_mut().unwrap();
        status.conditions.as_mut().unwrap().push(PodCondition {
            type_: "Initialized".into(),
            status: "True".into(),
            message: Some("m".repeat(10_000)),
            ..Default::default()
        });
        status.container_statuses = Some(vec![ContainerStatus {
            name: "vllm".into(),
            image: "i".repeat(10_000),
            ..Default::default()
        }]);
        p
    };
    let original = full(pod("p-0", "vllm", "10.0.0.1"));
    let mut trimmed = original.clone();
    trim_pod(&mut trimmed);
    let kept = serde_json::to_vec(&trimmed).unwrap().len();
    assert!(kept < 1_000, "{kept} bytes kept");
    let annotations = trimmed.metadata.annotations.clone().unwrap();
    assert_eq!(annotations.len(), 1);
    let status = trimmed.status.clone().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(status.conditions.unwrap().len(), 1, "Ready only");
    // The index publishes the same endpoints from either.
    let published = |p: Pod| {
        let (mut idx, publisher) = index();
        idx.reset(vec![pool(POOL, "vllm", &[8000, 8001])]);
        idx.reset(vec![p]);
        endpoints(&publisher)
    };
    let from_original = published(original);
    assert_eq!(
        from_original.len(),
        1,
        "the active-ports annotation kept one rank"
    );
    assert_eq!(from_original, published(trimmed));
}

/// A log sink for one test.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Reviews 18 and 19: a watch that kept failing with one error (a role granting `list` but not
/// `watch`, a proxy that cuts streams) said so once at warn and then only at debug, while the
/// kind's objects stayed as they were; and a watch that came back without listing again never
/// said it had. It warns again every `STILL_FAILING_EVERY`, and an event is a recovery.
#[tokio::test(start_paused = true)]
async fn a_watch_that_keeps_failing_says_so_again_and_an_event_ends_it() {
    let logs = Captured::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    let index = Index::new(pool_ref(), None, publisher()).shared();
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let shutdown = CancellationToken::new();
    let health = Arc::new(WatchHealth::default());
    let task = tokio::spawn(feed::<Pod, _>(index, rx, shutdown.clone(), health.clone()));
    let lines = |logs: &Captured, what: &str| {
        String::from_utf8(logs.0.lock().clone())
            .unwrap()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    };
    let fail = || {
        tx.unbounded_send(Err(watcher::Error::NoResourceVersion))
            .unwrap()
    };
    let settle = || tokio::time::sleep(Duration::from_millis(1));
    fail();
    settle().await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(50)).await;
        fail();
    }
    settle().await;
    assert_eq!(lines(&logs, "watch failed"), 1);
    assert_eq!(lines(&logs, "still failing"), 0, "not yet");
    tokio::time::sleep(Duration::from_secs(60)).await;
    fail();
    settle().await;
    assert_eq!(lines(&logs, "still failing"), 1, "five minutes on");
    tx.unbounded_send(Ok(Event::Apply(pod("a", "vllm", "10.0.0.1"))))
        .unwrap();
    settle().await;
    assert_eq!(lines(&logs, "watch recovered"), 1);
    assert_eq!(health.errors(), 7);
    assert!(health.last_success_unix_seconds().is_some());
    assert!(!health.failing());
    // Failing again at once, as when a proxy cuts every stream: the same error is said once
    // per period, recoveries between or not.
    fail();
    settle().await;
    assert!(health.failing());
    tx.unbounded_send(Ok(Event::Apply(pod("a", "vllm", "10.0.0.1"))))
        .unwrap();
    fail();
    settle().await;
    assert_eq!(lines(&logs, "watch failed"), 1);
    assert_eq!(lines(&logs, "watch recovered"), 1);
    tokio::time::sleep(STILL_FAILING_EVERY).await;
    fail();
    settle().await;
    assert_eq!(lines(&logs, "watch failed"), 2, "after the period");
    shutdown.cancel();
    task.await.unwrap();
}
