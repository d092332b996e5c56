//! The short chaos variants (`scenario chaos --quick`) as a test: real processes (Envoy from
//! the shipped template, the debug `epp` and `sim` that `cargo test --workspace` builds next to
//! this test's target directory), one fault at a time, each case's verdict from per-request
//! records and the EPP's `/debug/pool`; and the soak's short variant. About 2 minutes on 2
//! cores (the two tests run in parallel).
//!
//! Every check gates the test except those marked `known_gap` (a target not met yet, reported
//! as FAIL in bench/RESULTS.md, e.g. FailOpen's window before Envoy's health check sees the
//! EPP down); the checks that bound such a gap do gate it.
//!
//! Skipped when Envoy or the binaries are missing, unless `SWITCHYARD_REQUIRE_ENVOY` is set
//! (as `make test` does), in which case that is a failure.

mod support;

use bench::scenario::chaos::{self, ChaosCfg};
use bench::scenario::soak::{self, SoakCfg};
use support::{runtime, scratch_dir, tools_or_skip};

#[test]
fn chaos_short_variants() {
    let Some(tools) = tools_or_skip("chaos_short_variants") else {
        return;
    };
    let dir = scratch_dir("chaos");
    let rt = runtime();
    let started = std::time::Instant::now();
    let run = rt
        .block_on(chaos::run(&tools, &ChaosCfg::quick(), &dir, |r| {
            eprintln!(
                "{}: {} — {}",
                r.name,
                if r.pass { "pass" } else { "FAIL" },
                r.numbers
            );
        }))
        .unwrap_or_else(|e| panic!("chaos run: {e:#} (logs in {})", dir.display()));
    eprintln!(
        "{}\n(in {:.0} s)",
        chaos::markdown(&run),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(run.cases.len(), chaos::CASES.len());
    let failed: Vec<String> = run
        .cases
        .iter()
        .filter(|c| !c.gating_pass())
        .map(|c| {
            let checks: Vec<&str> = c
                .checks
                .iter()
                .filter(|k| !k.pass && !k.known_gap)
                .map(|k| k.what.as_str())
                .collect();
            format!("{}: {} [{}]", c.name, c.happened, checks.join("; "))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "chaos cases failed (logs in {}):\n{}",
        dir.display(),
        failed.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The soak's short variant: 15 s at 80 % of the measured capacity. Every verdict but RSS
/// flatness (meaningless in 15 s) must hold: no failed request, bounded prefix index, decision
/// ring and ext_proc streams, no task exit.
#[test]
fn soak_short_variant() {
    let Some(tools) = tools_or_skip("soak_short_variant") else {
        return;
    };
    let dir = scratch_dir("soak");
    let rt = runtime();
    let run = rt
        .block_on(soak::run(&tools, &SoakCfg::short(), &dir))
        .unwrap_or_else(|e| panic!("soak run: {e:#} (logs in {})", dir.display()));
    eprintln!("{}", soak::markdown(&run, "soak.svg"));
    assert!(
        run.sent > 0 && run.samples.len() >= 10,
        "sent {}, samples {}",
        run.sent,
        run.samples.len()
    );
    let failed: Vec<&str> = run
        .checks
        .iter()
        .filter(|(what, pass)| !pass && !what.starts_with("EPP RSS"))
        .map(|(what, _)| what.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "soak verdicts failed (logs in {}): {failed:?}",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
