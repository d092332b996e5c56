//! Binaries run to their exit, bounded in time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `command` (stdin closed, stderr captured) until it exits, `within` at most; returns
/// its exit code and stderr. Panics, having killed it, if it is still running then: a binary
/// that should have refused its input started instead, and the test must not hang on it.
pub fn exit_within(mut command: Command, within: Duration) -> (Option<i32>, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the binary");
    // Read on a thread: a child that fills the pipe would otherwise never exit.
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the binary") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {within:?}: {}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().unwrap_or_default())
}

/// Sends SIGTERM to process `pid` (with `kill`, as an orchestrator stops a pod) and checks it
/// was delivered.
pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM {pid}: {status}");
}
