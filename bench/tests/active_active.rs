//! Two EPPs behind one Envoy, for real: the `sim` publishing KV events on one loopback address
//! per replica, two `epp` processes with the precise profile dialing every replica, Envoy
//! balancing the ext_proc streams over both, and a third EPP beside them that Envoy does not
//! know (the scenario's `--controls`). Both routing EPPs must route requests, the third none, and
//! all three must apply events from every engine and the others' speculative entries. Bounded
//! (about 10 s on 2 cores).
//!
//! Skipped when Envoy or the binaries are missing, unless `SWITCHYARD_REQUIRE_ENVOY` is set
//! (as `make test` does), in which case that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bench::harness::{get, prom_sum};
use bench::scenario::active_active::{engines_heard, peer_applied};
use bench::scenario::precise::{self, EngineEvents};
use bench::scenario::start_sim_with;
use bench::workload::{Kind, WorkloadArgs};
use support::{runtime, scratch_dir, tools_or_skip};

#[test]
fn two_epps_behind_one_envoy_both_route_and_a_watching_one_hears_all_but_routes_nothing() {
    let Some(tools) = tools_or_skip(
        "two_epps_behind_one_envoy_both_route_and_a_watching_one_hears_all_but_routes_nothing",
    ) else {
        return;
    };
    let dir = scratch_dir("aa");
    let rt = runtime();
    rt.block_on(async {
        let events = EngineEvents::new(&tools.repo).unwrap();
        let (_sim, replicas) = start_sim_with(
            &tools,
            2,
            &["--seed".into(), "1".into()],
            &dir,
            Some(&events),
        )
        .unwrap();
        assert_eq!(replicas[0].ip().to_string(), "127.0.0.2");
        assert_eq!(replicas[1].ip().to_string(), "127.0.0.3");
        let multi = precise::start_multi_epp(
            &tools,
            &precise::precise_config(&events),
            precise::EppSet {
                routed: 2,
                watching: 1,
            },
            &replicas,
            &dir,
            &[],
            true,
        )
        .await
        .unwrap();
        let client = bench::loadgen::LoadSpec {
            url: multi.up.url.clone(),
            mode: bench::loadgen::Mode::Concurrency(2),
            duration_s: None,
            count: Some(20),
            drain_timeout_s: 10.0,
            seed: 1,
            progress: false,
        };
        let workload = WorkloadArgs {
            workload: Kind::SharedPrefix,
            groups: 4,
            system_tokens: 300,
            question_tokens: 50,
            output_tokens: 4,
            ..WorkloadArgs::default()
        };
        // Rounds of 20 requests until both routing EPPs routed some and every EPP applied events
        // from both engines (a PUB socket drops what it publishes before a subscriber has
        // connected) and peer entries.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let report = bench::loadgen::run(client.clone(), workload.build())
                .await
                .unwrap();
            assert_eq!(
                report.summary.ok, report.summary.sent,
                "every request served"
            );
            let mut state = Vec::new();
            for url in &multi.metrics_urls {
                let (_, text) = get(url).await.unwrap();
                state.push((
                    prom_sum(&text, "inference_objective_request_total"),
                    engines_heard(&text),
                    peer_applied(&text),
                ));
            }
            // Each EPP also made speculative entries from the others' messages.
            let (routing, watching) = state.split_at(2);
            assert_eq!(watching[0].0, 0.0, "the watching EPP routes nothing");
            if routing.iter().all(|(d, _, _)| *d > 0.0)
                && state
                    .iter()
                    .all(|(_, heard, peer)| *heard == 2 && *peer > 0.0)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "per EPP (decisions, engines heard, peer entries): {state:?}; logs in {}",
                dir.display()
            );
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
