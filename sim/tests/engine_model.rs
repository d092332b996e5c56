//! Tests of the engine model on paused tokio time: every latency below is exact, because the
//! engine runs on a logical clock and tokio's clock only advances when everything is idle.

// Helpers outside `#[test]` functions may panic too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::scrape::prometheus::parse;
use sim::engine::SubmitRequest;
use sim::{Config, Engine, StepWork};
use support::{collect, req, tokens};
use tokio::time::Instant;

fn lora_req(prompt: Vec<u32>, max_tokens: usize, lora: &str) -> SubmitRequest {
    SubmitRequest {
        lora: Some(lora.to_owned()),
        ..req(prompt, max_tokens)
    }
}

/// The work of one step: prefill chunks `(computed, new)` and decodes (their context lengths).
fn work(prefills: &[(usize, usize)], decodes: &[usize], lora_loads: usize) -> StepWork {
    let mut w = StepWork {
        lora_loads,
        ..StepWork::default()
    };
    for &(computed, new) in prefills {
        w.add_prefill(computed, new);
    }
    for &context in decodes {
        w.add_decode(context);
    }
    w
}

fn engine(config: Config) -> Engine {
    Engine::spawn(Arc::new(config), 0).unwrap()
}

#[tokio::test(start_paused = true)]
async fn second_identical_prompt_hits_the_prefix_cache_and_ttft_drops_by_the_model() {
    let config = Config::default();
    let m = config.latency.clone();
    let e = engine(config);
    let prompt = tokens(0, 1001);

    let (_, first) = collect(e.submit(req(prompt.clone(), 1)).unwrap()).await;
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(
        first.timing.ttft(),
        m.step_time(&work(&[(0, 1001)], &[], 0))
    );

    let (_, second) = collect(e.submit(req(prompt, 1)).unwrap()).await;
    // Whole blocks only, and at least one token is recomputed: 62 blocks × 16 = 992 tokens.
    assert_eq!(second.cached_tokens, 992);
    assert_eq!(
        second.timing.ttft(),
        m.step_time(&work(&[(992, 9)], &[], 0))
    );
    // The drop: 992 fewer prompt tokens, and their attention pairs (501 501 → 8 973).
    let saved_pairs = sim::config::attention_pairs(0, 1001) - sim::config::attention_pairs(992, 9);
    assert_eq!(saved_pairs, 492_528);
    assert_eq!(
        first.timing.ttft() - second.timing.ttft(),
        m.prefill_per_token * 992
            + Duration::from_nanos(saved_pairs * m.attention_per_pair_ps / 1000)
    );

    let s = e.snapshot();
    assert_eq!(s.stats.prefix_queries, 2002);
    assert_eq!(s.stats.prefix_hits, 992);
}

#[tokio::test(start_paused = true)]
async fn long_prompts_are_prefilled_in_chunks_of_the_token_budget() {
    let config = Config::default();
    let m = config.latency.clone();
    let e = engine(config);
    let (times, c) = collect(e.submit(req(tokens(0, 10_000), 3)).unwrap()).await;
    let prefill =
        m.step_time(&work(&[(0, 8192)], &[], 0)) + m.step_time(&work(&[(8192, 1808)], &[], 0));
    assert_eq!(c.timing.ttft(), prefill);
    // Then one decode step per token, attending over the growing context.
    assert_eq!(times[1] - times[0], m.step_time(&work(&[], &[10_001], 0)));
    assert_eq!(times[2] - times[1], m.step_time(&work(&[], &[10_002], 0)));
}

#[tokio::test(start_paused = true)]
async fn a_full_cache_evicts_the_least_recently_used_free_blocks() {
    // 8 blocks of 4 tokens; every request below needs 2 blocks and finishes after prefill.
    let e = engine(Config {
        num_gpu_blocks: 8,
        block_size: 4,
        ..Config::default()
    });
    let a = tokens(0, 8);
    let b = tokens(100, 8);
    let c = tokens(200, 8);
    let d = tokens(300, 8);
    let fresh = tokens(400, 8);
    let cached = |p: &Vec<u32>| {
        let rx = e.submit(req(p.clone(), 1)).unwrap();
        async move { collect(rx).await.1.cached_tokens }
    };
    for p in [&a, &b, &c, &d] {
        assert_eq!(cached(p).await, 0);
    }
    assert_eq!(
        e.snapshot().kv_used_blocks,
        0,
        "finished requests leave their blocks cached but free"
    );
    // Re-using `a` makes it the most recently used; one block of it hits (the last token of a
    // prompt is always recomputed).
    assert_eq!(cached(&a).await, 4);
    // A fresh prompt needs two blocks: the two least recently freed ones are `b`'s.
    assert_eq!(cached(&fresh).await, 0);
    assert_eq!(cached(&d).await, 4, "d survived");
    assert_eq!(cached(&a).await, 4, "a survived");
    assert_eq!(cached(&b).await, 0, "b was evicted first");
}

