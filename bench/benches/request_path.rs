//! Request-path micro-benchmarks: one scheduling decision at 10/100/1,000 endpoints (the
//! default profile, the balanced one and the cost model; the cost model again with a tenth of
//! the pool re-scraped before each decision, and again routing the warm-up's conversations in
//! turn), one decision for a long prompt seen
//! for the first time (the cost model at 8 endpoints, whose prefix index is full, so recording
//! the prompt also evicts), and parsing + hashing a 220 KB prompt. Results: bench/RESULTS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use endpoint_picker::config::REFERENCE_DEFAULT_CONFIG;
use endpoint_picker::config::profiles::{BALANCED_PREFIX, COST_MODEL};
use endpoint_picker::director::Director;
use endpoint_picker::prefix::BlockHasher;
use endpoint_picker::request::{Api, InferenceRequest};
use ext_proc::body_budget::BodyBudget;
use ext_proc::json_usage::JsonUsageScanner;
use ext_proc::openai;

fn request_from(body: &Bytes, api: Api) -> InferenceRequest {
    let p = openai::parse_body(api, body).unwrap();
    InferenceRequest {
        api,
        model: p.model.clone(),
        target_model: p.model,
        prompt: p.prompt,
        stream: p.stream,
        body_len: body.len(),
        // As the ext_proc stream fills them.
        estimated_prompt_tokens: Some(p.estimated_prompt_tokens),
        prompt_is_json: p.prompt_is_json,
        prompt_media_from: p.prompt_media_from,
        ..Default::default()
    }
}

/// The director's timers need a runtime to be entered; the benchmarks drive it synchronously.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn scheduling_decision(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let profiles = [
        (
            "decision_default_profile_8kb_chat",
            REFERENCE_DEFAULT_CONFIG,
        ),
        ("decision_balanced_profile_8kb_chat", BALANCED_PREFIX),
        ("decision_cost_model_profile_8kb_chat", COST_MODEL),
    ];
    for (name, config) in profiles {
        decisions(c, name, config);
    }
    rescraped_decisions(c);
    conversation_decisions(c);
}

/// The cost model's decision when every iteration routes the next of the conversations the
/// index was warmed with, so each endpoint records prompts in turn (its list holds the others'
/// runs in between), where the benchmarks above route one request again and again.
fn conversation_decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision_cost_model_conversations_8kb_chat");
    for n in [100usize, 1000] {
        let (director, _) = warmed(n, COST_MODEL);
        let requests: Vec<InferenceRequest> = (0..(n * 4).min(2000))
            .map(|i| {
                let body = Bytes::from(bench::chat_body(8 * 1024, i));
                request_from(&body, Api::ChatCompletions)
            })
            .collect();
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let request = &requests[next % requests.len()];
                next += 1;
                let routed = director.route(black_box(request), None, false).unwrap();
                black_box(routed.destination())
            })
        });
    }
    group.finish();
}

/// The cost model's decision when a tenth of the pool's metrics changed since the previous
/// one (the director keeps its candidate list between decisions and reloads the endpoints
/// whose metrics were stored since): at the reference's 50 ms scrape interval that is 200
/// decisions a second at any pool size. Storing the metrics is not timed.
fn rescraped_decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision_cost_model_rescraped_tenth_8kb_chat");
    for n in [100usize, 1000] {
        let (director, request) = warmed(n, COST_MODEL);
        let snapshot = director.datastore().snapshot();
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_batched(
                || {
                    for _ in 0..n / 10 {
                        let e = &snapshot.endpoints[next % n];
                        let mut m = (*e.metrics()).clone();
                        m.waiting_queue_size = (m.waiting_queue_size + 1) % 13;
                        e.store_metrics(m);
                        next += 1;
                    }
                },
                |()| {
                    let routed = director.route(black_box(&request), None, false).unwrap();
                    black_box(routed.destination())
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// A director over `n` endpoints whose prefix index holds routing history (4 conversations per
/// endpoint, at most 2,000), and the 8 KB chat request every iteration routes.
fn warmed(n: usize, config: &str) -> (std::sync::Arc<Director>, InferenceRequest) {
    let director = bench::director_with_config(n, config);
    for i in 0..(n * 4).min(2000) {
        let body = Bytes::from(bench::chat_body(8 * 1024, i));
        let _ = director
            .route(&request_from(&body, Api::ChatCompletions), None, false)
            .unwrap();
    }
    let body = Bytes::from(bench::chat_body(8 * 1024, 1));
    (director, request_from(&body, Api::ChatCompletions))
}

fn decisions(c: &mut Criterion, name: &str, config: &str) {
    let mut group = c.benchmark_group(name);
    for n in [10usize, 100, 1000] {
        let (director, request) = warmed(n, config);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let routed = director.route(black_box(&request), None, false).unwrap();
                black_box(routed.destination())
            })
        });
    }
    group.finish();
}

