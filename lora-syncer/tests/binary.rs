//! The `lora-syncer` binary: a bad flag stops start-up (exit code 2, the flag named); a
//! missing or invalid config file does not. A native sidecar that exits keeps its engine's pod
//! from being ready, so the syncer stays up instead, says what is wrong (log, /metrics) and
//! starts loading adapters once the file is fixed.

// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `lora-syncer` on loopback (it binds nothing outside the machine), without the
/// environment's config path, key or log filter.
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-syncer"));
    command
        .arg("--bind-address=127.0.0.1")
        .args(args)
        .env_remove("DYNAMIC_LORA_ROLLOUT_CONFIG")
        .env_remove("VLLM_API_KEY")
        .env_remove("RUST_LOG");
    command
}

/// Runs `lora-syncer` and waits for its exit, 20 s at most.
fn run(args: &[&str]) -> (Option<i32>, String) {
    testkit::process::exit_within(command(args), Duration::from_secs(20))
}

#[test]
fn bad_flags_stop_start_up() {
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
    // An engine that makes no URL.
    for flag in [
        "--engine-host=",
        "--engine-host=evil/path",
        "--engine-host=vllm:8000",
        "--engine-host=[vllm]",
        "--engine-port=0",
    ] {
        let (code, err) = run(&[flag, "--metrics-port=0"]);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(
            err.contains(flag.split('=').next().unwrap()),
            "{flag}: {err}"
        );
    }
    // Where the key may go when the file's host is followed: nothing without following it.
    let (code, err) = run(&["--api-key-to-config-host", "--metrics-port=0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("add --allow-config-host"), "{err}");
}

/// A running syncer (killed when dropped) and its /metrics address.
struct Syncer {
    child: Child,
    metrics: SocketAddr,
}

impl Syncer {
    /// Starts it and reads its log until the start-up line, which gives the metrics port the
    /// OS chose (20 s at most).
    fn start(args: &[&str]) -> Self {
        let mut child = command(args)
            .arg("--metrics-port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (lines, read) = std::sync::mpsc::channel();
        // Read to the end, on a thread: a child that fills the pipe would block.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let started = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match read.recv_timeout(left) {
                Ok(line) if line.contains("switchyard lora-syncer starting") => break line,
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("no start-up line: {e}");
                }
            }
        };
        let v: serde_json::Value = serde_json::from_str(&started).expect("a JSON log line");
        let metrics = v["metrics"]
            .as_str()
            .expect("metrics address")
            .parse()
            .unwrap();
        Self { child, metrics }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn metrics(&self) -> String {
        testkit::http::get_text(self.metrics, "/metrics")
            .await
            .unwrap_or_default()
    }

    /// Scrapes /metrics until it contains every one of `lines`, 20 s at most.
    async fn until_metrics(&mut self, lines: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(self.running(), "the syncer exited");
            let text = self.metrics().await;
            if lines.iter().all(|l| text.contains(l)) {
                return;
            }
            assert!(Instant::now() < deadline, "never {lines:?} in:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `path`'s contents at once (as the kubelet swaps a ConfigMap volume's files).
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Missing, then invalid, then valid: the syncer stays up throughout, counts each distinct
/// error on /metrics, and loads the adapter once the file is good.
#[tokio::test]
async fn a_missing_or_invalid_config_at_start_is_waited_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = sim::spawn_replica(sim::Config::fast(), listener, 0)
        .await
        .unwrap();
    let port = sim.addr().port().to_string();
    let dir = std::env::temp_dir().join(format!("lora-syncer-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("configmap.yaml");

    let mut syncer = Syncer::start(&[
        "--config",
        path.to_str().unwrap(),
        "--engine-host=127.0.0.1",
        "--engine-port",
        &port,
        "--config-poll-interval=0.1",
        "--health-check-interval=0.1",
        "--reconcile-trigger=0.5",
    ]);
    syncer
        .until_metrics(&[
            r#"lora_syncer_config_reloads_total{result="error"} 1"#,
            "lora_syncer_config_valid 0",
        ])
        .await;

    write_atomically(&path, "vLLMLoRAConfig:\n  ensureExst: {}\n");
    syncer
        .until_metrics(&[r#"lora_syncer_config_reloads_total{result="error"} 2"#])
        .await;
    assert!(!sim.engine().has_lora("food-review"));

    write_atomically(
        &path,
        &format!(
            "vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: {port}\n  ensureExist:\n    models:\n    - {{id: food-review, source: org/food-review}}\n"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sim.engine().has_lora("food-review") {
        assert!(syncer.running(), "the syncer exited");
        assert!(Instant::now() < deadline, "never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    syncer
        .until_metrics(&[
            r#"lora_syncer_config_reloads_total{result="ok"} 1"#,
            "lora_syncer_config_valid 1",
            r#"lora_syncer_adapter_status{adapter_name="food-review"} 1"#,
        ])
        .await;
    drop(syncer);
    std::fs::remove_dir_all(&dir).unwrap();
}