#[tokio::test(start_paused = true)]
async fn running_never_exceeds_max_num_seqs() {
    let e = engine(Config {
        max_num_seqs: 4,
        ..Config::default()
    });
    let tasks: Vec<_> = (0..20)
        .map(|i| tokio::spawn(collect(e.submit(req(tokens(i * 1000, 100), 20)).unwrap())))
        .collect();
    let mut max_running = 0;
    let mut saw_waiting = false;
    while tasks.iter().any(|t| !t.is_finished()) {
        let s = e.snapshot();
        assert!(s.running <= 4, "running {}", s.running);
        max_running = max_running.max(s.running);
        saw_waiting |= s.waiting > 0;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(max_running, 4);
    assert!(saw_waiting);
    for t in tasks {
        assert_eq!(t.await.unwrap().1.completion_tokens, 20);
    }
}

/// Mean queue time of `n` requests arriving every `interval`.
async fn mean_queue_time(interval: Duration, n: u32) -> (Duration, Duration, Duration) {
    let e = engine(Config {
        max_num_seqs: 16,
        ..Config::default()
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i).await;
        tasks.push(tokio::spawn(collect(
            e.submit(req(tokens(i * 1000, 256), 64)).unwrap(),
        )));
    }
    let mut queue = Vec::new();
    for t in tasks {
        queue.push(t.await.unwrap().1.timing.queue_time());
    }
    let mean = queue.iter().sum::<Duration>() / n;
    let half = n as usize / 2;
    let first_half = queue[..half].iter().sum::<Duration>() / half as u32;
    let second_half = queue[half..].iter().sum::<Duration>() / (n - half as u32);
    (mean, first_half, second_half)
}

#[tokio::test(start_paused = true)]
async fn queue_time_grows_as_load_passes_capacity() {
    // 16 slots × (256 in, 64 out) serve roughly 35 requests/s with this profile.
    let (light, ..) = mean_queue_time(Duration::from_millis(200), 60).await;
    let (medium, ..) = mean_queue_time(Duration::from_millis(40), 60).await;
    let (heavy, early, late) = mean_queue_time(Duration::from_millis(15), 60).await;
    assert!(light < Duration::from_millis(15), "light {light:?}");
    assert!(medium >= light, "light {light:?} medium {medium:?}");
    assert!(heavy > medium * 10, "medium {medium:?} heavy {heavy:?}");
    assert!(heavy > Duration::from_millis(200), "heavy {heavy:?}");
    // Over capacity the queue keeps growing.
    assert!(late > early * 2, "early {early:?} late {late:?}");
}

#[tokio::test(start_paused = true)]
async fn lora_slots_are_respected_and_loading_costs_time() {
    let config = Config {
        max_loras: 1,
        lora_modules: vec!["a".into(), "b".into()],
        ..Config::default()
    };
    let m = config.latency.clone();
    let e = engine(config);
    assert_eq!(e.resident_loras(), ["a"], "preloaded into the single slot");
    let ra = e.submit(lora_req(tokens(0, 100), 30, "a")).unwrap();
    let rb = e.submit(lora_req(tokens(500, 100), 5, "b")).unwrap();
    let rbase = e.submit(req(tokens(900, 100), 5)).unwrap();
    let ta = tokio::spawn(collect(ra));
    let tb = tokio::spawn(collect(rb));
    let tbase = tokio::spawn(collect(rbase));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let s = e.snapshot();
    assert_eq!(s.running_loras, ["a"]);
    assert_eq!(s.waiting_loras, ["b"], "b waits for the slot a occupies");
    assert_eq!(s.running, 2, "the base-model request is not held back by b");

    let (_, a) = ta.await.unwrap();
    let (_, b) = tb.await.unwrap();
    tbase.await.unwrap();
    assert_eq!(
        a.timing.ttft(),
        m.step_time(&work(&[(0, 100), (0, 100)], &[], 0)),
        "a was resident: no load"
    );
    assert!(
        b.timing.scheduled >= a.timing.finished,
        "b ran only after a left the slot"
    );
    assert_eq!(
        b.timing.first_token - b.timing.scheduled,
        m.step_time(&work(&[(0, 100)], &[], 1))
    );
    assert_eq!(e.resident_loras(), ["b"]);
}

#[tokio::test(start_paused = true)]
async fn an_adapter_out_of_the_cpu_cache_is_read_from_disk_again() {
    // One slot, a CPU cache of two: a, b, c registered in that order; a holds the slot, so b
    // is the one that fell out of the cache.
    let config = Config {
        max_loras: 1,
        max_cpu_loras: 2,
        lora_modules: vec!["a".into(), "b".into(), "c".into()],
        ..Config::default()
    };
    let m = config.latency.clone();
    let e = engine(config);
    let run = |lora: &'static str, start: u32| {
        let rx = e.submit(lora_req(tokens(start, 100), 1, lora)).unwrap();
        async move { collect(rx).await.1 }
    };
    let a = run("a", 0).await;
    assert_eq!(a.timing.ttft(), m.step_time(&work(&[(0, 100)], &[], 0)));
    // c is in the cache: a slot swap only.
    let c = run("c", 1000).await;
    assert_eq!(
        c.timing.first_token - c.timing.scheduled,
        m.step_time(&work(&[(0, 100)], &[], 1))
    );
    // b is not: a swap and a read from disk.
    let b = run("b", 2000).await;
    let mut disk = work(&[(0, 100)], &[], 1);
    disk.lora_disk_loads = 1;
    assert_eq!(
        b.timing.first_token - b.timing.scheduled,
        m.step_time(&disk)
    );
    assert_eq!(
        m.step_time(&disk),
        m.step_time(&work(&[(0, 100)], &[], 1)) + m.lora_disk_load
    );
}

