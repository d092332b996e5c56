//! The conformance suite: upstream GIE's EPP-facing conformance scenarios (same names) and our
//! own protocol scenarios, each against a real Envoy, in-process EPPs and simulated replicas on
//! loopback. A custom runner (not libtest) so that one run produces one report:
//!
//! ```sh
//! cargo test -p conformance                         # every scenario; all must pass
//! cargo test -p conformance -- Weighted Subset      # only scenarios whose name contains a filter
//! SWITCHYARD_CONFORMANCE_FAULT=no-lb-metadata cargo test -p conformance
//!                                                   # self-test: a broken EPP must fail scenarios
//! ```
//!
//! Traffic checks follow upstream's method (many requests at some concurrency, an assertion on
//! every response), scaled down to keep the suite fast: 100 requests at concurrency 10 where
//! upstream sends 100, 200 for the weighted split as upstream, fewer for our own scenarios.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use conformance::report::{self, Report, ScenarioResult, Status};
use conformance::*;
use endpoint_picker::director::{ModelRewrite, Policies, RewriteRule, RewriteTarget};
use ext_proc::faults::ConformanceFault;
use testkit::envoy::{ResponsePath, Variant};
use testkit::ports::ClosedPort;

/// A scenario's result: the number of requests it sent through the gateway.
type Verdict = anyhow::Result<usize>;
type ScenarioFn = fn(Ctx) -> Pin<Box<dyn Future<Output = Verdict> + Send>>;

struct Scenario {
    name: &'static str,
    origin: &'static str,
    /// `Some(reason)`: not applicable locally, reported as skipped.
    skip: Option<&'static str>,
    run: ScenarioFn,
}

macro_rules! scenario {
    ($origin:literal, $name:ident) => {
        Scenario {
            name: stringify!($name),
            origin: $origin,
            skip: None,
            run: |ctx| Box::pin($name(ctx)),
        }
    };
}

fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("upstream", GatewayFollowingEPPRouting),
        scenario!("upstream", GatewayFollowingEPPRoutingWithDataParallelism),
        scenario!("upstream", GatewayDestinationEndpointServed),
        scenario!("upstream", GatewayWeightedAcrossTwoInferencePools),
        scenario!("upstream", EppUnAvailableFailOpen),
        scenario!("switchyard", EppUnAvailableFailClose),
        scenario!("switchyard", EppKilledMidStreamFailOpen),
        scenario!("switchyard", EppKilledMidStreamFailOpenObserved),
        scenario!("switchyard", FailOpenRoutesOnTheBufferedBody),
        scenario!("upstream", InferencePoolAppProtocol),
        Scenario {
            name: "InferencePoolHTTPRoutePortValidation",
            origin: "upstream",
            skip: Some(
                "not applicable locally: it checks that a gateway ignores the port of an \
                 HTTPRoute backendRef to an InferencePool; a plain Envoy has no backendRef \
                 (the EPP names ip:targetPort and override_host routes there, which every \
                 other scenario checks)",
            ),
            run: |_| Box::pin(async { Ok(0) }),
        },
        scenario!("switchyard", SubsetHintHonouredAndIntersected),
        scenario!("switchyard", FallbackListWalkedOnBackendFailure),
        scenario!("switchyard", HeaderSpoofingHasNoEffect),
        scenario!("switchyard", ModelRewriteRoundTrip),
        scenario!("switchyard", SheddableRequestGets429WhenSaturated),
        scenario!("switchyard", OneMebibytePrompt),
        scenario!("switchyard", SseStreamingIntact),
        scenario!("switchyard", ResponsePathsLeanAndFull),
        scenario!("switchyard", ResponseObserverAcrossEpps),
        scenario!("switchyard", InvalidBodyRejectedByEpp),
        scenario!("switchyard", HostileClientsThroughReferenceStyleEnvoy),
        scenario!("switchyard", EppBinaryFollowsEPPRouting),
        scenario!("switchyard", MutualTlsToTheEpp),
        scenario!("switchyard", BbrEachModelReachesOnlyItsPool),
        scenario!("switchyard", BbrUnknownModelGets404),
        scenario!("switchyard", BbrOneMebibyteBodyThroughBothExtProcs),
        scenario!("switchyard", BbrSpoofedModelHeadersIgnored),
        scenario!("switchyard", BbrListsModels),
    ]
}

// ---------------------------------------------------------------------------------------------
// Upstream scenarios
// ---------------------------------------------------------------------------------------------

/// Traffic goes only to the endpoints the EPP selected: 1, 2 and 3 designated pods out of 3,
/// through the default shipped config (TLS to the EPP, as upstream's EPP serves TLS).
#[allow(non_snake_case)]
async fn GatewayFollowingEPPRouting(ctx: Ctx) -> Verdict {
    let pods = pods(2, 3, 1, &sim_config()).await;
    let epp = ctx
        .epp(pool_of("primary", &pods), CONFORMANCE_CONFIG, true)
        .await;
    let envoy = ctx
        .plain_envoy(Variant::TlsFailClose, epp.grpc, &pods)
        .await;
    let names = names(&[&pods]);
    let mut sent = 0;
    for k in 1..=3 {
        let selected: Vec<SocketAddr> = pods[..k].iter().map(|p| p.rank(0)).collect();
        let header = join(selected.iter().map(|a| ip(*a).to_string()));
        let req = Req::completion().header(SELECTION, header);
        let out = traffic(envoy.listener, 100, 10, &req).await;
        sent += out.len();
        let seen = all_served_by(&out, &selected.iter().copied().collect(), &names, false)
            .with_context(|| format!("{k} selected pod(s)"))?;
        ensure!(!seen.is_empty());
    }
    Ok(sent)
}

/// The same with data-parallel pods: three pods of three ranks (ports). The header names a
/// pod IP (any of its ranks is allowed) or pins `IP:port` (that rank only).
#[allow(non_snake_case)]
async fn GatewayFollowingEPPRoutingWithDataParallelism(ctx: Ctx) -> Verdict {
    let pods = pods(2, 3, 3, &sim_config()).await;
    let epp = ctx
        .epp(pool_of("dp", &pods), CONFORMANCE_CONFIG, false)
        .await;
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailClose, epp.grpc, &pods)
        .await;
    let names = names(&[&pods]);
    let ranks_of = |p: &Pod| {
        p.ranks
            .iter()
            .map(sim::ReplicaHandle::addr)
            .collect::<Vec<_>>()
    };
    let cases: Vec<(String, BTreeSet<SocketAddr>)> = vec![
        // A whole pod: every rank of it.
        (
            pods[1].ip.to_string(),
            ranks_of(&pods[1]).into_iter().collect(),
        ),
        // Two pinned ranks on two pods.
        (
            format!("{},{}", pods[0].rank(1), pods[2].rank(2)),
            [pods[0].rank(1), pods[2].rank(2)].into_iter().collect(),
        ),
        // A pod plus one pinned rank of another.
        (
            format!("{},{}", pods[2].ip, pods[0].rank(0)),
            ranks_of(&pods[2])
                .into_iter()
                .chain([pods[0].rank(0)])
                .collect(),
        ),
    ];
    let mut sent = 0;
    for (header, allowed) in cases {
        let req = Req::completion().header(SELECTION, header.clone());
        let out = traffic(envoy.listener, 100, 10, &req).await;
        sent += out.len();
        let seen = all_served_by(&out, &allowed, &names, true)
            .with_context(|| format!("selection {header}"))?;
        if allowed.len() > 1 {
            // Ties are broken at random, so 100 requests reach more than one allowed rank.
            ensure!(seen.len() > 1, "selection {header}: only {seen:?} served");
        }
    }
    Ok(sent)
}

/// The gateway reports the endpoint that served the request back to the EPP
/// (`envoy.lb/x-gateway-destination-endpoint-served`), also after a retry moved the request.
#[allow(non_snake_case)]
async fn GatewayDestinationEndpointServed(ctx: Ctx) -> Verdict {
    let pods = pods(2, 3, 1, &sim_config()).await;
    let epp = ctx
        .epp(pool_of("primary", &pods), CONFORMANCE_CONFIG, false)
        .await;
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailClose, epp.grpc, &pods)
        .await;
    let names = names(&[&pods]);
    let mut sent = 0;
    for p in &pods {
        let req = Req::completion().header(SELECTION, p.ip.to_string());
        let out = traffic(envoy.listener, 34, 10, &req).await;
        sent += out.len();
        all_served_by(&out, &[p.rank(0)].into_iter().collect(), &names, true)?;
    }
    // After a retry the served endpoint is the one that answered, not the first pick.
    pods[0].ranks[0].set_failure_injection(100.0, vec![503]);
    let req = Req::completion().header(SELECTION, format!("{},{}", pods[0].ip, pods[1].ip));
    let out = traffic(envoy.listener, 30, 10, &req).await;
    sent += out.len();
    all_served_by(&out, &[pods[1].rank(0)].into_iter().collect(), &names, true)
        .context("after retries")?;
    Ok(sent)
}

