//! Endpoint readiness end to end: the EPP scrapes real simulated replicas; a replica still
//! loading its model gets no request, one that finished loading gets its share, one that dies
//! leaves the candidates within two scrape intervals and comes back when restarted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use endpoint_picker::datastore::{EndpointSpec, Readiness};
use testkit::*;

/// Routes `n` chat requests through the ext_proc service; returns the destinations seen.
async fn destinations(epp: &Epp, n: usize) -> BTreeMap<String, usize> {
    let channel = connect(epp.grpc).await;
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let mut s = Stream::on(channel.clone()).await;
        s.send(req_headers(
            &[(":method", "POST"), (":path", "/v1/chat/completions")],
            false,
            None,
        ))
        .await;
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"question {i}"}}]}}"#);
        s.send(req_body(body.as_bytes(), true)).await;
        let r = s.recv().await;
        *seen
            .entry(routing_answer(&r).destination().to_owned())
            .or_default() += 1;
    }
    seen
}

async fn wait_readiness(epp: &Epp, index: usize, want: Readiness) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = epp.handles.datastore.snapshot().endpoints[index]
            .metrics()
            .readiness;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "endpoint {index}: {now:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn only_replicas_that_serve_their_model_get_requests() {
    let fast = sim::Config::fast();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = sim::spawn_replica(fast.clone(), listener, 0).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let loading = sim::spawn_replica(
        sim::Config {
            model_load_time: Duration::from_secs(3600),
            ..fast.clone()
        },
        listener,
        1,
    )
    .await
    .unwrap();
    let at = |r: &sim::ReplicaHandle, n: u8| EndpointSpec {
        address: r.addr(),
        metrics_address: r.addr(),
        ..endpoint(n, r.addr().port())
    };
    let epp = start_epp(
        pool(vec![at(&serving, 1), at(&loading, 2)]),
        EppOptions {
            scrape: true,
            ..Default::default()
        },
    )
    .await;
    wait_readiness(&epp, 0, Readiness::Serving).await;
    wait_readiness(&epp, 1, Readiness::Loading).await;
    let seen = destinations(&epp, 40).await;
    assert_eq!(seen.get(&serving.addr().to_string()), Some(&40), "{seen:?}");

    // Loaded: it joins.
    loading.set_loading(Duration::ZERO);
    wait_readiness(&epp, 1, Readiness::Serving).await;
    let seen = destinations(&epp, 40).await;
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Dead: it leaves within the failure threshold (2 scrapes of 50 ms), the other takes all.
    let dead = serving.addr();
    serving.shutdown().await;
    wait_readiness(&epp, 0, Readiness::Unreachable).await;
    let seen = destinations(&epp, 40).await;
    assert_eq!(seen.get(&loading.addr().to_string()), Some(&40), "{seen:?}");

    // Restarted on the same address, loading first: still out until it serves.
    let listener = tokio::net::TcpListener::bind(dead).await.unwrap();
    let restarted = sim::spawn_replica(
        sim::Config {
            model_load_time: Duration::from_secs(3600),
            ..fast
        },
        listener,
        0,
    )
    .await
    .unwrap();
    let before = epp.handles.datastore.snapshot().endpoints[0].id;
    wait_readiness(&epp, 0, Readiness::Loading).await;
    restarted.set_loading(Duration::ZERO);
    wait_readiness(&epp, 0, Readiness::Serving).await;
    let seen = destinations(&epp, 40).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    // It restarted in place: renewed under a fresh id, so nothing known of the old process
    // (its cached prefixes, loads, calibration) is credited to the new one.
    let after = epp.handles.datastore.snapshot().endpoints[0].id;
    assert_ne!(after, before);
}

/// vLLM (and SGLang) behind `--api-key` answer 401 on `/v1/models` and serve `/metrics`
/// openly: their endpoints serve on their metrics, and get requests.
#[tokio::test]
async fn replicas_behind_an_api_key_serve() {
    let keyed = sim::Config {
        api_key: Some("secret".into()),
        ..sim::Config::fast()
    };
    let mut replicas = Vec::new();
    for i in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        replicas.push(
            sim::spawn_replica(keyed.clone(), listener, i)
                .await
                .unwrap(),
        );
    }
    let specs = replicas
        .iter()
        .zip(1..)
        .map(|(r, n)| EndpointSpec {
            address: r.addr(),
            metrics_address: r.addr(),
            ..endpoint(n, r.addr().port())
        })
        .collect();
    let epp = start_epp(
        pool(specs),
        EppOptions {
            scrape: true,
            ..Default::default()
        },
    )
    .await;
    wait_readiness(&epp, 0, Readiness::Serving).await;
    wait_readiness(&epp, 1, Readiness::Serving).await;
    let seen = destinations(&epp, 40).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The key is really wanted: the check was refused.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(replicas[0].addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /v1/models HTTP/1.1\r\nhost: sim\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}