#[tokio::test(start_paused = true)]
async fn two_slots_run_two_adapters_together() {
    let config = Config {
        max_loras: 2,
        lora_modules: vec!["a".into()],
        ..Config::default()
    };
    let e = engine(config);
    e.load_lora("b").unwrap();
    let ta = tokio::spawn(collect(
        e.submit(lora_req(tokens(0, 100), 30, "a")).unwrap(),
    ));
    let tb = tokio::spawn(collect(
        e.submit(lora_req(tokens(500, 100), 30, "b")).unwrap(),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(e.snapshot().running_loras, ["a", "b"]);
    let (a, b) = (ta.await.unwrap().1, tb.await.unwrap().1);
    assert_eq!(a.timing.scheduled, b.timing.scheduled);
}

#[tokio::test(start_paused = true)]
async fn requests_wait_and_preempt_when_kv_blocks_run_out() {
    // 40 blocks of 16 tokens = 640 tokens; each request grows to 200 + 150 = 350 tokens.
    let e = engine(Config {
        num_gpu_blocks: 40,
        ..Config::default()
    });
    let tasks: Vec<_> = (0..4)
        .map(|i| tokio::spawn(collect(e.submit(req(tokens(i * 1000, 200), 150)).unwrap())))
        .collect();
    let mut max_used = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let s = e.snapshot();
        max_used = max_used.max(s.kv_used_blocks);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(max_used <= 40);
    for t in tasks {
        assert_eq!(t.await.unwrap().1.completion_tokens, 150);
    }
    assert!(
        e.snapshot().stats.preemptions > 0,
        "the decode phase had to preempt"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_receiver_aborts_the_request_and_frees_its_blocks() {
    let e = engine(Config::default());
    let rx = e.submit(req(tokens(0, 100), 1000)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.snapshot().running, 1);
    drop(rx);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = e.snapshot();
    assert_eq!((s.running, s.waiting, s.kv_used_blocks), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn metrics_report_exactly_the_engine_state() {
    let config = Config {
        max_num_seqs: 2,
        max_loras: 1,
        lora_modules: vec!["ad".into()],
        ..Config::default()
    };
    let e = engine(config.clone());
    let done = collect(e.submit(req(tokens(0, 64), 2)).unwrap()).await;
    assert_eq!(done.1.completion_tokens, 2);
    let _busy: Vec<_> = (0..4)
        .map(|i| {
            e.submit(lora_req(tokens(1000 + i * 100, 64), 500, "ad"))
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;

    let s = e.snapshot();
    assert_eq!((s.running, s.waiting), (2, 2));
    let text = sim::metrics::render(config.engine, &config.model, &s, 1234.0);
    let samples = parse(&text).unwrap();
    let value = |name: &str| {
        samples
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .value
    };
    assert_eq!(value("vllm:num_requests_running"), 2.0);
    assert_eq!(value("vllm:num_requests_waiting"), 2.0);
    assert_eq!(value("vllm:kv_cache_usage_perc"), s.kv_usage);
    assert_eq!(
        s.kv_used_blocks,
        2 * 5,
        "two running requests of 64 + a few tokens hold 5 blocks each"
    );
    assert_eq!(
        value("vllm:prefix_cache_queries_total"),
        s.stats.prefix_queries as f64
    );
    assert_eq!(
        value("vllm:prefix_cache_hits_total"),
        s.stats.prefix_hits as f64
    );
    assert_eq!(value("vllm:prompt_tokens_total"), (64 + 2 * 64) as f64);
    assert_eq!(
        value("vllm:generation_tokens_total"),
        s.stats.generation_tokens as f64
    );
    assert_eq!(value("vllm:time_to_first_token_seconds_count"), 3.0);
    assert_eq!(value("vllm:e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(value("vllm:request_queue_time_seconds_count"), 1.0);

    let info = samples
        .iter()
        .find(|x| x.name == "vllm:cache_config_info")
        .unwrap();
    assert_eq!(info.label("block_size").as_deref(), Some("16"));
    assert_eq!(info.label("num_gpu_blocks").as_deref(), Some("27000"));
    let lora = samples
        .iter()
        .find(|x| x.name == "vllm:lora_requests_info")
        .unwrap();
    assert_eq!(lora.label("max_lora").as_deref(), Some("1"));
    assert_eq!(lora.label("running_lora_adapters").as_deref(), Some("ad"));
    assert_eq!(lora.label("waiting_lora_adapters").as_deref(), Some("ad"));
    assert_eq!(lora.value, 1234.0);
    let success = samples
        .iter()
        .find(|x| {
            x.name == "vllm:request_success_total"
                && x.label("finished_reason").as_deref() == Some("length")
        })
        .unwrap();
    assert_eq!(success.value, 1.0);
    for x in &samples {
        if x.name.starts_with("vllm:")
            && x.name != "vllm:cache_config_info"
            && x.name != "vllm:lora_requests_info"
        {
            assert_eq!(
                x.label("model_name").as_deref(),
                Some(config.model.as_str()),
                "{}",
                x.name
            );
        }
    }

    let sg = sim::metrics::render(sim::EngineKind::Sglang, &config.model, &s, 0.0);
    let sg = parse(&sg).unwrap();
    let sgv = |name: &str| sg.iter().find(|x| x.name == name).unwrap().value;
    assert_eq!(sgv("sglang:num_running_reqs"), 2.0);
    assert_eq!(sgv("sglang:num_queue_reqs"), 2.0);
    assert_eq!(sgv("sglang:token_usage"), s.kv_usage);
}

#[tokio::test(start_paused = true)]
async fn jitter_is_seeded_and_bounded() {
    let run = |seed| async move {
        let mut config = Config {
            seed,
            ..Config::default()
        };
        config.latency.jitter = 0.1;
        let e = engine(config);
        collect(e.submit(req(tokens(0, 500), 20)).unwrap()).await.0
    };
    let a = run(7).await;
    let b = run(7).await;
    let c = run(8).await;
    let gaps = |t: &[Instant]| t.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
    assert_eq!(gaps(&a), gaps(&b), "same seed, same timings");
    assert_ne!(gaps(&a), gaps(&c));
    let nominal = Config::default().latency.step_time(&work(&[], &[510], 0));
    for g in gaps(&a) {
        assert!(
            g >= nominal.mul_f64(0.89) && g <= nominal.mul_f64(1.11),
            "{g:?}"
        );
    }
}

/// A seeded random workload on a tight engine (small cache, small budget, two LoRA slots, client
/// aborts): every invariant holds at every sampled instant, nothing deadlocks, every surviving
/// request gets exactly its tokens, and everything is released at the end.
#[tokio::test(start_paused = true)]
async fn random_workloads_keep_the_invariants() {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    let config = Config {
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        num_gpu_blocks: 64,
        max_loras: 2,
        lora_modules: vec!["a".into(), "b".into(), "c".into()],
        ..Config::default()
    };
    let e = engine(config);
    let mut rng = SmallRng::seed_from_u64(7);
    let prefixes: Vec<Vec<u32>> = (0..5)
        .map(|p| tokens(p * 10_000, rng.random_range(0..200)))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        let mut prompt = prefixes[rng.random_range(0..prefixes.len())].clone();
        prompt.extend(tokens(100_000 + i * 1000, rng.random_range(1..200)));
        let max_tokens = rng.random_range(1..100);
        let lora = [None, Some("a"), Some("b"), Some("c")][rng.random_range(0..4)];
        let req = SubmitRequest {
            lora: lora.map(str::to_owned),
            ..req(prompt, max_tokens)
        };
        let rx = e.submit(req).unwrap();
        let cancel_after = rng
            .random_bool(0.1)
            .then(|| Duration::from_millis(rng.random_range(0..300)));
        tasks.push(tokio::spawn(async move {
            match cancel_after {
                Some(after) => {
                    tokio::time::sleep(after).await;
                    drop(rx);
                    None
                }
                None => Some((max_tokens, collect(rx).await.1)),
            }
        }));
        let s = e.snapshot();
        assert!(s.running <= 8);
        assert!(s.kv_used_blocks <= 64);
        assert!(s.running_loras.len() <= 2, "{:?}", s.running_loras);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while tasks.iter().any(|t| !t.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "the engine stalled: {:?}",
            e.snapshot()
        );
        let s = e.snapshot();
        assert!(s.running <= 8);
        assert!(s.kv_used_blocks <= 64);
        assert!(s.running_loras.len() <= 2, "{:?}", s.running_loras);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut finished = 0;
    for t in tasks {
        if let Some((max_tokens, c)) = t.await.unwrap() {
            assert_eq!(c.completion_tokens, max_tokens);
            finished += 1;
        }
    }
    assert!(finished > 150);
    // Aborted requests are dropped at the next step; give the engine one more step.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = e.snapshot();
    assert_eq!((s.running, s.waiting, s.kv_used_blocks), (0, 0, 0));
    assert!(s.stats.prefix_hits > 0, "shared prefixes hit the cache");
    assert!(
        s.stats.preemptions > 0,
        "the tight cache forced preemptions"
    );
    assert_eq!(s.stats.success_length, finished);
}

#[tokio::test(start_paused = true)]
async fn kv_events_report_stored_and_evicted_blocks() {
    use sim::kv_cache::{KvEvent, block_hashes, chain_root};

    let e = engine(Config {
        num_gpu_blocks: 4,
        ..Config::default()
    });
    let mut events = e.subscribe_kv_events();
    let a = tokens(0, 40);
    collect(e.submit(req(a.clone(), 1)).unwrap()).await;
    let hashes = block_hashes(chain_root(None), &a, 16);
    for (i, &hash) in hashes.iter().enumerate() {
        let want = KvEvent::BlockStored {
            hash,
            parent: i.checked_sub(1).map(|p| hashes[p]),
            token_ids: a[i * 16..(i + 1) * 16].to_vec(),
            lora: None,
        };
        assert_eq!(events.try_recv().unwrap(), want);
    }
    assert!(
        events.try_recv().is_err(),
        "the partial third block is not cached"
    );

    // 48 new tokens need 3 of the 4 blocks: the partial block and the never-used one go first,
    // then the least recently freed cached block — a's second block (freed before its first).
    collect(e.submit(req(tokens(1000, 48), 1)).unwrap()).await;
    assert_eq!(
        events.try_recv().unwrap(),
        KvEvent::BlockRemoved { hash: hashes[1] }
    );
    assert!(matches!(
        events.try_recv().unwrap(),
        KvEvent::BlockStored { parent: None, .. }
    ));
}
