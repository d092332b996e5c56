//! Flow control's dispatch: letting one queued request go when the band holds `n` requests,
//! each in its own flow (a client names its flow in a header, so there can be as many flows as
//! queued requests), with each fairness policy that does not weigh every flow. Enqueuing the
//! next request is not timed; with and without the default request TTL (whose expiry looks at
//! the queue every cycle). Results: bench/RESULTS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use endpoint_picker::flow::config::{BandConfig, DEFAULT_REQUEST_TTL, FlowConfig};
use endpoint_picker::flow::policy::{FairnessPolicy, OrderingPolicy};
use endpoint_picker::flow::{FlowControl, FlowRequest, PoolProbe, PoolReading};
use endpoint_picker::saturation::Unrouted;
use tokio::time::Instant;

/// A pool that always has room, or never.
struct Pool {
    saturation: f64,
}

impl PoolProbe for Pool {
    fn read(&self, _unrouted: Unrouted) -> PoolReading {
        PoolReading {
            endpoints: 1,
            saturation: self.saturation,
        }
    }
}

const ROOM: Pool = Pool { saturation: 0.0 };
const FULL: Pool = Pool { saturation: 1.0 };

fn request(flow: usize) -> FlowRequest {
    FlowRequest {
        fairness_id: Arc::from(format!("tenant-{flow}")),
        priority: 0,
        bytes: 1_000,
        prompt_tokens: 250,
        slo_ttft: None,
        model: "m".into(),
        target_model: "m".into(),
    }
}

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("flow_dispatch_one_of_n_flows");
    let policies = [
        ("global_strict", FairnessPolicy::GlobalStrict),
        ("round_robin", FairnessPolicy::RoundRobin),
    ];
    let ttls = [("", None), ("_ttl", Some(DEFAULT_REQUEST_TTL))];
    for ((name, fairness), (ttl_name, request_ttl)) in policies
        .iter()
        .flat_map(|p| ttls.iter().map(move |t| (p, t)))
    {
        for n in [10usize, 5_000] {
            let band = BandConfig {
                max_requests: 1_000_000,
                max_bytes: u64::MAX / 2,
                fairness: (Arc::from(fairness.type_name()), fairness.clone()),
                ordering: (Arc::from("fcfs-ordering-policy"), OrderingPolicy::Fcfs),
                ..BandConfig::default()
            };
            let fc = FlowControl::new(FlowConfig {
                request_ttl: *request_ttl,
                no_endpoint_ttl: None,
                bands: vec![band],
                ..FlowConfig::default()
            });
            // Tickets are kept: dropping one would cancel or release it, and wake the
            // dispatcher for more than the one request an iteration lets go.
            let mut tickets: Vec<_> = (0..n)
                .map(|i| fc.enqueue(request(i), Instant::now()))
                .collect();
            // Each enqueue asked for a dispatch; a cycle over a full pool takes those requests
            // back, so that each timed cycle lets exactly one go.
            fc.dispatch_cycle(Instant::now(), &FULL);
            let mut next = n;
            let id = BenchmarkId::new(format!("{name}{ttl_name}"), n);
            group.bench_function(id, |b| {
                b.iter_batched(
                    || {
                        tickets.push(fc.enqueue(request(next), Instant::now()));
                        next += 1;
                    },
                    |()| fc.dispatch_cycle(Instant::now(), &ROOM),
                    criterion::BatchSize::PerIteration,
                )
            });
            assert_eq!(fc.queued(), n as u64, "one let go per request queued");
        }
    }
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