/// An HTTPRoute splitting 70/30 across two InferencePools, each with its own EPP. The header
/// lists pods of both pools, so each EPP must ignore the other pool's IPs.
#[allow(non_snake_case)]
async fn GatewayWeightedAcrossTwoInferencePools(ctx: Ctx) -> Verdict {
    let primary = pods(2, 2, 1, &sim_config()).await;
    let secondary = pods(4, 2, 1, &sim_config()).await;
    let epp_a = ctx
        .epp(pool_of("primary", &primary), CONFORMANCE_CONFIG, false)
        .await;
    let epp_b = ctx
        .epp(pool_of("secondary", &secondary), CONFORMANCE_CONFIG, false)
        .await;
    let envoy = ctx
        .multi_pool_envoy(MultiPool {
            primary_epp: epp_a.grpc,
            secondary_epp: epp_b.grpc,
            primary: &primary,
            secondary: &secondary,
            weights: (70, 30),
        })
        .await;
    envoy.wait_cluster_health("epp_primary", true).await;
    envoy.wait_cluster_health("epp_secondary", true).await;
    let names = names(&[&primary, &secondary]);
    let allowed: BTreeSet<SocketAddr> = [primary[1].rank(0), secondary[0].rank(0)].into();
    let header = format!("{},{}", primary[1].ip, secondary[0].ip);
    let req = Req::completion()
        .header(ROUTE, "weighted")
        .header(SELECTION, header);
    let n = 200;
    let out = traffic(envoy.listener, n, 10, &req).await;
    all_served_by(&out, &allowed, &names, true)?;
    let to_primary = out
        .iter()
        .filter(|o| o.pod_octet() == Some(primary[1].ip.octets()[3]))
        .count();
    // 140 expected; ±35 is more than 5 standard deviations of a 200-draw binomial.
    ensure!(
        (105..=175).contains(&to_primary),
        "{to_primary} of {n} requests went to the primary pool (weight 70 of 100)"
    );
    Ok(n)
}

/// With the EPP unavailable, a FailOpen gateway still serves (the shipped FailOpen config,
/// whose TCP health check takes the EPP out so that ext_proc fails open before any body byte).
#[allow(non_snake_case)]
async fn EppUnAvailableFailOpen(ctx: Ctx) -> Verdict {
    epp_unavailable(ctx, Variant::PlaintextFailOpen).await
}

/// The FailClose counterpart: with the EPP unavailable every request fails with a 5xx.
#[allow(non_snake_case)]
async fn EppUnAvailableFailClose(ctx: Ctx) -> Verdict {
    epp_unavailable(ctx, Variant::PlaintextFailClose).await
}

async fn epp_unavailable(ctx: Ctx, variant: Variant) -> Verdict {
    let pods = pods(2, 3, 1, &sim_config()).await;
    let epp = ctx
        .epp(pool_of("secondary", &pods), CONFORMANCE_CONFIG, false)
        .await;
    let envoy = ctx.plain_envoy(variant, epp.grpc, &pods).await;
    let names = names(&[&pods]);
    let target = pods[1].rank(0);
    // Before: the EPP routes.
    let req = Req::completion().header(SELECTION, target.ip().to_string());
    let out = traffic(envoy.listener, 20, 10, &req).await;
    all_served_by(&out, &[target].into(), &names, true).context("with the EPP up")?;
    // The EPP goes away.
    stop_epp(epp).await?;
    envoy.wait_epp_health(false).await;
    let out = traffic(envoy.listener, 100, 10, &req).await;
    let fail_open = matches!(variant, Variant::PlaintextFailOpen | Variant::TlsFailOpen);
    for (i, o) in out.iter().enumerate() {
        if fail_open {
            ensure!(o.status == 200, "request {i}: {} {:.200}", o.status, o.body);
            ensure!(o.replica.is_some(), "request {i}: no replica answered");
        } else {
            ensure!(
                (500..600).contains(&o.status),
                "request {i}: FailClose answered {}",
                o.status
            );
        }
    }
    if fail_open {
        // No EPP answer: the gateway's fallback policy spreads over the pool.
        let all: BTreeSet<SocketAddr> = addresses(&pods).into_iter().collect();
        all_served_by(&out, &all, &names, false)?;
    }
    Ok(out.len() + 20)
}

/// The `epp` process killed (SIGKILL) while streamed responses it routed are in flight through
/// the shipped FailOpen gateway: every one of them completes, whole, and requests sent while it
/// is down are served by the fallback policy. Envoy fails open only while it holds what it gave
/// the EPP: the FailOpen templates send the request body BUFFERED and no response body to the
/// EPP (with FULL_DUPLEX_STREAMED the same streams were reset: bench/RESULTS.md, chaos).
#[allow(non_snake_case)]
async fn EppKilledMidStreamFailOpen(ctx: Ctx) -> Verdict {
    killed_mid_stream_fail_open(ctx, false).await
}

/// [`EppKilledMidStreamFailOpen`] with the response observer (README "Response path:
/// observed"): a second ext_proc filter in observability mode streaming the answers to the
/// EPP as well, so the observed path keeps fail-open: the streams in flight at the kill
/// complete whole.
#[allow(non_snake_case)]
async fn EppKilledMidStreamFailOpenObserved(ctx: Ctx) -> Verdict {
    killed_mid_stream_fail_open(ctx, true).await
}

async fn killed_mid_stream_fail_open(ctx: Ctx, observed: bool) -> Verdict {
    const STREAMS: usize = 4;
    const TOKENS: u32 = 200;
    const WHILE_DOWN: usize = 20;
    if std::env::var("SWITCHYARD_CONFORMANCE_FAULT").is_ok_and(|f| !f.is_empty()) {
        // Faults exist only in the in-process EPP of this suite's build; the binary has none.
        return Err(Skip("the epp binary cannot be told to misbehave".into()).into());
    }
    let binary = match epp_binary() {
        Ok(b) => b,
        Err(why) => return Err(Skip(why).into()),
    };
    let ips: Vec<std::net::Ipv4Addr> = (2..5)
        .map(|o| std::net::Ipv4Addr::new(127, 0, 0, o))
        .collect();
    let port = common_free_port(&ips);
    // The calibrated latency model (≈6 ms per token): a 200-token stream lasts over a second,
    // so the streams are still running when the EPP dies (checked below, not assumed).
    let config = sim::Config {
        seed: 11,
        ..sim::Config::default()
    };
    let pods = pods_on_port(&ips, port, &config).await;
    let (flags, path): (&[&str], _) = if observed {
        (&["--response-observer"], ResponsePath::Observed)
    } else {
        (&[], ResponsePath::Lean)
    };
    let epp = EppProcess::start_with(&binary, &pods, port, CONFORMANCE_CONFIG, flags).await?;
    // The FailOpen template's response path is the lean one already.
    let envoy = ctx
        .plain_envoy_with(Variant::TlsFailOpen, path, epp.grpc, &pods)
        .await;
    envoy.wait_epp_health(true).await;
    let names = names(&[&pods]);
    let target = pods[1].rank(0);
    let req = Req::chat(MODEL, "tell me a story", true, TOKENS)
        .header(SELECTION, target.ip().to_string());
    let mut firsts = Vec::with_capacity(STREAMS);
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        firsts.push(first_rx);
        let (listener, req) = (envoy.listener, req.clone());
        streams.push(tokio::spawn(async move {
            let resp = req.post(listener).await;
            let status = resp.status().as_u16();
            let replica = testkit::http::header(&resp, "x-inference-pod").map(str::to_owned);
            let (frames, error) = testkit::http::frames_signalling_first(resp, first_tx).await;
            (status, replica, frames, error)
        }));
    }
    // Every stream has its first chunk (routed by the EPP, streaming through ext_proc): kill.
    for (i, first) in firsts.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(20), first)
            .await
            .with_context(|| format!("stream {i}: no first chunk in 20 s"))?
            .with_context(|| format!("stream {i} ended before its first chunk"))?;
    }
    let killed_at = tokio::time::Instant::now();
    epp.kill().await?;
    // Sent at once, before Envoy's health check has seen the EPP go.
    let down = traffic(envoy.listener, WHILE_DOWN, 5, &Req::completion()).await;
    for (i, stream) in streams.into_iter().enumerate() {
        let (status, replica, frames, error) = stream.await.context("stream task")?;
        ensure!(status == 200, "stream {i}: {status}");
        ensure!(error.is_none(), "stream {i} was cut: {error:?}");
        let expected = names.iter().find(|(_, a)| **a == target).map(|(n, _)| n);
        ensure!(
            replica.as_ref() == expected,
            "stream {i}: answered by {replica:?}, the EPP chose {expected:?}"
        );
        let last = frames.last().map(|(t, _)| *t);
        ensure!(
            last.is_some_and(|t| t > killed_at),
            "stream {i} had ended before the kill: the test proved nothing"
        );
        let text: String = frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        let events = sse_json(&text);
        let content = events
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count();
        ensure!(
            content == TOKENS as usize,
            "stream {i}: {content} content events"
        );
        ensure!(
            events
                .last()
                .is_some_and(|e| e["usage"]["completion_tokens"] == TOKENS),
            "stream {i}: no final usage event"
        );
        ensure!(
            text.trim_end().ends_with("data: [DONE]"),
            "stream {i}: no [DONE]"
        );
    }
    for (i, o) in down.iter().enumerate() {
        ensure!(
            o.status == 200,
            "request {i} sent while the EPP was down: {} {:.200}",
            o.status,
            o.body
        );
    }
    let all: BTreeSet<SocketAddr> = addresses(&pods).into_iter().collect();
    all_served_by(&down, &all, &names, false).context("sent while the EPP was down")?;
    // Envoy's own count: each stream in flight failed open at the kill.
    let allowed = envoy
        .stat("http.openai.ext_proc.failure_mode_allowed")
        .await;
    ensure!(
        allowed >= STREAMS as u64,
        "Envoy failed open {allowed} times for {STREAMS} streams in flight"
    );
    if observed {
        // The observer was there: it sent the streams' answers to the EPP until the kill.
        let observer_sent = envoy
            .stat("http.openai.ext_proc.observer.stream_msgs_sent")
            .await;
        ensure!(
            observer_sent >= 2 * STREAMS as u64,
            "the observer sent {observer_sent} messages for {STREAMS} streams"
        );
    }
    println!(
        "    {STREAMS} streams in flight at the kill completed; {WHILE_DOWN} sent while down \
         served; Envoy failure_mode_allowed {allowed}"
    );
    Ok(STREAMS + WHILE_DOWN)
}

