//! Runs `tools/kv-events/vllm_kv_events.py` (vLLM's structs in msgspec) with the repository's
//! `.venv/bin/python`, and the neutral JSON form it prints, for the wire tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kv_events::{Event, EventBatch};
use serde_json::{Value, json};

/// The repository root (tests run with the crate's directory as the working directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The script runner, or `None` (with a message saying why the test is skipped) when the
/// repository's virtualenv has no msgspec. `SWITCHYARD_REQUIRE_MSGSPEC=1` (set by `make test`,
/// which installs it: `make kv-events-tools`) makes that a failure instead.
pub fn script() -> Option<Script> {
    script_importing("msgspec")
}

/// The script runner when the virtualenv also has pyzmq (libzmq), for the interoperability
/// tests; skipped or failed as [`script`] says.
pub fn script_with_pyzmq() -> Option<Script> {
    script_importing("msgspec, zmq")
}

fn script_importing(modules: &str) -> Option<Script> {
    let python = repo_root().join(".venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {modules}")])
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(Script { python });
    }
    let why = format!(
        "{} with {modules} is missing (make kv-events-tools installs it)",
        python.display()
    );
    if std::env::var("SWITCHYARD_REQUIRE_MSGSPEC").is_ok_and(|v| v == "1") {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// `.venv/bin/python tools/kv-events/vllm_kv_events.py`.
pub struct Script {
    python: PathBuf,
}

impl Script {
    /// The command that runs the script with `args`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.python);
        c.arg(repo_root().join("tools/kv-events/vllm_kv_events.py"))
            .args(args);
        c
    }

    /// Runs the script with `args`; its stdout as JSON.
    pub fn run(&self, args: &[&str]) -> Value {
        let out = Command::new(&self.python)
            .arg(repo_root().join("tools/kv-events/vllm_kv_events.py"))
            .args(args)
            .output()
            .expect("run the script");
        assert!(
            out.status.success(),
            "vllm_kv_events.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }

    /// Decodes payload files with vLLM's structs of `encoding` (`array` or `map`).
    pub fn decode(&self, encoding: &str, files: &[PathBuf]) -> Value {
        let mut args = vec!["decode".to_owned(), encoding.to_owned()];
        args.extend(files.iter().map(|f| f.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args)
    }
}

/// A fresh directory under the system's temporary one.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The script's neutral form of a decoded batch.
pub fn neutral(batch: &EventBatch) -> Value {
    let events: Vec<Value> = batch
        .events
        .iter()
        .map(|e| match e {
            Event::BlockStored(b) => json!({
                "type": "BlockStored",
                "block_hashes": b.block_hashes,
                "parent_block_hash": b.parent_block_hash,
                "token_ids": b.token_ids,
                "block_size": b.block_size,
                "lora_id": b.lora_id,
                "lora_name": b.lora_name,
                "medium": b.medium.as_str(),
                "group_idx": b.group.map(|g| g.index),
                "kv_cache_spec_kind": b.group.and_then(|g| g.kind).map(|k| k.as_str()),
            }),
            Event::BlockRemoved(b) => json!({
                "type": "BlockRemoved",
                "block_hashes": b.block_hashes,
                "medium": b.medium.as_str(),
                "group_idx": b.group_idx,
            }),
            Event::AllBlocksCleared => json!({"type": "AllBlocksCleared"}),
        })
        .collect();
    json!({
        "ts_bits": batch.ts.to_bits(),
        "data_parallel_rank": batch.data_parallel_rank,
        "events": events,
    })
}
