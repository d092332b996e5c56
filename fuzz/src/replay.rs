//! Replays a target's checked-in inputs (for the parser crates' `fuzz_regressions` tests).

use std::path::{Path, PathBuf};

/// Runs `run` on every file of `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`,
/// naming the file that fails.
pub fn replay(target: &str, run: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = ["seeds", "regressions"]
        .iter()
        .filter_map(|d| std::fs::read_dir(fuzz.join(d).join(target)).ok())
        .flatten()
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no inputs for {target} under {}",
        fuzz.display()
    );
    for file in files {
        let data = std::fs::read(&file).expect("readable input");
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: {} fails", file.display());
        }
    }
}
