//! The KV tiers below the GPU cache (`sim::tiers`) on paused tokio time: a prefix evicted from
//! the GPU comes back from the CPU tier at its load cost, the shared store serves a replica that
//! never saw the prefix, a peer named by the request is pulled from, hostile peer names are
//! ignored and counted, the events carry their medium, and with every tier off the engine is
//! what it was.

// Helpers outside `#[test]` functions may panic too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kv_events::{Encoder, Encoding, Event, EventBatch, Medium, decode_batch};
use sim::kv_cache::{KvEvent, block_hashes, chain_root};
use sim::tiers::{PeerIgnored, TierPool};
use sim::{Config, Engine, KvTiers, StepWork, Tier};
use support::{collect, req, tokens};
use tokio::sync::broadcast;

/// The step of one lone prefill chunk `(computed, new)` after loading `load`.
fn prefill_step(config: &Config, computed: usize, new: usize, load: Duration) -> Duration {
    let mut w = StepWork {
        kv_load: load,
        ..StepWork::default()
    };
    w.add_prefill(computed, new);
    config.latency.step_time(&w)
}

/// 8 GPU blocks of 16 tokens: a 113-token prompt evicts everything else.
fn small_gpu(tiers: KvTiers) -> Config {
    Config {
        num_gpu_blocks: 8,
        kv_tiers: tiers,
        ..Config::default()
    }
}

fn cpu_tier(blocks: usize) -> KvTiers {
    KvTiers {
        cpu_blocks: blocks,
        ..KvTiers::default()
    }
}

fn no_tiers() -> KvTiers {
    KvTiers {
        p2p_load_gbps: 0.0,
        ..KvTiers::default()
    }
}

fn tier_stats(e: &Engine) -> sim::metrics::TierStats {
    e.snapshot().stats.tiers.expect("tier counters")
}

