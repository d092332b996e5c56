//! The `bbr` binary refuses bad start-up input with exit code 2 and a message naming it,
//! before binding any port.

// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Runs `bbr` on loopback (should a check regress and the binary start, it binds nothing
/// outside the machine) and waits for its exit, 20 s at most.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bbr"));
    command
        .arg("--bind-address=127.0.0.1")
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent");
    testkit::process::exit_within(command, std::time::Duration::from_secs(20))
}

#[test]
fn bad_start_up_input_is_refused_by_name() {
    let (code, err) = run(&["--plugin", "body-field-to-header:x"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--plugin"), "{err}");

    let (code, err) = run(&[
        "--mapping-file",
        "/nonexistent/mapping.yaml",
        "--metrics-endpoint-auth=false",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("reading --mapping-file"), "{err}");

    let (code, err) = run(&["--grpc-port", "9100", "--metrics-port", "9100"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must all differ"), "{err}");

    // BUFFERED mode could never carry such a body in one gRPC message.
    let (code, err) = run(&["--streaming=false", "--max-request-body-bytes=100000000"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-request-body-bytes"), "{err}");

    let (code, err) = run(&["--secure-serving=false", "--client-ca-path=/ca.pem"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--client-ca-path"), "{err}");

    let (code, err) = run(&["--mapping-file-poll-interval", "2s"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("add --mapping-file"), "{err}");

    // File mode with /metrics auth on needs a token.
    let dir = std::env::temp_dir().join(format!("bbr-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.yaml");
    std::fs::write(&path, "mappings: []\n").unwrap();
    let (code, err) = run(&["--mapping-file", path.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--metrics-bearer-token-file"), "{err}");
    // A token file whose token no header can carry stops start-up, naming the flag.
    let token = dir.join("token");
    std::fs::write(&token, "s3 cret\n").unwrap();
    let (code, err) = run(&[
        "--mapping-file",
        path.to_str().unwrap(),
        "--metrics-bearer-token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--metrics-bearer-token-file"), "{err}");
    // A client CA bundle that cannot be read stops start-up, naming the flag.
    let (code, err) = run(&[
        "--mapping-file",
        path.to_str().unwrap(),
        "--metrics-endpoint-auth=false",
        "--client-ca-path=/nonexistent/ca.pem",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("loading --client-ca-path"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
