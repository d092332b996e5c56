//! What bench's integration tests share: the real tools they run (or the skip when one is
//! missing), a scratch directory and the runtime they run the scenarios on.
// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bench::harness::Tools;

/// `sim` and `epp` from this test's profile directory (`target/<profile>/`, where
/// `cargo test --workspace` builds them), Envoy from `$ENVOY` or the repository's `.venv`.
/// `None` when one is missing (the test skips, saying so), unless `SWITCHYARD_REQUIRE_ENVOY` is
/// set (as `make test` does), in which case that is a failure.
pub fn tools_or_skip(test: &str) -> Option<Tools> {
    let required = std::env::var_os("SWITCHYARD_REQUIRE_ENVOY").is_some();
    let exe = std::env::current_exe().ok()?;
    // <target>/<profile>/deps/<test>-<hash> → <target>/<profile>
    let bin_dir = exe.parent()?.parent()?.to_path_buf();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .ok()?;
    match Tools::locate(repo, Some(bin_dir), None) {
        Ok(t) => Some(t),
        Err(e) if required => panic!(
            "{test}: {e:#} (SWITCHYARD_REQUIRE_ENVOY is set; `cargo test --workspace` builds \
             epp and sim)"
        ),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e:#}");
            None
        }
    }
}

/// A scratch directory for the processes' logs, `switchyard-<name>-<pid>` under the system's
/// temporary directory, created; the test removes it when it passes and names it when it fails.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The runtime the scenarios run on: two workers, as on the machine the results are from.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