#[test]
fn the_load_formula_is_the_contracts() {
    let t = KvTiers::default();
    // 131,072 B per token at 25 GB/s ≈ 5.24 µs; at 10 GB/s ≈ 13.1 µs.
    assert_eq!(t.load_time(Tier::Cpu, 1), Duration::from_nanos(5_243));
    assert_eq!(t.load_time(Tier::Remote, 1), Duration::from_nanos(13_107));
    assert_eq!(
        t.load_time(Tier::Peer, 1000),
        Duration::from_nanos(13_107_200)
    );
    assert_eq!(t.load_time(Tier::Gpu, 1000), Duration::ZERO);
    assert!(t.connector(), "peer pulls are on by default");
    assert!(!no_tiers().connector());
    let bad = Config {
        kv_tiers: KvTiers {
            cpu_blocks: 10,
            cpu_load_gbps: 0.0,
            ..KvTiers::default()
        },
        ..Config::default()
    };
    assert!(bad.validate().is_err());
    let nan = Config {
        kv_tiers: KvTiers {
            p2p_load_gbps: f64::NAN,
            ..KvTiers::default()
        },
        ..Config::default()
    };
    assert!(nan.validate().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_prefix_evicted_from_the_gpu_is_loaded_from_the_cpu_tier_not_recomputed() {
    let config = small_gpu(cpu_tier(64));
    let e = Engine::spawn(Arc::new(config.clone()), 0).unwrap();
    let a = tokens(0, 65); // 4 full blocks + 1 token
    let (_, first) = collect(e.submit(req(a.clone(), 1)).unwrap()).await;
    assert_eq!(
        first.timing.ttft(),
        prefill_step(&config, 0, 65, Duration::ZERO)
    );
    // 113 other tokens take all 8 GPU blocks: a's blocks leave the GPU (not the CPU tier).
    collect(e.submit(req(tokens(1000, 113), 1)).unwrap()).await;

    let mut events = e.subscribe_kv_events();
    let (_, again) = collect(e.submit(req(a.clone(), 1)).unwrap()).await;
    // The loaded blocks are GPU blocks again, announced with their tokens as vLLM does after a
    // load; the CPU tier already had them (nothing new there).
    let decoded = drain_decoded(&mut events);
    let ha = block_hashes(chain_root(None), &a, 16);
    assert_eq!(stored(&decoded, Medium::Gpu), [(ha, 64)]);
    assert!(stored(&decoded, Medium::Cpu).is_empty());
    let load = config.kv_tiers.load_time(Tier::Cpu, 64);
    assert_eq!(load, Duration::from_nanos(335_544));
    assert_eq!(
        again.cached_tokens, 64,
        "loaded tokens count as cached, as vLLM's"
    );
    assert_eq!(again.timing.ttft(), prefill_step(&config, 64, 1, load));
    assert!(again.timing.ttft() < first.timing.ttft());

    assert_eq!(e.cpu_tier_len(), 4 + 7);
    assert_eq!(e.shared_store_len(), 0);
    let t = tier_stats(&e);
    assert_eq!(t.hit_tokens, [0, 64, 0, 0]);
    assert_eq!(t.load_seconds[Tier::Cpu.index()], load.as_secs_f64());
    assert_eq!(t.external_hits(), 64);
    assert_eq!(t.external_queries, 65 + 113 + 65);
    assert_eq!(
        e.snapshot().stats.prefix_hits,
        0,
        "vllm:prefix_cache_hits is GPU only"
    );

    // Without the CPU tier the same sequence recomputes.
    let plain = Engine::spawn(Arc::new(small_gpu(no_tiers())), 0).unwrap();
    collect(plain.submit(req(tokens(0, 65), 1)).unwrap()).await;
    collect(plain.submit(req(tokens(1000, 113), 1)).unwrap()).await;
    let (_, recomputed) = collect(plain.submit(req(tokens(0, 65), 1)).unwrap()).await;
    assert_eq!(recomputed.cached_tokens, 0);
    assert_eq!(recomputed.timing.ttft(), first.timing.ttft());
}

#[tokio::test(start_paused = true)]
async fn the_cpu_tier_is_lru_and_bounded() {
    // A CPU tier of 4 blocks: b's 7 blocks push a's 4 out.
    let config = small_gpu(cpu_tier(4));
    let e = Engine::spawn(Arc::new(config.clone()), 0).unwrap();
    collect(e.submit(req(tokens(0, 65), 1)).unwrap()).await;
    collect(e.submit(req(tokens(1000, 113), 1)).unwrap()).await;
    let (_, again) = collect(e.submit(req(tokens(0, 65), 1)).unwrap()).await;
    assert_eq!(again.cached_tokens, 0);
    assert_eq!(tier_stats(&e).hit_tokens, [0, 0, 0, 0]);
}

/// vLLM's offloading connector touches every block of a request in the CPU tier when it looks
/// the request up, GPU hits included. Without that, a prefix served from the GPU aged out of the
/// CPU tier while it was hot, and was gone from both once the GPU evicted it.
#[tokio::test(start_paused = true)]
async fn a_gpu_hit_keeps_its_prefix_fresh_in_the_cpu_tier() {
    // GPU of 32 blocks (nothing leaves it here), CPU tier of 8.
    let config = Config {
        num_gpu_blocks: 32,
        kv_tiers: cpu_tier(8),
        ..Config::default()
    };
    let e = Engine::spawn(Arc::new(config), 0).unwrap();
    let a = tokens(0, 65); // 4 full blocks
    collect(e.submit(req(a.clone(), 1)).unwrap()).await;
    collect(e.submit(req(tokens(1000, 49), 1)).unwrap()).await; // 3 blocks: 7 in the tier
    // `a` again, all from the GPU: its CPU copies are refreshed, first block the newest.
    let (_, hot) = collect(e.submit(req(a.clone(), 1)).unwrap()).await;
    assert_eq!(hot.cached_tokens, 64);
    let mut events = e.subscribe_kv_events();
    // 3 more blocks: 10 for 8 places; the two least recently used go, which are b's.
    collect(e.submit(req(tokens(2000, 49), 1)).unwrap()).await;
    let gone = removed(&drain_decoded(&mut events), Medium::Cpu);
    let hb = block_hashes(chain_root(None), &tokens(1000, 49), 16);
    assert_eq!(gone, hb[..2], "b's oldest blocks, not a's");
    assert_eq!(e.cpu_tier_len(), 8);
}

#[tokio::test(start_paused = true)]
async fn the_shared_store_serves_a_replica_that_never_saw_the_prefix() {
    let config = Config {
        kv_tiers: KvTiers {
            shared_blocks: 100,
            ..no_tiers()
        },
        ..Config::default()
    };
    let pool = TierPool::for_config(&config);
    let config = Arc::new(config);
    let a = Engine::spawn_in(config.clone(), 0, pool.clone()).unwrap();
    let b = Engine::spawn_in(config.clone(), 1, pool.clone()).unwrap();
    let prompt = tokens(0, 100); // 6 full blocks
    collect(a.submit(req(prompt.clone(), 1)).unwrap()).await;
    assert_eq!(pool.shared_len(), 6);

    let (_, on_b) = collect(b.submit(req(prompt, 1)).unwrap()).await;
    let load = config.kv_tiers.load_time(Tier::Remote, 96);
    assert_eq!(on_b.cached_tokens, 96);
    assert_eq!(on_b.timing.ttft(), prefill_step(&config, 96, 4, load));
    assert_eq!(tier_stats(&b).hit_tokens, [0, 0, 96, 0]);
    // A replica with its own pool shares nothing.
    let alone = Engine::spawn(config.clone(), 2).unwrap();
    let (_, cold) = collect(alone.submit(req(tokens(0, 100), 1)).unwrap()).await;
    assert_eq!(cold.cached_tokens, 0);
}

/// `sim --ip-per-replica` (the bench's precise runs) puts every replica in one pool, as
/// `--replicas` does: one store, peers of each other. (Each had a pool of its own, so the "shared"
/// store was private and no peer could be named; the EPP, told the store is shared, routed to
/// replicas that then recomputed.)
#[tokio::test]
async fn replicas_on_their_own_addresses_share_one_store() {
    let config = Config {
        kv_tiers: KvTiers {
            shared_blocks: 100,
            ..no_tiers()
        },
        ..Config::default()
    };
    let ips = ["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    let replicas = sim::spawn_replicas_on_ips(&config, &ips, 0).await.unwrap();
    let (a, b) = (replicas[0].engine(), replicas[1].engine());
    collect(a.submit(req(tokens(0, 100), 1)).unwrap()).await;
    assert_eq!(a.shared_store_len(), 6);
    assert_eq!(
        b.shared_store_len(),
        6,
        "the store is the pool's, not the replica's"
    );
    let (_, on_b) = collect(b.submit(req(tokens(0, 100), 1)).unwrap()).await;
    assert_eq!(on_b.cached_tokens, 96);
    assert_eq!(tier_stats(b).hit_tokens, [0, 0, 96, 0]);
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

#[tokio::test(start_paused = true)]
async fn a_request_naming_a_peer_pulls_the_blocks_the_peer_holds() {
    let config = Arc::new(Config::default()); // peer pulls on (10 GB/s), no other tier
    let pool = TierPool::for_config(&config);
    let a = Engine::spawn_in(config.clone(), 0, pool.clone()).unwrap();
    let b = Engine::spawn_in(config.clone(), 1, pool.clone()).unwrap();
    pool.register(addr(8000), &a);
    pool.register(addr(8001), &b);
    let prompt = tokens(0, 200); // 12 full blocks
    collect(a.submit(req(prompt[..150].to_vec(), 1)).unwrap()).await; // a holds 9 blocks

    // b holds the first 2 blocks itself; the peer gives the next 7.
    collect(b.submit(req(prompt[..40].to_vec(), 1)).unwrap()).await;
    let rx = b
        .submit_with_peer(req(prompt.clone(), 1), Some(Ok(addr(8000))))
        .unwrap();
    let (_, pulled) = collect(rx).await;
    let load = config.kv_tiers.load_time(Tier::Peer, 7 * 16);
    assert_eq!(pulled.cached_tokens, 9 * 16);
    assert_eq!(pulled.timing.ttft(), prefill_step(&config, 144, 56, load));
    let t = tier_stats(&b);
    assert_eq!(t.hit_tokens, [32, 0, 0, 112]);
    assert_eq!(t.load_seconds[Tier::Peer.index()], load.as_secs_f64());
    assert_eq!(t.peer_ignored, [0; 4]);

    // A wildcard listener is found by its port.
    let c = Engine::spawn_in(config.clone(), 2, pool.clone()).unwrap();
    pool.register(SocketAddr::from(([0, 0, 0, 0], 9000)), &c);
    collect(c.submit(req(tokens(5000, 33), 1)).unwrap()).await;
    let rx = a
        .submit_with_peer(req(tokens(5000, 33), 1), Some(Ok(addr(9000))))
        .unwrap();
    assert_eq!(collect(rx).await.1.cached_tokens, 32);
}

#[tokio::test(start_paused = true)]
async fn hostile_or_useless_peer_names_are_ignored_and_counted() {
    let config = Arc::new(Config::default());
    let pool = TierPool::for_config(&config);
    let a = Engine::spawn_in(config.clone(), 0, pool.clone()).unwrap();
    let b = Engine::spawn_in(config.clone(), 1, pool.clone()).unwrap();
    pool.register(addr(8000), &a);
    pool.register(addr(8001), &b);
    collect(a.submit(req(tokens(0, 100), 1)).unwrap()).await;

    let cases: [(&[u8], PeerIgnored); 6] = [
        (b"10.0.0.1", PeerIgnored::Unparseable),
        (b"peer-0:8000", PeerIgnored::Unparseable),
        (&[0xff; 200], PeerIgnored::Unparseable),
        (b"10.0.0.1:9999", PeerIgnored::Unknown),
        (b"10.0.0.2:8000", PeerIgnored::Unknown),
        (b"10.0.0.1:8001", PeerIgnored::Own),
    ];
    for (value, why) in cases {
        let peer = sim::tiers::parse_peer(value);
        let rx = b
            .submit_with_peer(req(tokens(0, 100), 1), Some(peer))
            .unwrap();
        let (_, c) = collect(rx).await;
        assert_eq!(c.completion_tokens, 1, "{why:?}: served anyway");
    }
    let t = tier_stats(&b);
    assert_eq!(t.peer_ignored, [3, 2, 1, 0]);
    assert_eq!(t.hit_tokens[Tier::Peer.index()], 0);

    // A replica that died is unknown.
    drop(a);
    let rx = b
        .submit_with_peer(req(tokens(0, 10), 1), Some(Ok(addr(8000))))
        .unwrap();
    collect(rx).await;
    assert_eq!(tier_stats(&b).peer_ignored, [3, 3, 1, 0]);

    // Peer pulls off: the header is ignored as disabled.
    let off = Arc::new(Config {
        kv_tiers: KvTiers {
            p2p_load_gbps: 0.0,
            cpu_blocks: 8,
            ..KvTiers::default()
        },
        ..Config::default()
    });
    let c = Engine::spawn_in(off, 2, pool.clone()).unwrap();
    let rx = c
        .submit_with_peer(req(tokens(0, 100), 1), Some(Ok(addr(8001))))
        .unwrap();
    assert_eq!(collect(rx).await.1.cached_tokens, 0);
    assert_eq!(tier_stats(&c).peer_ignored, [0, 0, 0, 1]);
}

/// Everything the engine announced so far, through the publisher's batching and vLLM's
/// encoding, decoded back: what a subscriber receives.
fn drain_decoded(rx: &mut broadcast::Receiver<KvEvent>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        sim::kv_publish::push(&mut events, e, 16);
    }
    let batch = EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: Some(0),
    };
    let bytes = Encoder::new(Encoding::Map).encode(&batch).unwrap();
    decode_batch(&bytes).unwrap().events
}

fn stored(events: &[Event], medium: Medium) -> Vec<(Vec<u64>, usize)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::BlockStored(b) if b.medium == medium => {
                Some((b.block_hashes.clone(), b.token_ids.len()))
            }
            _ => None,
        })
        .collect()
}