/// The pool's appProtocol: HTTP/1.1 (`http`, also the default) and `kubernetes.io/h2c` reach
/// the picked endpoint with that protocol, and the served endpoint is reported either way.
#[allow(non_snake_case)]
async fn InferencePoolAppProtocol(ctx: Ctx) -> Verdict {
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(pool_of("appprotocol", &pods), CONFORMANCE_CONFIG, false)
        .await;
    let unused = ClosedPort::new().unwrap();
    let envoy = ctx
        .multi_pool_envoy(MultiPool {
            primary_epp: epp.grpc,
            secondary_epp: unused.addr(),
            primary: &pods,
            secondary: &pods,
            weights: (1, 1),
        })
        .await;
    envoy.wait_cluster_health("epp_primary", true).await;
    let names = names(&[&pods]);
    let target = pods[1].rank(0);
    let base = Req::completion().header(SELECTION, target.ip().to_string());
    let http = traffic(envoy.listener, 50, 10, &base).await;
    all_served_by(&http, &[target].into(), &names, true).context("appProtocol http")?;
    let h2c = traffic(envoy.listener, 50, 10, &base.clone().header(ROUTE, "h2c")).await;
    all_served_by(&h2c, &[target].into(), &names, true).context("appProtocol h2c")?;
    let stat = |c: &str, p: &str| format!("cluster.{c}.upstream_cx_{p}_total");
    let (h1, h1_2) = (
        envoy.stat(&stat("pool_primary", "http1")).await,
        envoy.stat(&stat("pool_primary", "http2")).await,
    );
    let (h2_1, h2) = (
        envoy.stat(&stat("pool_primary_h2c", "http1")).await,
        envoy.stat(&stat("pool_primary_h2c", "http2")).await,
    );
    ensure!(
        h1 > 0 && h1_2 == 0,
        "http pool: {h1} HTTP/1.1, {h1_2} HTTP/2 connections"
    );
    ensure!(
        h2 > 0 && h2_1 == 0,
        "h2c pool: {h2_1} HTTP/1.1, {h2} HTTP/2 connections"
    );
    Ok(100)
}

// ---------------------------------------------------------------------------------------------
// Our protocol scenarios
// ---------------------------------------------------------------------------------------------

/// `envoy.lb.subset_hint` (here a comma string made by header_to_metadata) restricts the
/// candidates; it is intersected with the pool; no eligible endpoint means 503.
#[allow(non_snake_case)]
async fn SubsetHintHonouredAndIntersected(ctx: Ctx) -> Verdict {
    let pods = pods(2, 3, 1, &sim_config()).await;
    // The default profile: no test filter, so the hint alone restricts the candidates.
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    let unused = ClosedPort::new().unwrap();
    let envoy = ctx
        .multi_pool_envoy(MultiPool {
            primary_epp: epp.grpc,
            secondary_epp: unused.addr(),
            primary: &pods,
            secondary: &pods,
            weights: (1, 1),
        })
        .await;
    envoy.wait_cluster_health("epp_primary", true).await;
    let names = names(&[&pods]);
    let foreign = "10.255.255.1:8000";
    let mut sent = 0;
    let cases: Vec<(String, BTreeSet<SocketAddr>)> = vec![
        (
            format!("{},{}", pods[0].rank(0), pods[2].rank(0)),
            [pods[0].rank(0), pods[2].rank(0)].into(),
        ),
        // Intersected with the pool: the foreign entry is never picked.
        (
            format!("{foreign}, {}", pods[1].rank(0)),
            [pods[1].rank(0)].into(),
        ),
    ];
    for (hint, allowed) in cases {
        let req = Req::completion().header(SUBSET_HINT, hint.clone());
        let out = traffic(envoy.listener, 40, 10, &req).await;
        sent += out.len();
        all_served_by(&out, &allowed, &names, false).with_context(|| format!("hint {hint}"))?;
    }
    // Nothing of the hint is in the pool: 503 from the EPP.
    let req = Req::completion().header(SUBSET_HINT, foreign);
    let out = traffic(envoy.listener, 20, 10, &req).await;
    sent += out.len();
    for (i, o) in out.iter().enumerate() {
        ensure!(
            o.status == 503 && o.body.starts_with("inference error:"),
            "request {i} with a foreign-only hint: {} {:.200}",
            o.status,
            o.body
        );
    }
    Ok(sent)
}

/// The EPP's ordered list is walked when backends fail: a refused connection and a 503 are
/// both retried onto the next entry.
#[allow(non_snake_case)]
async fn FallbackListWalkedOnBackendFailure(ctx: Ctx) -> Verdict {
    let mut pods = pods(2, 3, 1, &sim_config()).await;
    // pod-2 is gone (connection refused) but still in the pool; pod-3 answers 503.
    let dead = pods[0].ranks.remove(0);
    let dead_addr = dead.addr();
    dead.shutdown().await;
    let mut pool = pool_of("primary", &pods);
    let mut ghost = pool.endpoints[0].clone();
    ghost.name = "pod-2-rank-0".into();
    ghost.pod_name = "pod-2".into();
    ghost.address = dead_addr;
    ghost.metrics_address = dead_addr;
    pool.endpoints.push(ghost);
    pods[1].ranks[0].set_failure_injection(100.0, vec![503]);
    let epp = ctx.epp(pool, CONFORMANCE_CONFIG, false).await;
    let mut backends = addresses(&pods);
    backends.push(dead_addr);
    let envoy =
        testkit::envoy::Envoy::start(&ctx.envoy, Variant::PlaintextFailClose, epp.grpc, &backends)
            .await;
    let names = names(&[&pods]);
    let good = pods[2].rank(0);
    let header = format!("{},{},{}", dead_addr.ip(), pods[1].ip, pods[2].ip);
    let req = Req::completion().header(SELECTION, header);
    let out = traffic(envoy.listener, 60, 10, &req).await;
    all_served_by(&out, &[good].into(), &names, true)?;
    let retries = envoy.stat("cluster.inference_pool.upstream_rq_retry").await;
    ensure!(retries > 0, "no retry happened");
    Ok(out.len())
}

/// Client-sent routing headers do nothing: not with the EPP up, and not on the fail-open
/// path with the EPP down.
#[allow(non_snake_case)]
async fn HeaderSpoofingHasNoEffect(ctx: Ctx) -> Verdict {
    let pods = pods(2, 3, 1, &sim_config()).await;
    let names = names(&[&pods]);
    let (chosen, spoofed) = (pods[2].rank(0), pods[0].rank(0).to_string());
    let spoof = |r: Req| {
        r.header("x-gateway-destination-endpoint", spoofed.clone())
            .header("x-gateway-destination-endpoint-subset", spoofed.clone())
            .header("x-gateway-destination-endpoint-served", spoofed.clone())
            .header("x-gateway-destination-endpoint-fallbacks", spoofed.clone())
            .header("X-Gateway-Destination-Endpoint-Evil", spoofed.clone())
    };
    let epp = ctx
        .epp(pool_of("primary", &pods), CONFORMANCE_CONFIG, false)
        .await;
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailOpen, epp.grpc, &pods)
        .await;
    let req = spoof(Req::completion().header(SELECTION, chosen.ip().to_string()));
    let out = traffic(envoy.listener, 50, 10, &req).await;
    all_served_by(&out, &[chosen].into(), &names, true).context("EPP up")?;
    // Fail-open: the spoofed header must not pin the request to pods[0].
    stop_epp(epp).await?;
    envoy.wait_epp_health(false).await;
    let out = traffic(envoy.listener, 60, 1, &spoof(Req::completion())).await;
    let all: BTreeSet<SocketAddr> = addresses(&pods).into_iter().collect();
    let seen = all_served_by(&out, &all, &names, false).context("EPP down (fail-open)")?;
    ensure!(seen.len() > 1, "every fail-open request went to {seen:?}");
    Ok(110)
}

/// An InferenceModelRewrite sends the engine the target model and the client gets its own
/// model name back (JSON and every SSE event).
#[allow(non_snake_case)]
async fn ModelRewriteRoundTrip(ctx: Ctx) -> Verdict {
    const ALIAS: &str = "switchyard-conformance-alias";
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    epp.handles.director.set_policies(Policies {
        objectives: Default::default(),
        rewrites: vec![ModelRewrite {
            name: "alias".into(),
            created: 0,
            rules: vec![RewriteRule {
                matches: vec![ALIAS.into()],
                targets: vec![RewriteTarget {
                    model: MODEL.into(),
                    weight: 1,
                }],
            }],
        }],
    });
    // Rewriting the model back in the answer needs the answer's body: the full response path.
    let envoy = ctx
        .plain_envoy_with(
            Variant::PlaintextFailClose,
            ResponsePath::Full,
            epp.grpc,
            &pods,
        )
        .await;
    // The simulator only serves MODEL (404 for anything else), so a 200 proves the rewrite.
    let out = traffic(envoy.listener, 30, 10, &Req::chat(ALIAS, "hi", false, 4)).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(o.status == 200, "request {i}: {} {:.200}", o.status, o.body);
        let v: serde_json::Value = serde_json::from_str(&o.body).context("JSON body")?;
        ensure!(
            v["model"] == ALIAS,
            "request {i}: model {} in the response",
            v["model"]
        );
    }
    let out = traffic(envoy.listener, 10, 5, &Req::chat(ALIAS, "hi", true, 8)).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(o.status == 200, "stream {i}: {} {:.200}", o.status, o.body);
        let events: Vec<serde_json::Value> = sse_json(&o.body);
        ensure!(events.len() >= 8, "stream {i}: {} events", events.len());
        for e in &events {
            ensure!(
                e["model"] == ALIAS,
                "stream {i}: event model {}",
                e["model"]
            );
        }
    }
    Ok(40)
}

