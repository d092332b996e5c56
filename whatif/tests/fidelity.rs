//! What-if fidelity, kept: `whatif` replays workloads measured in real time (the first rung of
//! the goodput scenario's runs: real Envoy, `epp` and simulator processes, recorded in
//! `bench/results/fidelity.json` by `bench/fidelity.py`) and must stay within the bounds
//! of the real numbers: TTFT p50 and p90 within 10 %, hit rate within 2 points. A change to the
//! engine model or to the replay that moves virtual time away from real time fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The points replayed here: two of the default profile's, cheap to replay (the whole table is
/// in RESULTS.md, "What-if fidelity").
const CASES: &[(&str, &str)] = &[("mixed", "cost-model"), ("multi-turn", "cost-model")];

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results/fidelity.json");
    serde_json::from_slice(&std::fs::read(&path).expect("bench/results/fidelity.json")).unwrap()
}

fn within(real: f64, replayed: f64, tolerance: f64) -> bool {
    (replayed - real).abs() <= tolerance * real
}

#[test]
fn whatif_stays_within_ten_percent_of_the_real_time_bench() {
    let fixture = fixture();
    let warmup = fixture["warmup_s"].as_f64().unwrap();
    let step = fixture["step_s"].as_f64().unwrap();
    let points = fixture["points"].as_array().unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for &(workload, config) in CASES {
        let point = points
            .iter()
            .find(|p| p["workload"] == workload && p["config"] == config)
            .unwrap_or_else(|| panic!("{workload}/{config} is not in the fixture"));
        let real = &point["real"];
        let rate = real["rate"].as_f64().unwrap();
        let args: Vec<&str> = fixture["workloads"][workload]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let out = dir.join(format!("{workload}-{config}.json"));
        let status = Command::new(env!("CARGO_BIN_EXE_whatif"))
            .args(["--config", config])
            .args(&args)
            .args(["--rates", &rate.to_string()])
            .args(["--duration", &(warmup + step).to_string()])
            .args(["--warmup", &warmup.to_string()])
            .arg("--json")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "whatif failed on {workload}/{config}");
        let replayed: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        let s = &replayed["summaries"][0];
        let case = format!("{workload}/{config} at {rate} req/s");
        assert_eq!(s["errors"], 0, "{case}");
        for (q, key) in [("p50", "ttft_p50_ms"), ("p90", "ttft_p90_ms")] {
            let (r, w) = (
                real[key].as_f64().unwrap(),
                s["ttft_ms"][q].as_f64().unwrap(),
            );
            assert!(
                within(r, w, 0.10),
                "{case}: TTFT {q} real {r:.0} ms, what-if {w:.0} ms"
            );
        }
        let (r, w) = (
            real["hit_rate"].as_f64().unwrap(),
            s["hit_rate"].as_f64().unwrap(),
        );
        assert!(
            (w - r).abs() <= 0.02,
            "{case}: hit rate real {r:.3}, what-if {w:.3}"
        );
    }
}
