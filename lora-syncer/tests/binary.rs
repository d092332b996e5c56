//! The `lora-syncer` binary refuses a missing or invalid config at start-up (exit code 2, the
//! reason named) rather than running with nothing to do.

// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Runs `lora-syncer` on loopback (should a check regress and the binary start, it binds
/// nothing outside the machine) and waits for its exit, 20 s at most.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-syncer"));
    command
        .arg("--bind-address=127.0.0.1")
        .args(args)
        .env_remove("DYNAMIC_LORA_ROLLOUT_CONFIG")
        .env_remove("VLLM_API_KEY");
    testkit::process::exit_within(command, std::time::Duration::from_secs(20))
}

#[test]
fn a_missing_or_invalid_config_stops_start_up() {
    let (code, err) = run(&[
        "--config",
        "/nonexistent/configmap.yaml",
        "--metrics-port",
        "0",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("reading --config"), "{err}");

    let dir = std::env::temp_dir().join(format!("lora-syncer-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("configmap.yaml");
    std::fs::write(&path, "vLLMLoRAConfig:\n  ensureExst: {}\n").unwrap();
    let (code, err) = run(&["--config", path.to_str().unwrap(), "--metrics-port", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown key"), "{err}");

    let (code, err) = run(&["--reconcile-trigger=0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--reconcile-trigger"), "{err}");
    // A busy loop is not an interval.
    let (code, err) = run(&["--config-poll-interval=1e-9"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("[0.1, 86400]"), "{err}");
    // A key that cannot go into a header.
    for key in ["--api-key=", "--api-key=a b"] {
        let (code, err) = run(&[key]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("--api-key"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