/// The shipped FailOpen gateway sends the request body BUFFERED (README "FailOpen"): the EPP
/// routes on the body Envoy holds and answers in the body's answer. A model rewrite replaces
/// the body (with its length, or Envoy refuses it), a 1 MiB prompt reaches the engine whole, a
/// body the EPP refuses gets its 400, and a body over the 16 MiB buffer limit gets Envoy's 413.
#[allow(non_snake_case)]
async fn FailOpenRoutesOnTheBufferedBody(ctx: Ctx) -> Verdict {
    const ALIAS: &str = "switchyard-conformance-alias";
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    epp.handles.director.set_policies(Policies {
        objectives: Default::default(),
        rewrites: vec![ModelRewrite {
            name: "alias".into(),
            created: 0,
            rules: vec![RewriteRule {
                matches: vec![ALIAS.into()],
                targets: vec![RewriteTarget {
                    model: MODEL.into(),
                    weight: 1,
                }],
            }],
        }],
    });
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailOpen, epp.grpc, &pods)
        .await;
    envoy.wait_epp_health(true).await;
    // The simulator only serves MODEL (404 for anything else), so a 200 proves the rewrite.
    let out = traffic(envoy.listener, 20, 5, &Req::chat(ALIAS, "hi", false, 4)).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(o.status == 200, "rewrite {i}: {} {:.200}", o.status, o.body);
        let v: serde_json::Value = serde_json::from_str(&o.body).context("JSON body")?;
        // The lean response path: the answer is not rewritten back.
        ensure!(v["model"] == MODEL, "rewrite {i}: model {}", v["model"]);
    }
    let small = send(envoy.listener, &Req::completion()).await;
    ensure!(small.status == 200, "small prompt: {}", small.status);
    let small_tokens = prompt_tokens(&small.body)?;
    let prompt = "word ".repeat(210_000);
    for model in [MODEL, ALIAS] {
        let body = serde_json::to_vec(
            &serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 2}),
        )?;
        ensure!(body.len() > 1 << 20);
        let req = Req {
            path: "/v1/completions".into(),
            headers: Vec::new(),
            body,
        };
        let o = send(envoy.listener, &req).await;
        ensure!(
            o.status == 200,
            "1 MiB prompt ({model}): {} {:.200}",
            o.status,
            o.body
        );
        let tokens = prompt_tokens(&o.body)?;
        ensure!(
            tokens > 200_000 && tokens > small_tokens,
            "1 MiB prompt ({model}): only {tokens} prompt tokens reached the engine"
        );
    }
    let not_json = Req {
        path: "/v1/completions".into(),
        headers: Vec::new(),
        body: b"this is not json".to_vec(),
    };
    let o = send(envoy.listener, &not_json).await;
    ensure!(
        o.status == 400 && o.body.contains("inference error: BadRequest"),
        "invalid body: {} {:.200}",
        o.status,
        o.body
    );
    ensure!(
        o.replica.is_none(),
        "the invalid body reached {:?}",
        o.replica
    );
    let huge = Req {
        path: "/v1/completions".into(),
        headers: Vec::new(),
        body: vec![b' '; 17 << 20],
    };
    let o = send(envoy.listener, &huge).await;
    // Envoy's own 413 (the EPP never sees the body), not the EPP's `inference error`.
    ensure!(
        o.status == 413 && !o.body.contains("inference error"),
        "17 MiB body: {} {:.200}",
        o.status,
        o.body
    );
    Ok(25)
}

/// A sheddable request (objective with priority < 0) gets 429 from the EPP when every
/// endpoint is saturated; a critical request still goes through.
#[allow(non_snake_case)]
async fn SheddableRequestGets429WhenSaturated(ctx: Ctx) -> Verdict {
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    epp.handles.director.set_policies(Policies {
        objectives: [("batch".to_string(), -1)].into_iter().collect(),
        rewrites: vec![],
    });
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailClose, epp.grpc, &pods)
        .await;
    // Metrics are set by hand (no scraping): deep queues everywhere.
    testkit::set_queues(&epp, &[500, 500]);
    let sheddable = Req::completion().header("x-gateway-inference-objective", "batch");
    let out = traffic(envoy.listener, 30, 10, &sheddable).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(
            o.status == 429 && o.body.starts_with("inference error:"),
            "sheddable request {i}: {} {:.200}",
            o.status,
            o.body
        );
    }
    testkit::set_queues(&epp, &[500, 500]);
    let out2 = traffic(envoy.listener, 30, 10, &Req::completion()).await;
    for (i, o) in out2.iter().enumerate() {
        ensure!(
            o.status == 200,
            "critical request {i}: {} {:.200}",
            o.status,
            o.body
        );
    }
    Ok(60)
}

/// A 1 MiB prompt goes through the EPP and reaches the engine whole.
#[allow(non_snake_case)]
async fn OneMebibytePrompt(ctx: Ctx) -> Verdict {
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailClose, epp.grpc, &pods)
        .await;
    let small = send(envoy.listener, &Req::completion()).await;
    ensure!(small.status == 200, "small prompt: {}", small.status);
    let small_tokens = prompt_tokens(&small.body)?;
    let prompt = "word ".repeat(210_000);
    let body = serde_json::to_vec(
        &serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
    )?;
    ensure!(body.len() > 1 << 20);
    let req = Req {
        path: "/v1/completions".into(),
        headers: Vec::new(),
        body,
    };
    let out = traffic(envoy.listener, 4, 2, &req).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(o.status == 200, "request {i}: {} {:.200}", o.status, o.body);
        let tokens = prompt_tokens(&o.body)?;
        // The engine counted (roughly) one token per word: the whole prompt arrived.
        ensure!(
            tokens > 200_000 && tokens > small_tokens,
            "request {i}: only {tokens} prompt tokens reached the engine"
        );
    }
    Ok(5)
}

/// SSE passes through Envoy and the EPP event by event, not buffered, and intact.
#[allow(non_snake_case)]
async fn SseStreamingIntact(ctx: Ctx) -> Verdict {
    // The calibrated latency model (≈6 ms per token), so that a stream takes visible time.
    let config = sim::Config {
        seed: 11,
        ..sim::Config::default()
    };
    let pods = pods(2, 2, 1, &config).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailClose, epp.grpc, &pods)
        .await;
    let req = Req::chat(MODEL, "tell me a story", true, 40);
    let mut sent = 0;
    for round in 0..3 {
        let headers: Vec<(&str, &str)> = Vec::new();
        let resp = testkit::http::post(envoy.listener, &req.path, &headers, req.body.clone()).await;
        sent += 1;
        ensure!(resp.status() == 200, "round {round}: {}", resp.status());
        let ct = testkit::http::header(&resp, "content-type")
            .unwrap_or("")
            .to_owned();
        ensure!(ct.contains("text/event-stream"), "content-type {ct}");
        let frames = testkit::http::frames(resp).await;
        let text: String = frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        let events = sse_json(&text);
        let content_events = events
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count();
        ensure!(
            content_events == 40,
            "round {round}: {content_events} content events"
        );
        ensure!(
            events
                .last()
                .is_some_and(|e| e["usage"]["completion_tokens"] == 40),
            "round {round}: no final usage event"
        );
        ensure!(
            text.trim_end().ends_with("data: [DONE]"),
            "round {round}: no [DONE]"
        );
        ensure!(
            frames.len() >= 10,
            "round {round}: only {} frames",
            frames.len()
        );
        let span = frames.last().unwrap().0.duration_since(frames[0].0);
        ensure!(
            span > Duration::from_millis(50),
            "round {round}: frames arrived together"
        );
    }
    Ok(sent)
}

