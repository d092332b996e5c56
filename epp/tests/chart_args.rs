//! The Helm chart's rendered EPP arguments start the EPP's own flag parser.
//!
//! `manifests/validate.py` renders the chart for every value set it tests (upstream's own
//! values.yaml among them) and keeps each rendering's EPP arguments in a golden file, one per
//! line; this test parses every one with [`Args`], so a chart that renders a flag the EPP does
//! not know, or a value it cannot parse, fails here rather than crash-looping a pod.

use std::path::PathBuf;

use clap::Parser;
use epp::args::Args;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/charts/switchyard-inferencepool/tests/rendered-args")
}

#[test]
fn every_rendered_argument_list_parses() {
    let mut parsed = 0;
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "args") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let argv = std::iter::once("epp").chain(text.lines().filter(|l| !l.is_empty()));
        if let Err(e) = Args::try_parse_from(argv) {
            panic!("{}: {e}", path.display());
        }
        parsed += 1;
    }
    assert!(parsed >= 5, "only {parsed} golden files");
}

#[test]
fn a_flag_set_by_the_chart_and_again_by_the_user_still_starts() {
    let a = Args::try_parse_from(["epp", "--pool-name=p", "--v=2", "--v=3"]).unwrap();
    assert_eq!(a.verbosity, 3);
}
