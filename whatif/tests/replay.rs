//! Replays end to end: the real scheduler over simulated engines in virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bench::workload::{Kind, WorkloadArgs};
use endpoint_picker::config::REFERENCE_DEFAULT_CONFIG;
const DEFAULT: &str = REFERENCE_DEFAULT_CONFIG;
use endpoint_picker::config::profiles::{BALANCED_PREFIX, COST_MODEL};
use whatif::replay::{self, ReplayCfg};
use whatif::report::{self, Slo};
use whatif::trace;

fn cfg(name: &str, config: &str, replicas: usize) -> ReplayCfg {
    ReplayCfg {
        name: name.into(),
        config: config.into(),
        replicas,
        engine: sim::Config {
            seed: 1,
            ..sim::Config::default()
        },
        scrape_interval: Duration::from_millis(50),
        scrape_latency: Duration::ZERO,
        seed: 1,
        autoscale: None,
        scrape_path: whatif::replay::ScrapePath::Text,
        kv_events: Default::default(),
        step_threads: 2,
        lazy_steps: true,
        epps: 1,
        share_speculation: None,
    }
}

fn shared_prefix() -> Vec<trace::TraceRequest> {
    let args = WorkloadArgs {
        workload: Kind::SharedPrefix,
        groups: 4,
        system_tokens: 2000,
        question_tokens: 200,
        output_tokens: 16,
        ..WorkloadArgs::default()
    };
    trace::from_workload(&args, 8.0, 20.0).unwrap()
}