/// The three response paths (README "Response path"), same EPP, same streamed requests: the
/// shipped full one; lean (`response_body_mode: NONE`), where the EPP exchanges a constant
/// number of messages per request instead of one round trip per SSE chunk (counted by Envoy's
/// own ext_proc statistics), still records every request's duration and releases it at the
/// response's end; and minimal (response headers skipped too), fewer messages still, which
/// records no duration but still holds each request until its response ends. Token metrics
/// and TTFT/TPOT need the full path, which records them exactly.
#[allow(non_snake_case)]
async fn ResponsePathsLeanAndFull(ctx: Ctx) -> Verdict {
    const N: usize = 10;
    const TOKENS: u32 = 40;
    // The calibrated latency model (≈6 ms per token): a stream lasts long enough that a request
    // released at its response headers instead of its end would show.
    let config = sim::Config {
        seed: 11,
        ..sim::Config::default()
    };
    let pods = pods(2, 2, 1, &config).await;
    let mut seen = Vec::new();
    for path in [
        ResponsePath::Full,
        ResponsePath::Lean,
        ResponsePath::Minimal,
        ResponsePath::Observed,
    ] {
        let epp = ctx
            .epp_observing(
                pool_of("primary", &pods),
                endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
                path == ResponsePath::Observed,
            )
            .await;
        let envoy = ctx
            .plain_envoy_with(Variant::PlaintextFailClose, path, epp.grpc, &pods)
            .await;
        let req = Req::chat(MODEL, "tell me a story", true, TOKENS);
        let out = traffic(envoy.listener, N, 5, &req).await;
        for (i, o) in out.iter().enumerate() {
            ensure!(
                o.status == 200,
                "{path:?} {i}: {} {:.200}",
                o.status,
                o.body
            );
            let events = sse_json(&o.body);
            ensure!(
                events
                    .last()
                    .is_some_and(|e| e["usage"]["completion_tokens"] == TOKENS),
                "{path:?} {i}: the client lost the usage event"
            );
            ensure!(
                o.body.trim_end().ends_with("data: [DONE]"),
                "{path:?} {i}: no [DONE]"
            );
        }
        let sent = envoy.stat("http.openai.ext_proc.stream_msgs_sent").await;
        let received = envoy
            .stat("http.openai.ext_proc.stream_msgs_received")
            .await;
        // Without the response body the EPP learns of a response's end when Envoy closes the
        // ext_proc stream, just after the client has its answer: wait (bounded) until every
        // request is released and, where they are recorded, every duration is.
        let durations = match path {
            ResponsePath::Minimal => 0.0,
            ResponsePath::Full | ResponsePath::Lean | ResponsePath::Observed => N as f64,
        };
        let tokens = match path {
            ResponsePath::Full | ResponsePath::Observed => N as f64,
            ResponsePath::Lean | ResponsePath::Minimal => 0.0,
        };
        // An observer records the answer when it sees its end, which may come just after the
        // routing stream's: wait for the token counts too.
        let text = settled_metrics(epp.metrics, durations, tokens).await?;
        let m = |name: &str| metric_total(&text, name);
        println!(
            "    {path:?}: ext_proc messages to the EPP {sent}, from the EPP {received} ({} per request)",
            (sent + received) as f64 / N as f64
        );
        if path == ResponsePath::Observed {
            // The observer's own statistics (its `stat_prefix`): it sent the answers' chunks and
            // got nothing back, and every stream found its request.
            let observer_sent = envoy
                .stat("http.openai.ext_proc.observer.stream_msgs_sent")
                .await;
            let observer_received = envoy
                .stat("http.openai.ext_proc.observer.stream_msgs_received")
                .await;
            println!(
                "    {path:?}: observer messages to the EPP {observer_sent}, from the EPP {observer_received}"
            );
            ensure!(
                observer_sent >= N as u64 * u64::from(TOKENS) / 2 && observer_received == 0,
                "observer: sent {observer_sent}, received {observer_received}"
            );
            ensure!(
                metric_with(
                    &text,
                    "inference_extension_response_observer_streams_total",
                    "outcome=\"matched\""
                ) == N as f64
                    && metric_total(&text, "inference_extension_response_observer_streams_total")
                        == N as f64,
                "observer streams: {}",
                text.lines()
                    .filter(|l| l.starts_with("inference_extension_response_observer"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        ensure!(
            m("inference_objective_request_total") == N as f64,
            "{path:?}: requests counted {}",
            m("inference_objective_request_total")
        );
        ensure!(
            m("inference_objective_output_tokens_count") == tokens
                && m("inference_objective_output_tokens_sum") == tokens * f64::from(TOKENS),
            "{path:?}: output tokens count {} sum {}",
            m("inference_objective_output_tokens_count"),
            m("inference_objective_output_tokens_sum")
        );
        ensure!(
            m("inference_objective_input_tokens_count") == tokens,
            "{path:?}: input tokens"
        );
        ensure!(
            m("inference_objective_request_duration_seconds_count") == durations,
            "{path:?}: durations recorded {}",
            m("inference_objective_request_duration_seconds_count")
        );
        ensure!(
            m("inference_objective_normalized_time_per_output_token_seconds_count") == tokens,
            "{path:?}: normalized TPOT"
        );
        ensure!(
            m("inference_objective_request_ttft_seconds_count") == tokens,
            "{path:?}: TTFT recorded {} (only the full path sees the first chunk)",
            m("inference_objective_request_ttft_seconds_count")
        );
        ensure!(
            m("inference_objective_running_requests") == 0.0,
            "{path:?}: requests still running"
        );
        if path == ResponsePath::Minimal {
            held_until_the_response_ends(&envoy, epp.metrics).await?;
        }
        let mean = m("inference_objective_request_duration_seconds_sum") / N as f64;
        seen.push((path, sent + received, mean));
    }
    let (full, lean, minimal, observed) = (&seen[0], &seen[1], &seen[2], &seen[3]);
    // The observer changes nothing on the routing filter's side: lean's messages, and each
    // request still held until its response ends.
    ensure!(
        observed.1 == lean.1 && observed.2 > 0.7 * full.2,
        "observed: messages {} (lean {}), mean duration {:.3} s (full {:.3} s)",
        observed.1,
        lean.1,
        observed.2,
        full.2
    );
    // The lean path still holds each request until its response ends (load accounting, the
    // duration metric): not released at the response headers.
    ensure!(
        lean.2 > 0.1 && lean.2 > 0.7 * full.2,
        "mean duration: lean {:.3} s, full {:.3} s",
        lean.2,
        full.2
    );
    // Full: request headers, body, response headers, ≥ 40 chunks, answered one by one. Lean:
    // request headers, body, response headers (and a trailers message), each answered.
    // Minimal: the response headers' round trip fewer.
    ensure!(
        lean.1 <= 8 * N as u64 && lean.1 * 5 < full.1 && minimal.1 + N as u64 <= lean.1,
        "messages: minimal {} lean {} full {}",
        minimal.1,
        lean.1,
        full.1
    );
    Ok(4 * N)
}

/// The observed path with two EPPs behind one Envoy (active-active): Envoy balances each
/// request's observer stream apart from its routing stream, so some reach the EPP that did not
/// route them. Every answer is still recorded exactly once across the two, from the tag the
/// routing answer wrote (`other_epp`) when not claimed where it was routed (`matched`).
#[allow(non_snake_case)]
async fn ResponseObserverAcrossEpps(ctx: Ctx) -> Verdict {
    const N: usize = 24;
    const TOKENS: u32 = 20;
    let config = sim::Config {
        seed: 11,
        ..sim::Config::default()
    };
    let pods = pods(2, 2, 1, &config).await;
    let config = endpoint_picker::config::REFERENCE_DEFAULT_CONFIG;
    let a = ctx
        .epp_observing(pool_of("primary", &pods), config, true)
        .await;
    let b = ctx
        .epp_observing(pool_of("primary", &pods), config, true)
        .await;
    let envoy = testkit::envoy::Envoy::start_several_epps(
        &ctx.envoy,
        Variant::PlaintextFailClose,
        ResponsePath::Observed,
        &[a.grpc, b.grpc],
        &addresses(&pods),
    )
    .await;
    let req = Req::chat(MODEL, "tell me a story", true, TOKENS);
    let out = traffic(envoy.listener, N, 6, &req).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(o.status == 200, "{i}: {} {:.200}", o.status, o.body);
    }
    // Both EPPs' metrics once every answer is recorded (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ta, tb) = loop {
        let ta = testkit::http::get_text(a.metrics, "/metrics")
            .await
            .context("EPP a")?;
        let tb = testkit::http::get_text(b.metrics, "/metrics")
            .await
            .context("EPP b")?;
        let recorded = metric_total(&ta, "inference_objective_output_tokens_count")
            + metric_total(&tb, "inference_objective_output_tokens_count");
        if recorded >= N as f64 || Instant::now() > deadline {
            break (ta, tb);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let both = |name: &str| metric_total(&ta, name) + metric_total(&tb, name);
    let outcome = |o: &str| {
        let label = format!("outcome=\"{o}\"");
        metric_with(
            &ta,
            "inference_extension_response_observer_streams_total",
            &label,
        ) + metric_with(
            &tb,
            "inference_extension_response_observer_streams_total",
            &label,
        )
    };
    println!(
        "    {N} answers: observer streams matched {}, released {}, other_epp {}; routed by the two EPPs {} and {}",
        outcome("matched"),
        outcome("released"),
        outcome("other_epp"),
        metric_total(&ta, "inference_objective_request_total"),
        metric_total(&tb, "inference_objective_request_total"),
    );
    ensure!(
        both("inference_objective_output_tokens_count") == N as f64
            && both("inference_objective_output_tokens_sum") == N as f64 * f64::from(TOKENS),
        "output tokens recorded: count {} sum {}",
        both("inference_objective_output_tokens_count"),
        both("inference_objective_output_tokens_sum")
    );
    ensure!(
        both("inference_objective_request_ttft_seconds_count") == N as f64,
        "TTFT recorded {}",
        both("inference_objective_request_ttft_seconds_count")
    );
    ensure!(
        outcome("matched") + outcome("released") + outcome("other_epp") == N as f64
            && outcome("no_tag") + outcome("invalid") == 0.0,
        "observer outcomes"
    );
    Ok(N)
}

/// The EPP's metrics once no request runs and `durations` requests have recorded their
/// duration (bounded: after 10 s, whatever they are then).
async fn settled_metrics(
    metrics: SocketAddr,
    durations: f64,
    answers: f64,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = testkit::http::get_text(metrics, "/metrics")
            .await
            .context("EPP /metrics")?;
        let settled = metric_total(&text, "inference_objective_running_requests") == 0.0
            && metric_total(&text, "inference_objective_request_duration_seconds_count")
                >= durations
            && metric_total(&text, "inference_objective_output_tokens_count") >= answers;
        if settled || Instant::now() > deadline {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A long streamed answer through `envoy`: once its first chunk has reached the client, the
/// EPP still counts it running (it sees no response headers on the minimal path, and must not
/// release the request before the stream's end); once the client has it all, no longer.
async fn held_until_the_response_ends(
    envoy: &testkit::envoy::Envoy,
    metrics: SocketAddr,
) -> anyhow::Result<()> {
    // ≈ 6 ms per token: the answer streams for over a second after its first chunk.
    let req = Req::chat(MODEL, "tell me a long story", true, 200);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let listener = envoy.listener;
    let stream = tokio::spawn(async move {
        let resp = req.post(listener).await;
        let status = resp.status().as_u16();
        let (frames, error) = testkit::http::frames_signalling_first(resp, first_tx).await;
        (status, frames, error)
    });
    tokio::time::timeout(Duration::from_secs(20), first_rx)
        .await
        .context("no first chunk in 20 s")?
        .context("the stream ended before its first chunk")?;
    let during = testkit::http::get_text(metrics, "/metrics")
        .await
        .context("EPP /metrics")?;
    let (status, frames, error) = stream.await.context("stream task")?;
    ensure!(
        status == 200 && error.is_none(),
        "stream: {status} {error:?}"
    );
    let running = metric_total(&during, "inference_objective_running_requests");
    ensure!(
        running == 1.0,
        "{running} running while the answer streamed ({} frames in all)",
        frames.len()
    );
    let after = settled_metrics(metrics, 0.0, 0.0).await?;
    ensure!(
        metric_total(&after, "inference_objective_running_requests") == 0.0,
        "not released at the response's end"
    );
    Ok(())
}

/// The sum of every series of a metric in a Prometheus exposition (0 when absent).
/// The value of `name`'s series whose labels contain `label` (e.g. `outcome="matched"`).
fn metric_with(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

fn metric_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A body that is not JSON is answered by the EPP (400 with its error text), not forwarded:
/// the EPP must read the body before it answers the headers.
#[allow(non_snake_case)]
async fn InvalidBodyRejectedByEpp(ctx: Ctx) -> Verdict {
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    let envoy = ctx
        .plain_envoy(Variant::PlaintextFailClose, epp.grpc, &pods)
        .await;
    let req = Req {
        path: "/v1/chat/completions".into(),
        headers: Vec::new(),
        body: b"{\"model\": oops".to_vec(),
    };
    let out = traffic(envoy.listener, 20, 10, &req).await;
    for (i, o) in out.iter().enumerate() {
        ensure!(
            o.status == 400 && o.body.starts_with("inference error: BadRequest"),
            "request {i}: {} {:.200}",
            o.status,
            o.body
        );
        ensure!(o.replica.is_none(), "request {i} reached {:?}", o.replica);
    }
    Ok(out.len())
}

/// What a hostile client found on a reference-style gateway (ORIGINAL_DST on the destination
/// header, no client header stripped before ext_proc), which must all be the EPP's to stop:
/// a client's model-rewrite header (either spelling) neither overrides the operator's
/// InferenceModelRewrite nor picks a model by itself; a client's destination headers do not
/// steer routing; bodies of the wrong shape and hostile model names get a 400 without reaching
/// a model server; and a 4 MiB model name does not grow `/metrics`.
#[allow(non_snake_case)]
async fn HostileClientsThroughReferenceStyleEnvoy(ctx: Ctx) -> Verdict {
    const ALIAS: &str = "switchyard-conformance-canary";
    let pods = pods(2, 2, 1, &sim_config()).await;
    let epp = ctx
        .epp(
            pool_of("primary", &pods),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    epp.handles.director.set_policies(Policies {
        objectives: Default::default(),
        rewrites: vec![ModelRewrite {
            name: "canary".into(),
            created: 0,
            rules: vec![RewriteRule {
                matches: vec![ALIAS.into()],
                targets: vec![RewriteTarget {
                    model: MODEL.into(),
                    weight: 1,
                }],
            }],
        }],
    });
    let envoy = ctx.reference_envoy(epp.grpc).await;
    let mut sent = 0;
    // The simulator serves MODEL only (404 otherwise): a 200 proves which model reached it.
    for header in ["x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite"] {
        let overridden = Req::chat(ALIAS, "hi", false, 4).header(header, "not-served");
        let ignored = Req::chat(MODEL, "hi", false, 4).header(header, "not-served");
        for req in [overridden, ignored] {
            let out = traffic(envoy.listener, 10, 5, &req).await;
            sent += out.len();
            for (i, o) in out.iter().enumerate() {
                ensure!(
                    o.status == 200,
                    "{header} request {i}: {} {:.200}",
                    o.status,
                    o.body
                );
            }
        }
    }
    // The destination header itself: routing follows the EPP, not the client.
    let steer = Req::completion().header("x-gateway-destination-endpoint", "127.0.0.1:9");
    let out = traffic(envoy.listener, 10, 5, &steer).await;
    sent += out.len();
    for (i, o) in out.iter().enumerate() {
        ensure!(
            o.status == 200,
            "steered request {i}: {} {:.200}",
            o.status,
            o.body
        );
    }
    let shapes: [(&str, String); 6] = [
        (
            "/v1/completions",
            format!(r#"{{"model":"{MODEL}","prompt":{{"a":1}}}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"{MODEL}","messages":"hi"}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"{MODEL}","messages":{{"role":"user"}}}}"#),
        ),
        ("/v1/chat/completions", String::new()),
        (
            "/v1/chat/completions",
            r#"{"model":"m[2J
forged","messages":[{"role":"user","content":"x"}]}"#
                .to_owned(),
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{MODEL}","stream":"{}","messages":[{{"role":"user","content":"x"}}]}}"#,
                "B".repeat(1 << 20)
            ),
        ),
    ];
    for (path, body) in shapes {
        let req = Req {
            path: path.into(),
            headers: Vec::new(),
            body: body.into_bytes(),
        };
        let out = traffic(envoy.listener, 2, 2, &req).await;
        sent += out.len();
        for o in &out {
            ensure!(
                o.status == 400
                    && o.body.starts_with("inference error: BadRequest")
                    && o.body.len() < 300,
                "{path}: {} {:.300}",
                o.status,
                o.body
            );
            ensure!(o.replica.is_none(), "{path}: reached {:?}", o.replica);
        }
    }
    // A 4 MiB model name: refused, and the metrics exposition does not grow with it.
    let metrics_size = || async {
        testkit::http::get_text(epp.metrics, "/metrics")
            .await
            .map_or(0, |t| t.len())
    };
    let before = metrics_size().await;
    let huge = Req::chat(&"x".repeat(4 << 20), "hi", false, 4);
    let out = traffic(envoy.listener, 3, 3, &huge).await;
    sent += out.len();
    for o in &out {
        ensure!(
            o.status == 400 && o.body.len() < 300,
            "4 MiB model: {} {:.200}",
            o.status,
            o.body
        );
    }
    let after = metrics_size().await;
    ensure!(
        after < before + 4096,
        "/metrics grew from {before} to {after} bytes"
    );
    Ok(sent)
}

/// The real `epp` process (not the in-process server): local mode with a pool file whose Pods
/// share one target port, upstream's conformance plugin config, default flags (TLS with a
/// self-signed certificate), behind the default shipped Envoy config; the same checks as
/// `GatewayFollowingEPPRouting` and the served-endpoint echo. Skipped when the binary is
/// missing or older than its sources (`cargo test --workspace` builds it).
#[allow(non_snake_case)]
async fn EppBinaryFollowsEPPRouting(ctx: Ctx) -> Verdict {
    if std::env::var("SWITCHYARD_CONFORMANCE_FAULT").is_ok_and(|f| !f.is_empty()) {
        // Faults exist only in the in-process EPP of this suite's build; the binary has none.
        return Err(Skip("the epp binary cannot be told to misbehave".into()).into());
    }
    let binary = match epp_binary() {
        Ok(b) => b,
        Err(why) => return Err(Skip(why).into()),
    };
    let ips: Vec<std::net::Ipv4Addr> = (2..5)
        .map(|o| std::net::Ipv4Addr::new(127, 0, 0, o))
        .collect();
    let port = common_free_port(&ips);
    let pods = pods_on_port(&ips, port, &sim_config()).await;
    let epp = EppProcess::start(&binary, &pods, port, CONFORMANCE_CONFIG).await?;
    let envoy = ctx
        .plain_envoy(Variant::TlsFailClose, epp.grpc, &pods)
        .await;
    envoy.wait_epp_health(true).await;
    let names = names(&[&pods]);
    let mut sent = 0;
    for k in 1..=2 {
        let selected: BTreeSet<SocketAddr> = pods[..k].iter().map(|p| p.rank(0)).collect();
        let header = join(pods[..k].iter().map(|p| p.ip.to_string()));
        let req = Req::completion().header(SELECTION, header);
        let out = traffic(envoy.listener, 100, 10, &req).await;
        sent += out.len();
        all_served_by(&out, &selected, &names, true)
            .with_context(|| format!("{k} selected pod(s)"))?;
    }
    Ok(sent)
}

/// `--client-ca-path` with a real Envoy: the shipped TLS template given a client certificate
/// the EPP's CA signed routes as usual (health checks included); the same template without a
/// client certificate gets nothing from the EPP, so FailClose answers every request 5xx.
#[allow(non_snake_case)]
async fn MutualTlsToTheEpp(ctx: Ctx) -> Verdict {
    let pods = pods(2, 3, 1, &sim_config()).await;
    let dir = std::env::temp_dir().join(format!("switchyard-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let gateway_key = rcgen::KeyPair::generate()?;
    let gateway =
        rcgen::CertificateParams::new(vec!["gateway".to_owned()])?.signed_by(&gateway_key, &ca)?;
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("gateway.crt"),
        dir.join("gateway.key"),
    );
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, gateway.pem())?;
    std::fs::write(&key_path, gateway_key.serialize_pem())?;
    let tls = epp::tls::ServerTls::self_signed()?.require_client_certificates(&ca_path)?;
    let epp = testkit::start_epp(
        pool_of("primary", &pods),
        testkit::EppOptions {
            config: CONFORMANCE_CONFIG.to_owned(),
            server_tls: Some(tls),
            ..Default::default()
        },
    )
    .await;
    let template = std::fs::read_to_string(
        testkit::envoy::workspace_root().join("gateway-configs/envoy/envoy.yaml"),
    )?;
    let vars = [
        ("EPP_HOST", epp.grpc.ip().to_string()),
        ("EPP_PORT", epp.grpc.port().to_string()),
        (
            "BACKEND_ENDPOINTS",
            testkit::envoy::lb_endpoints(&addresses(&pods)),
        ),
    ];
    let plain_tls = testkit::envoy::render_vars(&template, &vars);
    let upstream_tls = "          alpn_protocols: [\"h2\"]\n          validation_context: {}\n";
    ensure!(
        plain_tls.contains(upstream_tls),
        "the shipped template's TLS context changed"
    );
    let with_cert = plain_tls.replace(
        upstream_tls,
        &format!(
            "{upstream_tls}          tls_certificates:\n          - certificate_chain: {{filename: {}}}\n            private_key: {{filename: {}}}\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let names = names(&[&pods]);
    let target = pods[1].rank(0);
    let req = Req::completion().header(SELECTION, target.ip().to_string());
    let envoy = testkit::envoy::Envoy::start_config(&ctx.envoy, &with_cert).await;
    envoy.wait_epp_health(true).await;
    let out = traffic(envoy.listener, 50, 10, &req).await;
    all_served_by(&out, &[target].into(), &names, true)
        .context("with the gateway's certificate")?;
    drop(envoy);
    let envoy = testkit::envoy::Envoy::start_config(&ctx.envoy, &plain_tls).await;
    let refused = traffic(envoy.listener, 20, 5, &req).await;
    for (i, o) in refused.iter().enumerate() {
        ensure!(
            (500..600).contains(&o.status) && o.replica.is_none(),
            "request {i} without a client certificate: {} from {:?}",
            o.status,
            o.replica
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out.len() + refused.len())
}

// ---------------------------------------------------------------------------------------------
// Helpers and the runner
// ---------------------------------------------------------------------------------------------

/// Returned (as an error) by a scenario that cannot run here; reported as skipped.
#[derive(Debug)]
struct Skip(String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

fn sse_json(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

fn prompt_tokens(body: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_str(body).context("JSON response")?;
    v["usage"]["prompt_tokens"]
        .as_u64()
        .context("usage.prompt_tokens")
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into()),
        Err(e) => e.to_string(),
    }
}

const SCENARIO_TIMEOUT: Duration = Duration::from_secs(90);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // libtest-style flags cargo may pass (`--list`, `--nocapture`, …) are accepted; other
    // arguments filter scenarios by substring.
    if args.iter().any(|a| a == "--list") {
        for s in scenarios() {
            println!("{}: test", s.name);
        }
        return;
    }
    // Positional arguments are filters; libtest flags that take a value skip it.
    let mut filters: Vec<&String> = Vec::new();
    let mut skip_value = false;
    for a in &args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if a.starts_with('-') {
            skip_value = !a.contains('=')
                && matches!(
                    a.as_str(),
                    "--test-threads" | "--skip" | "--format" | "--color" | "--logfile" | "-Z"
                );
        } else {
            filters.push(a);
        }
    }
    let fault_name = std::env::var("SWITCHYARD_CONFORMANCE_FAULT")
        .ok()
        .filter(|f| !f.is_empty());
    let fault: Option<ConformanceFault> = fault_name.as_deref().map(|f| {
        f.parse()
            .unwrap_or_else(|e| panic!("SWITCHYARD_CONFORMANCE_FAULT: {e}"))
    });
    let Some(envoy) = testkit::envoy::binary_or_skip("conformance") else {
        return;
    };
    let ctx = Ctx {
        envoy: envoy.clone(),
        fault,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let mut results = Vec::new();
    println!(
        "\nSwitchyard conformance suite{}",
        fault_name
            .as_deref()
            .map(|f| format!(" (deliberate EPP fault: {f})"))
            .unwrap_or_default()
    );
    for s in scenarios() {
        if !filters.is_empty() && !filters.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        let t0 = Instant::now();
        let (status, requests, detail) = if let Some(reason) = s.skip {
            (Status::Skipped, 0, reason.to_owned())
        } else {
            let run = (s.run)(ctx.clone());
            let r = runtime.block_on(async {
                tokio::time::timeout(SCENARIO_TIMEOUT, tokio::spawn(run)).await
            });
            match r {
                Ok(Ok(Ok(n))) => (Status::Pass, n, String::new()),
                Ok(Ok(Err(e))) => match e.downcast_ref::<Skip>() {
                    Some(Skip(why)) => (Status::Skipped, 0, why.clone()),
                    None => (Status::Fail, 0, format!("{e:#}")),
                },
                Ok(Err(join)) => (
                    Status::Fail,
                    0,
                    format!("panicked: {}", panic_message(join)),
                ),
                Err(_) => (
                    Status::Fail,
                    0,
                    format!("timed out after {SCENARIO_TIMEOUT:?}"),
                ),
            }
        };
        let ms = t0.elapsed().as_millis();
        let mark = match status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skipped => "SKIP",
        };
        println!(
            "  {mark} {:<48} {:>6} ms {:>5} req  {}",
            s.name,
            ms,
            requests,
            first_line(&detail)
        );
        results.push(ScenarioResult {
            name: s.name.to_owned(),
            origin: s.origin,
            status,
            duration_ms: ms,
            requests,
            detail,
        });
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    let count = |st: Status| results.iter().filter(|r| r.status == st).count();
    let repo = testkit::envoy::workspace_root();
    let report = Report {
        schema: "switchyard-conformance/v1",
        switchyard_version: env!("CARGO_PKG_VERSION").to_owned(),
        switchyard_commit: report::git_commit(&repo),
        envoy_version: testkit::envoy::version(&envoy).unwrap_or_default(),
        fault: fault_name.clone(),
        finished_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        duration_ms: started.elapsed().as_millis(),
        passed: count(Status::Pass),
        failed: count(Status::Fail),
        skipped: count(Status::Skipped),
        scenarios: results,
    };
    let path = report::default_path(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        fault_name.as_deref(),
    );
    if let Err(e) = report.write(&path) {
        eprintln!("could not write the report to {}: {e}", path.display());
    }
    println!(
        "\n{} passed, {} failed, {} skipped in {:.1} s (Envoy {}, Switchyard {} {}); report: {}",
        report.passed,
        report.failed,
        report.skipped,
        started.elapsed().as_secs_f64(),
        report.envoy_version,
        report.switchyard_version,
        report.switchyard_commit,
        path.display()
    );
    let failed: BTreeMap<&str, &str> = report
        .scenarios
        .iter()
        .filter(|r| r.status == Status::Fail)
        .map(|r| (r.name.as_str(), r.detail.as_str()))
        .collect();
    match &fault_name {
        None if !failed.is_empty() => {
            eprintln!("conformance failures:");
            for (name, detail) in &failed {
                eprintln!("  {name}: {detail}");
            }
            std::process::exit(1);
        }
        // Self-test: the suite must notice a broken EPP.
        Some(f) if failed.is_empty() => {
            eprintln!("deliberate fault {f} went unnoticed: no scenario failed");
            std::process::exit(1);
        }
        Some(f) => println!(
            "deliberate fault {f} caught by: {}",
            failed.keys().copied().collect::<Vec<_>>().join(", ")
        ),
        None => {}
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(160).collect()
}

// ---------------------------------------------------------------------------------------------
// Body-based routing (issue 17): the `bbr` router before route matching, one pool and one EPP
// per base model, through `envoy/bbr.yaml`.
// ---------------------------------------------------------------------------------------------

/// Two pools of two pods: [`MODEL`] (with the adapter [`ADAPTER`] registered on its replicas)
/// and [`MODEL_B`]; an EPP each; the router mapping the adapter to its base model.
struct BbrSetup {
    a: Vec<Pod>,
    b: Vec<Pod>,
    names: BTreeMap<String, SocketAddr>,
    envoy: testkit::envoy::Envoy,
    bbr: Bbr,
    // Kept alive for the scenario.
    _epps: (testkit::Epp, testkit::Epp),
}

impl BbrSetup {
    fn pool_a(&self) -> BTreeSet<SocketAddr> {
        addresses(&self.a).into_iter().collect()
    }
    fn pool_b(&self) -> BTreeSet<SocketAddr> {
        addresses(&self.b).into_iter().collect()
    }
}

async fn bbr_setup(ctx: &Ctx) -> BbrSetup {
    let a_config = sim::Config {
        lora_modules: vec![ADAPTER.to_owned()],
        max_loras: 2,
        ..sim_config()
    };
    let b_config = sim::Config {
        model: MODEL_B.to_owned(),
        ..sim_config()
    };
    let a = pods(2, 2, 1, &a_config).await;
    let b = pods(4, 2, 1, &b_config).await;
    let epp_a = ctx
        .epp(
            pool_of("llama", &a),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    let epp_b = ctx
        .epp(
            pool_of("qwen", &b),
            endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
            false,
        )
        .await;
    let bbr = start_bbr(&[(MODEL, &[ADAPTER]), (MODEL_B, &[])]).await;
    let envoy = ctx
        .bbr_envoy(BbrGateway {
            bbr: bbr.grpc,
            epp_a: epp_a.grpc,
            epp_b: epp_b.grpc,
            a: &a,
            b: &b,
        })
        .await;
    let names = names(&[&a, &b]);
    BbrSetup {
        a,
        b,
        names,
        envoy,
        bbr,
        _epps: (epp_a, epp_b),
    }
}

/// Each base model's requests reach only its own pool, and an adapter reaches its base
/// model's pool, for chat and completions; the engine answers under the requested name.
#[allow(non_snake_case)]
async fn BbrEachModelReachesOnlyItsPool(ctx: Ctx) -> Verdict {
    let s = bbr_setup(&ctx).await;
    let mut sent = 0;
    for (model, pool, what) in [
        (MODEL, s.pool_a(), "base model A"),
        (MODEL_B, s.pool_b(), "base model B"),
        (ADAPTER, s.pool_a(), "adapter of A"),
    ] {
        let req = Req::chat(model, "Name a colour.", false, 4);
        let out = traffic(s.envoy.listener, 30, 5, &req).await;
        sent += out.len();
        let seen = all_served_by(&out, &pool, &s.names, false).context(what)?;
        ensure!(!seen.is_empty(), "{what}: no replica answered");
        for o in &out {
            let v: serde_json::Value = serde_json::from_str(&o.body).context("JSON answer")?;
            ensure!(v["model"] == model, "{what}: answered as {}", v["model"]);
        }
        let mut completion = Req::completion();
        completion.body = serde_json::to_vec(&serde_json::json!({
            "model": model, "prompt": "San Francisco is", "max_tokens": 2,
        }))?;
        let out = traffic(s.envoy.listener, 10, 5, &completion).await;
        sent += out.len();
        all_served_by(&out, &pool, &s.names, false)
            .with_context(|| format!("{what}, completions"))?;
    }
    let metrics = testkit::http::get_text(s.bbr.metrics, "/metrics")
        .await
        .context("bbr /metrics")?;
    ensure!(
        metrics.contains(&format!(
            "bbr_requests_by_model_total{{model=\"{ADAPTER}\",base_model=\"{MODEL}\"}} 40"
        )),
        "bbr metrics: {metrics}"
    );
    Ok(sent)
}

/// A model no pool serves gets the gateway's clear 404 (no EPP is asked); a body without a
/// model too; a body that is not JSON gets the router's own 400 with an escaped excerpt.
#[allow(non_snake_case)]
async fn BbrUnknownModelGets404(ctx: Ctx) -> Verdict {
    let s = bbr_setup(&ctx).await;
    let out = traffic(
        s.envoy.listener,
        20,
        5,
        &Req::chat("gpt-4o-unknown", "hello", false, 4),
    )
    .await;
    for o in &out {
        ensure!(
            o.status == 404,
            "unknown model: {} {:.200}",
            o.status,
            o.body
        );
        ensure!(o.replica.is_none(), "unknown model reached {:?}", o.replica);
        ensure!(
            o.body
                .contains("no InferencePool serves the requested model"),
            "404 body: {:.200}",
            o.body
        );
    }
    let mut no_model = Req::chat(MODEL, "x", false, 4);
    no_model.body = br#"{"messages": [{"role": "user", "content": "x"}]}"#.to_vec();
    let o = send(s.envoy.listener, &no_model).await;
    ensure!(o.status == 404, "no model: {} {:.200}", o.status, o.body);
    let mut garbage = Req::chat(MODEL, "x", false, 4);
    garbage.body = b"{\"model\": \"\x1b[31mred\n".to_vec();
    let o = send(s.envoy.listener, &garbage).await;
    ensure!(o.status == 400, "bad JSON: {} {:.200}", o.status, o.body);
    ensure!(
        o.body
            .starts_with("inference error: BadRequest - invalid JSON body"),
        "bad JSON body: {:.200}",
        o.body
    );
    ensure!(
        !o.body.chars().any(|c| c.is_control()),
        "unescaped: {:?}",
        o.body
    );
    Ok(out.len() + 2)
}

/// A prompt over 1 MiB streams through the router and the EPP (both FULL_DUPLEX_STREAMED),
/// reaches its pool whole (the engine counts the same tokens as for the same prompt without
/// the gateway's help, i.e. no byte lost), for the base model and for its adapter.
#[allow(non_snake_case)]
async fn BbrOneMebibyteBodyThroughBothExtProcs(ctx: Ctx) -> Verdict {
    let s = bbr_setup(&ctx).await;
    let prompt = "word ".repeat(210_000);
    let mut sent = 0;
    let mut tokens = Vec::new();
    for model in [MODEL, ADAPTER, MODEL_B] {
        let body = serde_json::to_vec(
            &serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 2}),
        )?;
        ensure!(body.len() > 1 << 20);
        let req = Req {
            path: "/v1/completions".into(),
            headers: Vec::new(),
            body,
        };
        let out = send(s.envoy.listener, &req).await;
        sent += 1;
        let pool = if model == MODEL_B {
            s.pool_b()
        } else {
            s.pool_a()
        };
        all_served_by(std::slice::from_ref(&out), &pool, &s.names, false)
            .with_context(|| format!("1 MiB prompt for {model}"))?;
        tokens.push(prompt_tokens(&out.body)?);
    }
    ensure!(
        tokens.iter().all(|t| *t == tokens[0]) && tokens[0] > 200_000,
        "prompt tokens differ or are short: {tokens:?}"
    );
    Ok(sent)
}

/// A client's own `X-Gateway-Model-Name` / `X-Gateway-Base-Model-Name` never choose the pool:
/// the body's model does, and a body without a model matches no pool despite the headers.
#[allow(non_snake_case)]
async fn BbrSpoofedModelHeadersIgnored(ctx: Ctx) -> Verdict {
    let s = bbr_setup(&ctx).await;
    let spoof = |r: Req| {
        r.header("x-gateway-base-model-name", MODEL_B)
            .header("X-Gateway-Model-Name", MODEL_B)
            .header("x-gateway-base-model-name", MODEL_B)
    };
    let out = traffic(
        s.envoy.listener,
        30,
        5,
        &spoof(Req::chat(ADAPTER, "hi", false, 2)),
    )
    .await;
    all_served_by(&out, &s.pool_a(), &s.names, false).context("spoofed towards pool B")?;
    let mut no_model = spoof(Req::chat(MODEL, "x", false, 4));
    no_model.body = br#"{"messages": [{"role": "user", "content": "x"}]}"#.to_vec();
    let o = send(s.envoy.listener, &no_model).await;
    ensure!(
        o.status == 404 && o.replica.is_none(),
        "no model but spoofed headers: {} via {:?}",
        o.status,
        o.replica
    );
    let mut headers_only = spoof(Req::completion());
    headers_only.body = Vec::new();
    let o = send(s.envoy.listener, &headers_only).await;
    ensure!(
        o.status == 404 && o.replica.is_none(),
        "no body but spoofed headers: {} via {:?}",
        o.status,
        o.replica
    );
    Ok(out.len() + 2)
}

/// `GET /v1/models` through Envoy is answered by the router itself (bbr/src/models.rs): OpenAI's
/// list with both base models (name order) and then the adapter under its base model, every
/// entry `owned_by: switchyard` (an engine's own list would say `vllm` and not know the other
/// pool's model), so no replica answered; a query string changes nothing. What the router does
/// not answer passes through as any request: a `POST` to `/v1/models` without a model in its
/// body, and `GET /v1/models/{id}`, get the gateway's 404 and reach no replica.
#[allow(non_snake_case)]
async fn BbrListsModels(ctx: Ctx) -> Verdict {
    let s = bbr_setup(&ctx).await;
    let mut bases = [MODEL, MODEL_B];
    bases.sort_unstable();
    let want = [bases[0], bases[1], ADAPTER];
    for path in ["/v1/models", "/v1/models?x=1"] {
        let (status, body) = testkit::http::get_with(s.envoy.listener, path, &[]).await;
        ensure!(status == 200, "GET {path}: {status} {body:.200}");
        let v: serde_json::Value = serde_json::from_str(&body).context("JSON list")?;
        ensure!(v["object"] == "list", "GET {path}: {body:.300}");
        let data = v["data"].as_array().context("data")?;
        let ids: Vec<&str> = data.iter().filter_map(|e| e["id"].as_str()).collect();
        ensure!(ids == want, "GET {path}: ids {ids:?}, want {want:?}");
        for e in data {
            ensure!(
                e["object"] == "model" && e["owned_by"] == "switchyard" && e["created"].is_u64(),
                "GET {path}: entry {e}"
            );
            let parent = if e["id"] == ADAPTER {
                serde_json::json!(MODEL)
            } else {
                serde_json::Value::Null
            };
            ensure!(e["parent"] == parent, "GET {path}: parent of {e}");
        }
    }
    let mut post = Req::completion();
    post.path = "/v1/models".into();
    post.body = b"{}".to_vec();
    let o = send(s.envoy.listener, &post).await;
    ensure!(
        o.status == 404 && o.replica.is_none(),
        "POST /v1/models: {} via {:?} {:.200}",
        o.status,
        o.replica,
        o.body
    );
    let (status, body) =
        testkit::http::get_with(s.envoy.listener, &format!("/v1/models/{ADAPTER}"), &[]).await;
    ensure!(
        status == 404 && body.contains("no InferencePool serves the requested model"),
        "GET /v1/models/{{id}}: {status} {body:.200}"
    );
    let metrics = testkit::http::get_text(s.bbr.metrics, "/metrics")
        .await
        .context("bbr /metrics")?;
    ensure!(
        metrics.contains("bbr_models_requests_total 2"),
        "bbr metrics: {metrics}"
    );
    Ok(4)
}