fn removed(events: &[Event], medium: Medium) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::BlockRemoved(b) if b.medium == medium => Some(b.block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[tokio::test(start_paused = true)]
async fn tier_events_carry_the_medium_and_the_writer_announces_the_shared_store() {
    // CPU tier of 4 blocks, shared store of 5 blocks, GPU of 8.
    let config = Arc::new(small_gpu(KvTiers {
        cpu_blocks: 4,
        shared_blocks: 5,
        ..KvTiers::default()
    }));
    let pool = TierPool::for_config(&config);
    let a = Engine::spawn_in(config.clone(), 0, pool.clone()).unwrap();
    let b = Engine::spawn_in(config.clone(), 1, pool.clone()).unwrap();
    let (mut ea, mut eb) = (a.subscribe_kv_events(), b.subscribe_kv_events());

    let p = tokens(0, 50); // 3 full blocks
    let hp = block_hashes(chain_root(None), &p, 16);
    collect(a.submit(req(p, 1)).unwrap()).await;
    let events = drain_decoded(&mut ea);
    assert_eq!(stored(&events, Medium::Gpu), [(hp.clone(), 48)]);
    assert_eq!(
        stored(&events, Medium::Cpu),
        [(hp.clone(), 0)],
        "no token ids"
    );
    assert_eq!(stored(&events, Medium::Remote), [(hp.clone(), 0)]);
    assert!(drain_decoded(&mut eb).is_empty());

    // b writes 3 other blocks: the store (5) pushes out a's two oldest, announced by a.
    let q = tokens(1000, 50);
    let hq = block_hashes(chain_root(None), &q, 16);
    collect(b.submit(req(q, 1)).unwrap()).await;
    let on_b = drain_decoded(&mut eb);
    assert_eq!(stored(&on_b, Medium::Remote), [(hq.clone(), 0)]);
    assert!(removed(&on_b, Medium::Remote).is_empty());
    let on_a = drain_decoded(&mut ea);
    assert_eq!(removed(&on_a, Medium::Remote), hp[..1].to_vec());
    assert_eq!(removed(&on_a, Medium::Cpu), Vec::<u64>::new());

    // a's CPU tier (4) takes 3 more blocks: its two oldest leave it.
    let r = tokens(2000, 50);
    let hr = block_hashes(chain_root(None), &r, 16);
    collect(a.submit(req(r, 1)).unwrap()).await;
    let on_a = drain_decoded(&mut ea);
    assert_eq!(stored(&on_a, Medium::Cpu), [(hr, 0)]);
    assert_eq!(removed(&on_a, Medium::Cpu), hp[..2].to_vec());
    // The shared store (5) held hp[1..] + hq: three more push out hp[1], hp[2], hq[0] — the
    // first two announced by a, the last by b.
    assert_eq!(removed(&on_a, Medium::Remote), hp[1..].to_vec());
    assert_eq!(
        removed(&drain_decoded(&mut eb), Medium::Remote),
        hq[..1].to_vec()
    );
}

/// A workload of shared and distinct prompts; the completions' timings and cached tokens.
async fn workload(config: Config) -> Vec<(Duration, Duration, usize)> {
    let e = Engine::spawn(Arc::new(config), 0).unwrap();
    let mut rxs = Vec::new();
    for i in 0..24u32 {
        let mut prompt = tokens(0, 300);
        prompt.extend(tokens(10_000 + i * 1000, 50 + (i as usize * 37) % 400));
        rxs.push(e.submit(req(prompt, 1 + (i as usize * 7) % 20)).unwrap());
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut out = Vec::new();
    for rx in rxs {
        let (_, c) = collect(rx).await;
        out.push((
            c.timing.ttft(),
            c.timing.finished - c.timing.arrival,
            c.cached_tokens,
        ));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn tiers_that_serve_nothing_change_nothing() {
    let off = workload(Config {
        kv_tiers: no_tiers(),
        ..Config::default()
    })
    .await;
    // Defaults (peer pulls on, never named), and a CPU tier + shared store the large GPU
    // never needs: the same engine, step for step.
    assert_eq!(workload(Config::default()).await, off);
    let unused = workload(Config {
        kv_tiers: KvTiers {
            cpu_blocks: 1000,
            shared_blocks: 1000,
            ..KvTiers::default()
        },
        ..Config::default()
    })
    .await;
    assert_eq!(unused, off);
    assert!(off.iter().skip(1).all(|&(_, _, cached)| cached >= 288));

    // With every tier off, /metrics has no tier series at all (as before tiers).
    let config = Config {
        kv_tiers: no_tiers(),
        ..Config::default()
    };
    let e = Engine::spawn(Arc::new(config.clone()), 0).unwrap();
    collect(e.submit(req(tokens(0, 40), 1)).unwrap()).await;
    let text = sim::metrics::render(config.engine, &config.model, &e.snapshot(), 0.0);
    assert!(
        !text.contains("sim_kv_") && !text.contains("external_prefix"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn tier_metrics_render_with_vllm_names() {
    use endpoint_picker::scrape::prometheus::parse;
    let config = small_gpu(cpu_tier(64));
    let e = Engine::spawn(Arc::new(config.clone()), 0).unwrap();
    collect(e.submit(req(tokens(0, 65), 1)).unwrap()).await;
    collect(e.submit(req(tokens(1000, 113), 1)).unwrap()).await;
    collect(e.submit(req(tokens(0, 65), 1)).unwrap()).await;
    let text = sim::metrics::render(config.engine, &config.model, &e.snapshot(), 0.0);
    let samples = parse(&text).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|x| x.name == name && label.is_none_or(|(k, v)| x.label(k).as_deref() == Some(v)))
            .unwrap_or_else(|| panic!("{name} {label:?} missing"))
            .value
    };
    assert_eq!(value("vllm:external_prefix_cache_hits_total", None), 64.0);
    assert_eq!(
        value("vllm:external_prefix_cache_queries_total", None),
        243.0
    );
    assert_eq!(value("vllm:prefix_cache_hits_total", None), 0.0);
    assert_eq!(
        value("sim_kv_tier_hit_tokens_total", Some(("tier", "cpu"))),
        64.0
    );
    assert_eq!(
        value("sim_kv_tier_hit_tokens_total", Some(("tier", "peer"))),
        0.0
    );
    let load = value("sim_kv_tier_load_seconds_total", Some(("tier", "cpu")));
    // 64 × 131,072 B / 25 GB/s, rounded to the nanosecond.
    assert_eq!(load, 335_544e-9);
    assert_eq!(
        value("sim_kv_peer_header_ignored_total", Some(("reason", "self"))),
        0.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_preempted_sequence_comes_back_from_the_cpu_tier() {
    // 6 GPU blocks: two 40-token prompts growing to 64 tokens each cannot both stay; the
    // later one is preempted, and its blocks, written through, come back from the CPU.
    let config = Config {
        num_gpu_blocks: 6,
        kv_tiers: cpu_tier(64),
        ..Config::default()
    };
    let e = Engine::spawn(Arc::new(config), 0).unwrap();
    let one = e.submit(req(tokens(0, 40), 40)).unwrap();
    let two = e.submit(req(tokens(1000, 40), 40)).unwrap();
    let (a, b) = tokio::join!(collect(one), collect(two));
    assert_eq!((a.1.completion_tokens, b.1.completion_tokens), (40, 40));
    let s = e.snapshot();
    assert!(s.stats.preemptions > 0);
    assert!(s.stats.tiers.unwrap().hit_tokens[Tier::Cpu.index()] > 0);
}