#[test]
fn a_replay_is_exact_and_repeatable() {
    let requests = shared_prefix();
    let a = replay::run(&cfg("default", REFERENCE_DEFAULT_CONFIG, 4), &requests).unwrap();
    let b = replay::run(&cfg("default", REFERENCE_DEFAULT_CONFIG, 4), &requests).unwrap();
    assert_eq!(a.outcomes.len(), requests.len());
    let key = |r: &replay::RunResult| {
        r.outcomes
            .iter()
            .map(|o| {
                (
                    o.replica,
                    o.ttft.map(f64::to_bits),
                    o.e2e.map(f64::to_bits),
                    o.cached_tokens,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&a), key(&b), "same trace, same seed: same result");
    assert!(
        a.outcomes.iter().all(|o| o.error.is_none()),
        "{:?}",
        a.outcomes.iter().find(|o| o.error.is_some())
    );
    // Every request ran through an engine: timings are set and ordered.
    for o in &a.outcomes {
        let (ttft, e2e) = (o.ttft.unwrap(), o.e2e.unwrap());
        assert!(ttft > 0.0 && e2e >= ttft, "{o:?}");
        assert_eq!(o.output_tokens, 16);
    }
    // The replay ran in virtual time: 20 s of arrivals, all answered shortly after.
    assert!(
        a.virtual_seconds >= 19.0 && a.virtual_seconds < 40.0,
        "{}",
        a.virtual_seconds
    );
    let s = report::summarise(
        &a,
        5.0,
        Slo {
            ttft: 1.0,
            tpot: None,
        },
    );
    assert!(
        s.hit_rate > 0.5,
        "4 shared system prompts are mostly cache hits: {}",
        s.hit_rate
    );
    assert_eq!(s.per_replica.iter().sum::<usize>(), s.requests);
}

#[test]
fn configs_compare_on_the_same_trace() {
    let requests = shared_prefix();
    let runs: Vec<_> = [
        ("default", REFERENCE_DEFAULT_CONFIG),
        ("cost-model", COST_MODEL),
    ]
    .into_iter()
    .map(|(n, c)| replay::run(&cfg(n, c, 4), &requests).unwrap())
    .collect();
    let slo = Slo {
        ttft: 1.0,
        tpot: None,
    };
    let summaries: Vec<_> = runs
        .iter()
        .map(|r| report::summarise(r, 0.0, slo))
        .collect();
    let table = report::markdown(&summaries, slo);
    assert!(
        table.contains("| `default` |") && table.contains("| `cost-model` |"),
        "{table}"
    );
    let svg = report::ttft_plot(&runs);
    assert!(svg.starts_with("<svg") && svg.contains("cost-model"));
}

#[test]
fn a_bad_config_is_refused_by_name() {
    let err = replay::run(&cfg("broken", "kind: Nonsense", 2), &shared_prefix()).unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
}

#[test]
fn requests_name_their_own_slo() {
    let text = r#"{"t": 0, "prompt": "hello there", "output_tokens": 4, "headers": [["x-llm-d-slo-ttft-ms", "0.001"]]}
{"t": 0.1, "prompt": "hello again", "output_tokens": 4}"#;
    let requests = trace::from_jsonl(text).unwrap();
    let run = replay::run(&cfg("default", REFERENCE_DEFAULT_CONFIG, 2), &requests).unwrap();
    assert_eq!(run.outcomes[0].slo_ttft, Some(0.000_001));
    let s = report::summarise(
        &run,
        0.0,
        Slo {
            ttft: 10.0,
            tpot: None,
        },
    );
    // The first asked for a 1 µs TTFT and missed it; the second met the report's 10 s.
    assert!(
        (s.slo_attainment - 0.5).abs() < 1e-9,
        "{}",
        s.slo_attainment
    );
}

/// Demand that doubles half-way: a policy on the EPP's in-flight count adds replicas after
/// their cold start and pays for them; the static pool pays for its size and nothing more.
#[test]
fn an_autoscaled_pool_grows_with_demand_and_pays_for_it() {
    use whatif::replay::{Autoscale, ScaleMetric};
    let args = WorkloadArgs {
        workload: Kind::Mixed,
        prompt_median: 1500.0,
        output_median: 200.0,
        ..WorkloadArgs::default()
    };
    let mut requests = trace::from_workload(&args, 6.0, 60.0).unwrap();
    let more = trace::from_workload(&WorkloadArgs { seed: 7, ..args }, 18.0, 60.0).unwrap();
    requests.extend(more.into_iter().map(|mut r| {
        r.at += 60.0;
        r
    }));
    let fixed = replay::run(&cfg("default", DEFAULT, 2), &requests).unwrap();
    assert_eq!(fixed.replicas, 2);
    assert!((fixed.replica_seconds - 2.0 * fixed.virtual_seconds).abs() < 1e-6);
    let mut scaled = cfg("default", DEFAULT, 2);
    scaled.autoscale = Some(Autoscale {
        metric: ScaleMetric::InFlight,
        target: 4.0,
        min: 1,
        max: 12,
        period: Duration::from_secs(5),
        cold_start: Duration::from_secs(20),
        scale_down_window: Duration::from_secs(30),
    });
    let run = replay::run(&scaled, &requests).unwrap();
    assert!(run.outcomes.iter().all(|o| o.error.is_none()));
    assert!(run.replicas > 2, "replicas were added: {:?}", run.timeline);
    // Nothing joins before its cold start: the first new replica enters the pool ≥ 20 s after
    // the first decision that asked for it.
    let asked = run
        .timeline
        .iter()
        .find(|(_, _, starting)| *starting > 0)
        .unwrap()
        .0;
    let joined = run
        .timeline
        .iter()
        .find(|(_, in_pool, _)| *in_pool > 2)
        .unwrap()
        .0;
    assert!(joined - asked >= 20.0 - 1e-9, "{:?}", run.timeline);
    let peak = run.timeline.iter().map(|(_, p, s)| p + s).max().unwrap();
    assert!(peak <= 12);
    let s_fixed = report::summarise(
        &fixed,
        0.0,
        Slo {
            ttft: 1.0,
            tpot: None,
        },
    );
    let s_scaled = report::summarise(
        &run,
        0.0,
        Slo {
            ttft: 1.0,
            tpot: None,
        },
    );
    assert!(
        s_scaled.ttft_ms.p90.unwrap() < s_fixed.ttft_ms.p90.unwrap(),
        "more replicas under the doubled load: {:?} vs {:?}",
        s_scaled.ttft_ms,
        s_fixed.ttft_ms
    );
    assert!(s_scaled.replica_seconds > s_fixed.replica_seconds);
}

/// The direct scrape path reads exactly what the EPP's mapping reads from the engine's text,
/// for engine states met in a replay (idle, busy, queueing, with adapters).
#[test]
fn the_direct_scrape_equals_the_text_scrape() {
    use endpoint_picker::scrape::engine::EngineMapping;
    use sim::metrics::MetricsSnapshot;
    let engine = sim::Config::default();
    let mapping = EngineMapping::vllm();
    let states = [
        MetricsSnapshot {
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            kv_used_blocks: 0,
            block_size: 16,
            num_gpu_blocks: 27_000,
            max_loras: 0,
            running_loras: vec![],
            waiting_loras: vec![],
            stats: Default::default(),
        },
        MetricsSnapshot {
            running: 37,
            waiting: 5,
            kv_usage: 0.4375,
            kv_used_blocks: 11_812,
            block_size: 16,
            num_gpu_blocks: 27_000,
            max_loras: 4,
            running_loras: vec!["lora-0".into(), "lora-3".into()],
            waiting_loras: vec!["lora-7".into()],
            stats: Default::default(),
        },
    ];
    for s in &states {
        let text = sim::metrics::render(engine.engine, &engine.model, s, 0.0);
        let via_text = mapping.extract(&text).metrics;
        let direct = whatif::replay::direct_metrics(&engine, s);
        assert_eq!(via_text, direct, "{text}");
    }
}

/// The precise scorer, fed by the engines' own KV events: with a short lag it places requests
/// as well as the EPP's approximate index (the hit rate is within 3 points); with a lag as long
/// as the replay its index is empty when it matters, and the hit rate falls.
#[test]
fn precise_routing_from_kv_events_matches_the_approximate_index_and_suffers_from_lag() {
    use endpoint_picker::config::profiles::BALANCED_PREFIX;
    use whatif::replay::KvEventFeed;
    // 16 system prompts over 4 replicas: routing that ignores prefixes pays a cold prefill
    // for most (prompt, replica) pairs; affinity pays one per prompt.
    let args = WorkloadArgs {
        workload: Kind::SharedPrefix,
        groups: 16,
        system_tokens: 2000,
        question_tokens: 200,
        output_tokens: 16,
        ..WorkloadArgs::default()
    };
    let requests = trace::from_workload(&args, 8.0, 20.0).unwrap();
    let slo = Slo {
        ttft: 1.0,
        tpot: None,
    };
    let hit = |name: &str, config: &str, lag_ms: u64, drop_rate: f64| {
        let mut c = cfg(name, config, 4);
        c.kv_events = KvEventFeed {
            lag: Duration::from_millis(lag_ms),
            drop_rate,
        };
        let run = replay::run(&c, &requests).unwrap();
        assert!(run.outcomes.iter().all(|o| o.error.is_none()), "{name}");
        (report::summarise(&run, 0.0, slo).hit_rate, run.kv_events)
    };
    let (approx, none) = hit("balanced", BALANCED_PREFIX, 5, 0.0);
    assert_eq!(none, Default::default(), "no precise scorer, no events");
    let (precise, counts) = hit("precise", whatif::PRECISE_PROFILE, 5, 0.0);
    assert!(counts.batches > 0 && counts.applied > 0, "{counts:?}");
    assert_eq!(
        (counts.lost, counts.unusable, counts.gaps),
        (0, 0, 0),
        "every event of every engine is usable: {counts:?}"
    );
    assert!(
        (precise - approx).abs() <= 0.03,
        "precise {precise:.3} vs approximate {approx:.3}"
    );
    let (late, _) = hit("precise", whatif::PRECISE_PROFILE, 30_000, 0.0);
    assert!(
        late < precise - 0.05,
        "a 30 s lag: {late:.3} vs {precise:.3} at 5 ms"
    );
    // Lost batches are gaps: the endpoint is cleared and scored from the approximate index.
    let (_, lossy) = hit("precise", whatif::PRECISE_PROFILE, 5, 0.2);
    assert!(lossy.lost > 0 && lossy.gaps > 0, "{lossy:?}");
    // Same seed, same losses.
    assert_eq!(hit("precise", whatif::PRECISE_PROFILE, 5, 0.2).1, lossy);
}

/// A replay's whole result, serialized, is the same run to run, whether the trace is handed
/// over as a slice or streamed (the requests are prepared on a second thread either way), with
/// the KV-event path and its seeded losses on.
#[test]
fn a_replay_is_byte_identical_run_to_run() {
    let requests = shared_prefix();
    let mut c = cfg("precise", whatif::PRECISE_PROFILE, 4);
    c.kv_events.drop_rate = 0.05;
    let a = serde_json::to_string(&replay::run(&c, &requests).unwrap()).unwrap();
    let b = serde_json::to_string(&replay::run_stream(&c, requests.into_iter()).unwrap()).unwrap();
    assert_eq!(a, b);
    assert!(
        a.contains("\"lost\":"),
        "the KV-event counts are part of the result"
    );
}

/// Three EPP replicas route one pool: Envoy's balancing gives each a share, every request is
/// served, the replay is as exact as with one, and one EPP replays as before the option (the
/// same result as a config run with the default). Out-of-range counts, or several EPPs with
/// autoscaling, are refused.
#[test]
fn several_epps_route_one_pool_exactly() {
    let requests = shared_prefix();
    let mut c = cfg("precise", whatif::PRECISE_PROFILE, 4);
    c.epps = 3;
    let a = replay::run(&c, &requests).unwrap();
    let b = replay::run(&c, &requests).unwrap();
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    assert!(
        a.outcomes
            .iter()
            .all(|o| o.error.is_none() && o.ttft.is_some())
    );
    let mut per_epp = [0usize; 3];
    for o in &a.outcomes {
        per_epp[o.epp] += 1;
    }
    let n = requests.len();
    assert!(per_epp.iter().all(|&k| k * 5 > n), "{per_epp:?} of {n}");
    // The EPPs all heard the engines: the shared prompts are mostly hits.
    let s = report::summarise(
        &a,
        5.0,
        Slo {
            ttft: 1.0,
            tpot: None,
        },
    );
    assert!(s.hit_rate > 0.5, "{}", s.hit_rate);
    let one = replay::run(&cfg("precise", whatif::PRECISE_PROFILE, 4), &requests).unwrap();
    assert!(one.outcomes.iter().all(|o| o.epp == 0));
    for bad in [0, replay::MAX_EPPS + 1] {
        c.epps = bad;
        assert!(replay::run(&c, &requests).is_err(), "{bad} EPPs");
    }
    c.epps = 2;
    c.autoscale = Some(replay::Autoscale {
        metric: replay::ScaleMetric::InFlight,
        target: 4.0,
        min: 1,
        max: 4,
        cold_start: Duration::from_secs(10),
        period: Duration::from_secs(5),
        scale_down_window: Duration::from_secs(30),
    });
    assert!(
        replay::run(&c, &requests).is_err(),
        "several EPPs, autoscaled"
    );
}

#[test]
fn stepping_engines_on_two_threads_gives_the_same_replay() {
    // Enough replicas under enough load that several engines end a step at the same instant
    // (those are stepped on both threads).
    let args = WorkloadArgs {
        workload: Kind::SharedPrefix,
        groups: 16,
        system_tokens: 1000,
        question_tokens: 200,
        output_tokens: 64,
        ..WorkloadArgs::default()
    };
    let requests = trace::from_workload(&args, 60.0, 6.0).unwrap();
    let mut one = cfg("balanced", BALANCED_PREFIX, 48);
    one.step_threads = 1;
    let mut two = one.clone();
    two.step_threads = 2;
    let a = serde_json::to_string(&replay::run(&one, &requests).unwrap()).unwrap();
    let b = serde_json::to_string(&replay::run(&two, &requests).unwrap()).unwrap();
    assert_eq!(a, b);
}

/// Completing the engines' steps late, when a request, a scrape or a request's first or last
/// token needs them, gives the replay that completing each at its end gives: with jitter
/// (steps of varying length) and chunked prefills, on one thread and two.
#[test]
fn completing_steps_late_gives_the_same_replay_as_at_their_ends() {
    let args = WorkloadArgs {
        workload: Kind::SharedPrefix,
        groups: 8,
        system_tokens: 3000,
        question_tokens: 200,
        output_tokens: 48,
        ..WorkloadArgs::default()
    };
    let requests = trace::from_workload(&args, 40.0, 6.0).unwrap();
    let mut eager = cfg("balanced", BALANCED_PREFIX, 12);
    eager.engine.latency.jitter = 0.2;
    eager.engine.max_num_batched_tokens = 1024;
    eager.step_threads = 1;
    eager.lazy_steps = false;
    let mut lazy = eager.clone();
    lazy.lazy_steps = true;
    let mut lazy_two = lazy.clone();
    lazy_two.step_threads = 2;
    let a = serde_json::to_string(&replay::run(&eager, &requests).unwrap()).unwrap();
    let b = serde_json::to_string(&replay::run(&lazy, &requests).unwrap()).unwrap();
    let c = serde_json::to_string(&replay::run(&lazy_two, &requests).unwrap()).unwrap();
    assert_eq!(a, b);
    assert_eq!(b, c);
}
