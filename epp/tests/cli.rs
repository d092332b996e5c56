//! The `epp` binary: bad configuration fails before any port is bound; a good one serves and
//! drains on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const EPP: &str = env!("CARGO_BIN_EXE_epp");

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

const POOL: &str = "pool:\n  metadata: {name: p}\n  spec:\n    selector: {matchLabels: {app: x}}\n    targetPorts: [{number: 8000}]\nendpoints:\n- {name: a, address: 127.0.0.1, labels: {app: x}}\n";

async fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(EPP).args(args).stdin(Stdio::null()).output(),
    )
    .await
    .expect("epp exits in time")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_config_fails_before_binding_any_port() {
    // Hold the port the EPP would bind: if it bound before validating, it would report a bind
    // error instead of the configuration problem.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let pool = temp_file("pool.yaml", POOL);
    let pool = pool.to_str().unwrap();
    let cases = [
        (
            "--config-text=apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: warp-drive-scorer\n",
            "unknown type \"warp-drive-scorer\"",
        ),
        (
            "--config-text=apiVersion: v9\nkind: EndpointPickerConfig\n",
            "unsupported apiVersion",
        ),
        (
            "--config-text=apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: -2}\n",
            "maxNumOfEndpoints",
        ),
    ];
    for (config, needle) in cases {
        let (code, stderr) = run_to_exit(&[
            "--pool-file",
            pool,
            "--bind-address=127.0.0.1",
            "--grpc-port",
            &port,
            config,
        ])
        .await;
        assert_ne!(code, 0);
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        assert!(
            !stderr.contains("binding"),
            "validated after binding: {stderr}"
        );
    }
    let (code, stderr) = run_to_exit(&[
        "--pool-file",
        "/nonexistent/pool.yaml",
        "--grpc-port",
        &port,
    ])
    .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("pool"), "{stderr}");
    // Metrics auth: on by default, so local mode needs a token, and a token needs it on.
    let auth_cases: [(&[&str], &str); 3] = [
        (
            &[],
            "--metrics-endpoint-auth (default true) needs --metrics-bearer-token",
        ),
        (
            &["--metrics-endpoint-auth=false", "--metrics-bearer-token=t"],
            "leaves /metrics open",
        ),
        (
            &["--metrics-endpoint-auth=false", "--debug-decisions=5"],
            "add --debug-pool",
        ),
    ];
    for (extra, needle) in auth_cases {
        let mut args = vec!["--pool-file", pool, "--grpc-port", &port];
        args.extend_from_slice(extra);
        let (code, stderr) = run_to_exit(&args).await;
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
    let (code, stderr) = run_to_exit(&["--refresh-metrics-interval=sometimes"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid duration"), "{stderr}");
    drop(held);
}

#[tokio::test]
async fn serves_then_drains_on_sigterm() {
    let pool = temp_file("pool2.yaml", POOL);
    let token = temp_file("token", "s3cret\n");
    let mut child = Command::new(EPP)
        .args([
            "--pool-file",
            pool.to_str().unwrap(),
            "--bind-address=127.0.0.1",
            "--metrics-bearer-token-file",
            token.to_str().unwrap(),
        ])
        .args([
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--secure-serving=false",
        ])
        .args(["--zap-encoder=json", "--drain-grace-period=2s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("switchyard epp starting") {
                return line;
            }
        }
        panic!("epp exited before starting");
    })
    .await
    .expect("start-up line");
    let v: serde_json::Value = serde_json::from_str(&started).expect("json log line");
    let metrics: std::net::SocketAddr = v["metrics"].as_str().unwrap().parse().unwrap();
    // The metrics port answers a reader with the token (from the file, newline ignored) only;
    // /debug/pool is not served without --debug-pool.
    use testkit::http::get_with;
    assert_eq!(get_with(metrics, "/metrics", &[]).await.0, 401);
    let bearer = [("authorization", "Bearer s3cret")];
    let (status, text) = get_with(metrics, "/metrics", &bearer).await;
    assert_eq!(status, 200);
    assert!(text.contains("inference_extension_info"));
    assert_eq!(get_with(metrics, "/debug/pool", &bearer).await.0, 404);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("drains in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
