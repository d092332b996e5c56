//! The `epp` binary: bad configuration fails before any port is bound; a good one serves and
//! drains on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const EPP: &str = env!("CARGO_BIN_EXE_epp");

/// Writes `contents` to `name` in this process's temporary directory, whole: written beside it
/// and renamed into place, so that a test reading the file (through an `epp` child) never sees
/// it truncated by another test writing the same name in parallel.
fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("switchyard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = dir.join(format!(".{name}.{n}.partial"));
    std::fs::write(&partial, contents).unwrap();
    std::fs::rename(&partial, &path).unwrap();
    path
}

const POOL: &str = "pool:\n  metadata: {name: p}\n  spec:\n    selector: {matchLabels: {app: x}}\n    targetPorts: [{number: 8000}]\nendpoints:\n- {name: a, address: 127.0.0.1, labels: {app: x}}\n";

/// `epp` on loopback (should a check regress and it start, it binds nothing outside the
/// machine), killed when the test lets go of it.
fn epp_command() -> Command {
    let mut command = Command::new(EPP);
    command
        .arg("--bind-address=127.0.0.1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `command` to its exit, 20 s at most; returns (exit code, stderr).
async fn exit_of(mut command: Command) -> (i32, String) {
    let out = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("epp exits in time")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut command = epp_command();
    command.args(args);
    exit_of(command).await
}

#[tokio::test]
async fn lora_placement_and_its_filter_go_together() {
    let pool = temp_file("pool-lora.yaml", POOL);
    let catalogue = temp_file(
        "catalogue.yaml",
        "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: a, source: org/a}\n",
    );
    let filter = "--config-text=apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: lora-adapter-filter\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: lora-adapter-filter\n  - pluginRef: queue-scorer\n";
    let placement = format!("--lora-placement-config={}", catalogue.display());
    let pool = format!("--pool-file={}", pool.display());
    for (args, needle) in [
        (
            vec![placement.as_str()],
            "needs a scheduling profile with lora-adapter-filter",
        ),
        (
            vec![filter],
            "lora-adapter-filter needs --lora-placement-config",
        ),
        (
            vec!["--lora-placement-interval=1s"],
            "--lora-placement-config",
        ),
        (
            vec![placement.as_str(), filter, "--lora-placement-band=3"],
            "--lora-placement-band",
        ),
        (
            vec!["--lora-placement-api-key-file=/etc/hostname"],
            "--lora-placement-config",
        ),
        (
            vec![
                placement.as_str(),
                filter,
                "--lora-placement-api-key-file=/nonexistent/key",
            ],
            "--lora-placement-api-key-file",
        ),
    ] {
        let mut argv = vec![pool.as_str(), "--secure-serving=false"];
        argv.extend(args);
        let (code, stderr) = run_to_exit(&argv).await;
        assert_eq!(code, 2, "{argv:?}: {stderr}");
        assert!(stderr.contains(needle), "{argv:?}: {stderr}");
    }
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
    let auth_cases: [(&[&str], &str); 6] = [
        (
            &[
                "--metrics-endpoint-auth=false",
                "--secure-serving=false",
                "--client-ca-path=/ca.pem",
            ],
            "--client-ca-path verifies the gateway's certificate",
        ),
        // A budget for all bodies together smaller than one body could never gather it.
        (
            &[
                "--metrics-endpoint-auth=false",
                "--max-request-body-bytes=2000",
                "--max-gathered-request-bytes=1000",
            ],
            "is below --max-request-body-bytes=2000",
        ),
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
        // Scraped less often than metrics go stale: every endpoint would look stale.
        (
            &[
                "--metrics-endpoint-auth=false",
                "--refresh-metrics-interval=500ms",
            ],
            "metricsStalenessThreshold",
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
    // Flags that would do nothing fail start-up, naming themselves.
    let cert_dir = temp_file("unused", "").parent().unwrap().to_owned();
    let cert_dir = format!("--cert-path={}", cert_dir.display());
    let inert_cases: [(&[&str], &str); 5] = [
        (&["--enable-cert-reload"], "--enable-cert-reload reloads"),
        (
            &["--enable-cert-reload", &cert_dir, "--secure-serving=false"],
            "--enable-cert-reload reloads",
        ),
        (
            &[&cert_dir, "--secure-serving=false"],
            "--cert-path is the ext_proc port's TLS certificate",
        ),
        // The pool file says where the pool is: flags saying otherwise are refused.
        (
            &["--pool-namespace=prod"],
            "--pool-namespace=\"prod\" does not match the pool file's namespace",
        ),
        (&["--pool-group=x-k8s.io"], "--pool-group=\"x-k8s.io\""),
    ];
    for (extra, needle) in inert_cases {
        let mut args = vec![
            "--pool-file",
            pool,
            "--grpc-port",
            &port,
            "--metrics-endpoint-auth=false",
        ];
        args.extend_from_slice(extra);
        let (code, stderr) = run_to_exit(&args).await;
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        assert!(
            !stderr.contains("binding"),
            "validated after binding: {stderr}"
        );
    }
    let (code, stderr) = run_to_exit(&[
        "--pool-name=p",
        "--pool-file-poll-interval=2s",
        "--metrics-endpoint-auth=false",
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--pool-file-poll-interval is how often --pool-file is read"),
        "{stderr}"
    );
    let (code, stderr) = run_to_exit(&["--model-server-metrics-scheme=ftp"]).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--model-server-metrics-scheme") && stderr.contains("http or https"),
        "{stderr}"
    );
    // Verification against a system store that holds nothing usable fails start-up.
    let empty = temp_file("empty.pem", "");
    let mut command = epp_command();
    command
        .args(["--pool-file", pool, "--grpc-port", &port])
        .args([
            "--metrics-endpoint-auth=false",
            "--model-server-metrics-scheme=https",
            "--model-server-metrics-https-insecure-skip-verify=false",
        ])
        .env("SSL_CERT_FILE", &empty)
        .env_remove("SSL_CERT_DIR");
    let (code, stderr) = exit_of(command).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("insecureSkipVerify false") && stderr.contains("system trust store"),
        "{stderr}"
    );
    drop(held);
}

/// A token in the environment and a token file: start-up fails naming both sources.
#[tokio::test]
async fn two_metrics_tokens_are_refused_naming_the_variable() {
    let pool = temp_file("pool-tokens.yaml", POOL);
    let token = temp_file("token-two", "s3cret\n");
    let mut command = epp_command();
    command
        .args(["--pool-file", pool.to_str().unwrap(), "--grpc-port=0"])
        .args(["--metrics-bearer-token-file", token.to_str().unwrap()])
        .env("SWITCHYARD_METRICS_TOKEN", "other");
    let (code, stderr) = exit_of(command).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("SWITCHYARD_METRICS_TOKEN")
            && stderr.contains("--metrics-bearer-token-file"),
        "{stderr}"
    );
}

/// A token in the environment that no `Authorization` header can carry (a space inside) stops
/// start-up naming the variable, instead of a port that answers every scrape 401.
#[tokio::test]
async fn a_metrics_token_no_header_can_carry_is_refused_naming_its_source() {
    let pool = temp_file("pool-token-space.yaml", POOL);
    let mut command = epp_command();
    command
        .args(["--pool-file", pool.to_str().unwrap(), "--grpc-port=0"])
        .env("SWITCHYARD_METRICS_TOKEN", "s3 cret");
    let (code, stderr) = exit_of(command).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("SWITCHYARD_METRICS_TOKEN"), "{stderr}");
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
        .args([
            "--zap-encoder=json",
            "--drain-grace-period=2s",
            "--shutdown-delay=1h",
        ])
        // Empty counts as unset: the file's token is the one (clap once called this a
        // conflict with a flag nobody passed).
        .env("SWITCHYARD_METRICS_TOKEN", "")
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
    let pid = child.id().unwrap();
    // The first SIGTERM starts the shutdown delay (not ready, still serving); the second
    // cuts it short, and the EPP drains and exits.
    testkit::process::sigterm(pid);
    until_logged(&mut lines, "still serving for --shutdown-delay").await;
    testkit::process::sigterm(pid);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("drains in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A TLS server answering every request with vLLM metrics (queue 6), with a self-signed
/// certificate for 127.0.0.1 (returned as PEM).
async fn tls_metrics_server() -> (std::net::SocketAddr, String) {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {
                    let body = "vllm:num_requests_waiting 6\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.25\n";
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tls.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, ck.cert.pem())
}

#[tokio::test]
async fn worker_threads_sets_the_runtimes_threads() {
    let pool = temp_file("pool.yaml", POOL);
    let pool = pool.to_str().unwrap();
    for (threads, want) in [("1", 1), ("3", 3)] {
        let (_child, started) = start_epp_logged(
            &["--pool-file", pool, &format!("--worker-threads={threads}")],
            &[],
        )
        .await;
        // The runtime's own count (its blocking threads carry the same name, so /proc cannot
        // tell them apart).
        assert_eq!(
            started["worker_threads"], want,
            "--worker-threads={threads}"
        );
    }
}

/// Starts the EPP on OS-chosen ports with an open metrics port and plaintext ext_proc (unless
/// `args` say otherwise); returns it with its ext_proc and metrics addresses.
async fn start_epp_at(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let (child, v) = start_epp_logged(args, env).await;
    let metrics = v["metrics"].as_str().unwrap().parse().unwrap();
    let grpc = v["grpc"].as_str().unwrap().parse().unwrap();
    (child, grpc, metrics)
}

/// A started `epp` and its start-up log line (JSON, fields at the top level).
async fn start_epp_logged(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (tokio::process::Child, serde_json::Value) {
    let (child, started, _) = start_epp_with_log(args, env).await;
    (child, started)
}

/// A started `epp`, its start-up log line and the lines logged before it.
async fn start_epp_with_log(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (tokio::process::Child, serde_json::Value, Vec<String>) {
    let (child, mut lines, started, before) = spawn_epp(args, env).await;
    // Keep reading stderr so that the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, started, before)
}

type LogLines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// A started `epp`, the rest of its log (to be read on), its start-up line and the lines
/// logged before it.
async fn spawn_epp(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (
    tokio::process::Child,
    LogLines,
    serde_json::Value,
    Vec<String>,
) {
    let mut command = Command::new(EPP);
    command
        .args([
            "--bind-address=127.0.0.1",
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
            "--zap-encoder=json",
            // Routing draws from a seeded RNG: a failing run can be replayed.
            "--seed=11",
        ])
        // After the defaults: the last value of a flag wins.
        .args(args)
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut before = Vec::new();
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("switchyard epp starting") {
                return line;
            }
            before.push(line);
        }
        panic!("epp exited before starting");
    })
    .await
    .expect("start-up line");
    let v: serde_json::Value = serde_json::from_str(&started).expect("json log line");
    (child, lines, v, before)
}

/// Reads `lines` until one contains `what` (within 10 s).
async fn until_logged(lines: &mut LogLines, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(what) {
                return;
            }
        }
        panic!("epp exited before logging {what:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("{what:?} not logged in time"));
}

/// The first signal starts the shutdown delay, the second the drain, and a third ends the
/// process at once (143, as a shell reports SIGTERM) though a stream still holds the drain.
#[tokio::test]
async fn a_third_signal_ends_the_drain_at_once() {
    let pool = temp_file("pool-third.yaml", POOL);
    let args = [
        "--pool-file",
        pool.to_str().unwrap(),
        "--drain-grace-period=1h",
        "--shutdown-delay=1h",
    ];
    let (mut child, mut lines, started, _) = spawn_epp(&args, &[]).await;
    let grpc: std::net::SocketAddr = started["grpc"].as_str().unwrap().parse().unwrap();
    // An ext_proc stream left open: the drain waits for it.
    let held = testkit::Stream::open(grpc).await;
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
    ];
    held.send(testkit::req_headers(&headers, false, None)).await;
    let pid = child.id().unwrap();
    // Each signal is sent once the last one is acted on: a signal arriving before its
    // handler ran again would be merged with it.
    testkit::process::sigterm(pid);
    until_logged(&mut lines, "still serving for --shutdown-delay").await;
    testkit::process::sigterm(pid);
    until_logged(&mut lines, "draining open streams").await;
    testkit::process::sigterm(pid);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits at once")
        .unwrap();
    assert_eq!(exit.code(), Some(143), "{exit:?}");
    drop(held);
}

/// Profiling on an open admin port is allowed (the reference's charts may run so) but
/// warned about at start-up; with profiling off, or the port guarded, nothing is said.
#[tokio::test]
async fn pprof_on_an_open_admin_port_is_warned_about() {
    let pool = temp_file("pool-pprof.yaml", POOL);
    let pool = pool.to_str().unwrap();
    let warned = |before: &[String]| {
        before
            .iter()
            .any(|l| l.to_ascii_lowercase().contains("warn") && l.contains("--enable-pprof"))
    };
    let (_child, _, before) = start_epp_with_log(&["--pool-file", pool], &[]).await;
    assert!(warned(&before), "{before:#?}");
    let (_child, _, before) =
        start_epp_with_log(&["--pool-file", pool, "--enable-pprof=false"], &[]).await;
    // Started (its start-up line was read), and said nothing of profiling.
    assert!(!warned(&before), "{before:#?}");
}

async fn start_epp(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (tokio::process::Child, std::net::SocketAddr) {
    let (child, _, metrics) = start_epp_at(args, env).await;
    (child, metrics)
}

/// The certificate a new TLS connection to `addr` is given (not verified: only looked at).
async fn served_certificate(addr: std::net::SocketAddr) -> Vec<u8> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct Any;
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(Any))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn enable_cert_reload_serves_a_replaced_certificate() {
    use rustls::pki_types::pem::PemObject;
    let der = |pem: &str| {
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    let (a, b) = (
        epp::tls::self_signed().unwrap(),
        epp::tls::self_signed().unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("switchyard-cli-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &a.key_pem).unwrap();
    let pool = temp_file("pool-reload.yaml", POOL);
    let cert_path = format!("--cert-path={}", dir.display());
    let (_epp, grpc, _) = start_epp_at(
        &[
            "--pool-file",
            pool.to_str().unwrap(),
            "--secure-serving",
            &cert_path,
            "--enable-cert-reload",
        ],
        &[],
    )
    .await;
    assert_eq!(served_certificate(grpc).await, der(&a.cert_pem));
    // Key first, then certificate, each replaced by a rename: in between the pair does not
    // match and is refused; the whole new pair is then taken.
    for (name, pem) in [("tls.key", &b.key_pem), ("tls.crt", &b.cert_pem)] {
        std::fs::write(dir.join("next"), pem).unwrap();
        std::fs::rename(dir.join("next"), dir.join(name)).unwrap();
    }
    // The binary re-reads the files every second; new connections must get B within a bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while served_certificate(grpc).await != der(&b.cert_pem) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections never got the replaced certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `/metrics` (bounded) until a line satisfies `want`.
async fn until_metrics(metrics: std::net::SocketAddr, what: &str, want: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = testkit::http::get_with(metrics, "/metrics", &[]).await;
        if text.lines().any(&want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never showed in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn https_scraping_follows_the_flags_and_the_metrics_data_source_plugin() {
    let (server, cert_pem) = tls_metrics_server().await;
    let pool = temp_file(
        "pool-https.yaml",
        &format!(
            "pool:\n  metadata: {{name: p}}\n  spec:\n    selector: {{matchLabels: {{app: x}}}}\n    targetPorts: [{{number: {}}}]\nendpoints:\n- {{name: a, address: 127.0.0.1, labels: {{app: x}}}}\n",
            server.port()
        ),
    );
    let pool = pool.to_str().unwrap();
    let server_cert = temp_file("server-ca.pem", &cert_pem);
    let other_cert = temp_file(
        "other-ca.pem",
        &rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .cert
            .pem(),
    );
    let scraped =
        |l: &str| l.starts_with("inference_pool_per_pod_queue_size{") && l.ends_with(" 6");
    let tls_errors = |l: &str| {
        l.starts_with("inference_extension_model_server_scrape_errors_total{")
            && l.contains("reason=\"tls\"")
    };
    let https = "--model-server-metrics-scheme=https";
    let verify = "--model-server-metrics-https-insecure-skip-verify=false";

    // https, certificates not checked (the default): the self-signed server is scraped.
    let (_epp, metrics) = start_epp(&["--pool-file", pool, https], &[]).await;
    until_metrics(metrics, "a scrape over https", scraped).await;

    // Verified against a trust store without the server's certificate: TLS scrape errors.
    let (_epp, metrics) = start_epp(
        &["--pool-file", pool, https, verify],
        &[("SSL_CERT_FILE", &other_cert)],
    )
    .await;
    until_metrics(metrics, "a tls scrape error", tls_errors).await;

    // Verified against a trust store holding it: scraped.
    let (_epp, metrics) = start_epp(
        &["--pool-file", pool, https, verify],
        &[("SSL_CERT_FILE", &server_cert)],
    )
    .await;
    until_metrics(metrics, "a verified scrape", scraped).await;

    // The plugin's parameters win over the flags: scheme https over the flag's http, and
    // insecureSkipVerify true over the flag's false.
    let config = "--config-text=apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: metrics-data-source\n  parameters: {scheme: https, insecureSkipVerify: true}\n";
    let (_epp, metrics) = start_epp(
        &[
            "--pool-file",
            pool,
            "--model-server-metrics-scheme=http",
            verify,
            config,
        ],
        &[("SSL_CERT_FILE", &other_cert)],
    )
    .await;
    until_metrics(metrics, "a scrape configured by the plugin", scraped).await;
}
