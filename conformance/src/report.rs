//! The machine-readable conformance report, written by every run.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Outcome of one scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every check of the scenario held.
    Pass,
    /// A check failed or the scenario timed out; `detail` says which.
    Fail,
    /// Not applicable locally; `detail` says why.
    Skipped,
}

/// One scenario's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Upstream's test name, or ours for our own protocol scenarios.
    pub name: String,
    /// `upstream` (GIE conformance `tests/`) or `switchyard`.
    pub origin: &'static str,
    /// How it ended.
    pub status: Status,
    /// Wall time of the scenario, set-up included.
    pub duration_ms: u128,
    /// Requests sent through the gateway.
    pub requests: usize,
    /// Failure message or skip reason; empty on a pass.
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `switchyard-conformance/v1`.
    pub schema: &'static str,
    /// The workspace's version (`CARGO_PKG_VERSION`).
    pub switchyard_version: String,
    /// `git rev-parse HEAD`, with `-dirty` when the tree has changes; empty outside git.
    pub switchyard_commit: String,
    /// `envoy --version`.
    pub envoy_version: String,
    /// The deliberate EPP fault of this run (`SWITCHYARD_CONFORMANCE_FAULT`), if any.
    pub fault: Option<String>,
    /// Seconds since the Unix epoch when the run ended.
    pub finished_at_unix: u64,
    /// Wall time of the whole run.
    pub duration_ms: u128,
    /// Scenarios with [`Status::Pass`].
    pub passed: usize,
    /// Scenarios with [`Status::Fail`].
    pub failed: usize,
    /// Scenarios with [`Status::Skipped`].
    pub skipped: usize,
    /// Every scenario, in the order they ran.
    pub scenarios: Vec<ScenarioResult>,
}

impl Report {
    /// Writes the report as pretty JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }
}

/// Where the report goes: `$SWITCHYARD_CONFORMANCE_REPORT`, else `conformance-report.json`
/// (or `conformance-report-<fault>.json`) in the Cargo target directory.
pub fn default_path(target_tmpdir: &Path, fault: Option<&str>) -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHYARD_CONFORMANCE_REPORT") {
        return PathBuf::from(p);
    }
    let name = match fault {
        Some(f) => format!("conformance-report-{f}.json"),
        None => "conformance-report.json".to_owned(),
    };
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    target_tmpdir.parent().unwrap_or(target_tmpdir).join(name)
}

/// The commit of the working tree, if it is a git checkout.
pub fn git_commit(repo: &Path) -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = run(&["rev-parse", "HEAD"]) else {
        return String::new();
    };
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}