fn parse_and_hash(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_and_hash");
    for kb in [8usize, 220] {
        let body = Bytes::from(bench::completions_body(kb * 1024));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("completions_kb", kb), &body, |b, body| {
            let hasher = BlockHasher::from_tokens(16, 256);
            b.iter(|| {
                let p = openai::parse_body(Api::Completions, black_box(body)).unwrap();
                black_box(hasher.hash(&p.model, p.cache_salt.as_deref(), &p.prompt))
            })
        });
        let chat = Bytes::from(bench::chat_body(kb * 1024, 0));
        group.bench_with_input(BenchmarkId::new("chat_kb", kb), &chat, |b, body| {
            let hasher = BlockHasher::from_tokens(16, 256);
            b.iter(|| {
                let p = openai::parse_body(Api::ChatCompletions, black_box(body)).unwrap();
                black_box(hasher.hash(&p.model, p.cache_salt.as_deref(), &p.prompt))
            })
        });
    }
    group.finish();
}

/// The prompt-token estimate from a chat prompt's content (`parse_body` computes it for
/// every body when no tokenizer gives ids): one `memchr` walk over the messages' JSON.
fn estimate_prompt(c: &mut Criterion) {
    let mut group = c.benchmark_group("estimate_json_prompt_tokens");
    for kb in [8usize, 220] {
        let chat = bench::chat_body(kb * 1024, 0);
        let parsed = openai::parse_body(Api::ChatCompletions, &Bytes::from(chat))
            .expect("the bench's chat body parses");
        group.throughput(Throughput::Bytes(parsed.prompt.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("chat_kb", kb),
            &parsed.prompt,
            |b, prompt| {
                b.iter(|| endpoint_picker::cost::estimate_json_prompt_tokens(black_box(prompt)))
            },
        );
        // A line break and a quote every 30 characters or so: each escape restarts the
        // search for the string's end.
        let lines = r#"The quick brown fox jumps.\nAnd \"routes\" it.\n"#;
        let mut content = String::new();
        while content.len() < kb * 1024 {
            content.push_str(lines);
        }
        let escaped = format!(r#"[{{"role":"user","content":"{content}"}}]"#).into_bytes();
        group.throughput(Throughput::Bytes(escaped.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("chat_escaped_kb", kb),
            &escaped,
            |b, prompt| {
                b.iter(|| endpoint_picker::cost::estimate_json_prompt_tokens(black_box(prompt)))
            },
        );
    }
    group.finish();
}

/// The cost model's decision for a prompt no endpoint has seen, at 8 endpoints whose prefix
/// indexes are full: matching finds nothing, and recording the prompt (up to the profile's
/// 4,096 blocks) evicts as much. Building the request is not timed.
fn unseen_long_prompt(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("decision_cost_model_unseen_chat");
    for kb in [16usize, 220, 400] {
        let director = bench::director_with_config(8, COST_MODEL);
        let mut salt = 0usize;
        let mut next = || {
            salt += 1;
            request_from(
                &Bytes::from(bench::chat_body(kb * 1024, salt)),
                Api::ChatCompletions,
            )
        };
        // Fill every endpoint's index (27,000 blocks each) before measuring.
        let warm = (8 * 27_000 * 64 / (kb * 1024)).max(8) * 2;
        for _ in 0..warm {
            let _ = director.route(&next(), None, false).unwrap();
        }
        group.throughput(Throughput::Bytes((kb * 1024) as u64));
        group.bench_function(BenchmarkId::from_parameter(format!("{kb}kb")), |b| {
            b.iter_batched(
                &mut next,
                |request| {
                    let routed = director.route(black_box(&request), None, false).unwrap();
                    black_box(routed.destination())
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Reading one scrape of a busy vLLM engine (every body differs, so none is skipped): the
/// families the vLLM mapping reads, out of the fixed backend's 30 KB exposition.
fn scrape_extract(c: &mut Criterion) {
    let text = bench::fixed_backend::exposition(1);
    let mapping = endpoint_picker::scrape::engine::EngineMapping::vllm();
    let mut group = c.benchmark_group("scrape_extract");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("vllm_30kb", |b| {
        b.iter(|| black_box(mapping.extract(black_box(&text))))
    });
    group.finish();
}

/// Reading a whole answer's `usage` as it passes (`ext_proc::json_usage`), in Envoy's
/// 64 KiB chunks, with the member at the answer's end and at its front; and the full parse
/// of the answer that it replaced (the EPP kept up to 16 MiB and parsed it at the end). The
/// answers are logprobs-like JSON: many small objects, the parser's slowest input.
fn usage_read(c: &mut Criterion) {
    let answer = |bytes: usize, usage_at_end: bool| {
        let usage = r#""usage":{"prompt_tokens":100000,"completion_tokens":4000}"#;
        let mut s = String::from(r#"{"id":"cmpl-1","choices":[{"index":0,"logprobs":{"content":["#);
        if !usage_at_end {
            s = format!("{{{usage},{}", &s[1..]);
        }
        let mut first = true;
        while s.len() < bytes - 200 {
            if !first {
                s.push(',');
            }
            first = false;
            s.push_str(r#"{"token":"abc","logprob":-1.2345678,"top_logprobs":[]}"#);
        }
        s.push_str("]}}]");
        if usage_at_end {
            s.push(',');
            s.push_str(usage);
        }
        s.push('}');
        s.into_bytes()
    };
    let budget = std::sync::Arc::new(BodyBudget::new(1 << 20));
    let scan = |answer: &[u8]| {
        let mut scanner = JsonUsageScanner::default();
        for chunk in answer.chunks(64 << 10) {
            let _ = scanner.push(chunk, &budget);
        }
        scanner.take_usage()
    };
    let one_mib = answer(1 << 20, true);
    let long = answer(16 << 20, true);
    let long_front = answer(16 << 20, false);
    for a in [&one_mib, &long, &long_front] {
        assert!(openai::usage_from_json(a).is_some());
        assert_eq!(scan(a), openai::usage_from_json(a));
    }
    let mut group = c.benchmark_group("usage_read");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(one_mib.len() as u64));
    group.bench_function("scan_1mib", |b| {
        b.iter(|| black_box(scan(black_box(&one_mib))))
    });
    group.bench_function("whole_1mib_before", |b| {
        b.iter(|| black_box(openai::usage_from_json(black_box(&one_mib))))
    });
    group.throughput(Throughput::Bytes(long.len() as u64));
    group.bench_function("scan_16mib_usage_at_end", |b| {
        b.iter(|| black_box(scan(black_box(&long))))
    });
    group.bench_function("scan_16mib_usage_at_front", |b| {
        b.iter(|| black_box(scan(black_box(&long_front))))
    });
    group.bench_function("whole_16mib_before", |b| {
        b.iter(|| black_box(openai::usage_from_json(black_box(&long))))
    });
    group.finish();
}

criterion_group!(
    benches,
    estimate_prompt,
    scheduling_decision,
    unseen_long_prompt,
    parse_and_hash,
    scrape_extract,
    usage_read
);
criterion_main!(benches);
