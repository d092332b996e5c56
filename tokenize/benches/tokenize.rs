//! Tokenization cost with the project's test tokenizer (`testdata/`, a Llama-3-style byte-level
//! BPE with Llama 3's pre-tokenizer regex): completions and chat bodies of 8 KB and 220 KB,
//! parsed, rendered (chat) and encoded, as the token producer runs them.
//!
//! `cargo bench -p tokenize` (release). The test vocabulary is small (640 ids), so pieces are
//! shorter than a real model's and merges fewer: the cost per byte is of the same order as with
//! Llama 3's 128k vocabulary (pre-tokenization dominates), not identical.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokenize::{Api, Limits, Tokenizer};

/// Prose-like text of about `bytes` bytes: words, numbers, punctuation, some non-ASCII.
fn text(bytes: usize) -> String {
    const SENTENCE: &str = "The endpoint picker routes request 4096 to the replica whose KV cache \
        holds its prefix; émigré naïve café — it's fast, isn't it? ";
    let mut s = String::with_capacity(bytes + SENTENCE.len());
    while s.len() < bytes {
        s.push_str(SENTENCE);
    }
    s.truncate(s.floor_char_boundary(bytes));
    s
}

fn completions_body(bytes: usize) -> Vec<u8> {
    serde_json::json!({"model": "m", "prompt": text(bytes)})
        .to_string()
        .into_bytes()
}

/// A conversation of `bytes` bytes of content in turns of about 2 KB.
fn chat_body(bytes: usize) -> Vec<u8> {
    let turns = (bytes / 2048).max(1);
    let messages: Vec<_> = (0..turns)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            serde_json::json!({"role": role, "content": text(bytes / turns)})
        })
        .collect();
    serde_json::json!({"model": "m", "messages": messages})
        .to_string()
        .into_bytes()
}

/// A chat request: a system prompt of `bytes` bytes shared by every request, then question
/// `n`.
fn shared_prefix_chat(bytes: usize, n: usize) -> Vec<u8> {
    serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": text(bytes)},
        {"role": "user", "content": format!("Question {n}: which replica holds the prefix of request {n}, and why?")},
    ]})
    .to_string()
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    // Without the prefix cache: every body encoded whole, as before it existed.
    let tok = Tokenizer::load(
        &dir,
        None,
        Limits {
            prefix_cache_bytes: 0,
            ..Limits::default()
        },
    )
    .unwrap();
    let mut group = c.benchmark_group("tokenize");
    for (label, bytes) in [("8KB", 8 * 1024), ("220KB", 220 * 1024)] {
        for (api, body) in [
            (Api::Completions, completions_body(bytes)),
            (Api::ChatCompletions, chat_body(bytes)),
        ] {
            let name = match api {
                Api::Completions => "completions",
                Api::ChatCompletions => "chat",
            };
            let ids = tok.encode_body(api, &body).unwrap();
            assert!(ids.len() > bytes / 16, "{name} {label}: {} ids", ids.len());
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::new(name, label), &body, |b, body| {
                b.iter(|| tok.encode_body(api, body).unwrap())
            });
        }
    }
    // With the prefix cache (the default): a system prompt shared by every request, each with
    // its own question (what prefix routing is for), and texts that share nothing (every
    // chunk a miss, to show what the cache costs when it cannot help).
    let cached = Tokenizer::load(&dir, None, Limits::default()).unwrap();
    assert!(cached.has_prefix_cache());
    for (label, bytes) in [("8KB", 8 * 1024), ("220KB", 220 * 1024)] {
        let bodies: Vec<Vec<u8>> = (0..64).map(|n| shared_prefix_chat(bytes, n)).collect();
        for body in &bodies[..2] {
            assert_eq!(
                cached.encode_body(Api::ChatCompletions, body).unwrap(),
                tok.encode_body(Api::ChatCompletions, body).unwrap()
            );
        }
        group.throughput(Throughput::Bytes(bodies[0].len() as u64));
        let mut n = 0;
        group.bench_function(BenchmarkId::new("chat_shared_prefix", label), |b| {
            b.iter(|| {
                n = (n + 1) % bodies.len();
                cached
                    .encode_body(Api::ChatCompletions, &bodies[n])
                    .unwrap()
            })
        });
        let mut n = 0u64;
        let base = text(bytes);
        group.bench_function(BenchmarkId::new("completions_unshared", label), |b| {
            b.iter(|| {
                n += 1;
                cached.encode_prompt(&format!("{n} {base}")).unwrap()
            })
        });
        group.bench_function(
            BenchmarkId::new("completions_unshared_uncached", label),
            |b| {
                b.iter(|| {
                    n += 1;
                    tok.encode_prompt(&format!("{n} {base}")).unwrap()
                })
            },
        );
    }
    group.finish();
    let mut load = c.benchmark_group("tokenize_load");
    load.sample_size(10);
    load.bench_function("with_prefix_cache_self_check", |b| {
        b.iter(|| Tokenizer::load(&dir, None, Limits::default()).unwrap())
    });
    load.bench_function("without_prefix_cache", |b| {
        b.iter(|| {
            Tokenizer::load(
                &dir,
                None,
                Limits {
                    prefix_cache_bytes: 0,
                    ..Limits::default()
                },
            )
            .unwrap()
        })
    });
    load.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
