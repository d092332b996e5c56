//! Harness for the Prometheus text parser and the engine metric mappings of `endpoint-picker`
//! (`scrape::prometheus`, `scrape::engine`): what a model server's `/metrics` returns.
//!
//! Shared by the `prometheus` fuzz target and `endpoint-picker/tests/fuzz_regressions.rs`.

use endpoint_picker::scrape::engine::{EngineMapping, MAX_SERVED_MODELS};
use endpoint_picker::scrape::prometheus;

/// Runs one exposition (the scraper refuses non-UTF-8 bodies, so only UTF-8 text is parsed).
/// The lazy iterator and the strict parser agree; the engine mappings never panic, keep KV use
/// in `[0, 1]`, count exactly the malformed lines, and bound what an engine can make the EPP
/// keep.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut bad_samples = 0usize;
    let mut all_valid = true;
    for sample in prometheus::samples(text) {
        match sample {
            Ok(s) => {
                assert!(!s.name.is_empty());
                for label in s.labels() {
                    match label {
                        Ok((k, _)) => {
                            assert!(!k.is_empty());
                            assert!(s.label(k).is_some(), "label {k:?} not found again");
                        }
                        Err(_) => all_valid = false,
                    }
                }
            }
            Err(e) => {
                assert!(e.line >= 1);
                bad_samples += 1;
                all_valid = false;
            }
        }
    }
    let strict = prometheus::parse(text);
    assert_eq!(strict.is_ok(), all_valid, "{strict:?}");
    for mapping in EngineMapping::builtin() {
        let got = mapping.extract(text);
        // Only the families a mapping reads are parsed, so only their malformed lines count.
        assert!(
            got.bad_lines <= bad_samples,
            "{} > {bad_samples}",
            got.bad_lines
        );
        let m = &got.metrics;
        assert!(
            (0.0..=1.0).contains(&m.kv_cache_usage),
            "{}",
            m.kv_cache_usage
        );
        assert!(m.served_models.len() <= MAX_SERVED_MODELS);
        for model in &m.served_models {
            assert!(!model.is_empty() && model.len() <= 256);
            assert!(!model.chars().any(char::is_control));
        }
        assert!(m.updated_at.is_none());
    }
    // Metric specs come from configuration, but parsing one must not panic either.
    if let Some(line) = text.lines().next() {
        let _ = line.parse::<endpoint_picker::scrape::MetricSpec>();
    }
}
