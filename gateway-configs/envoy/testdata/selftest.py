#!/usr/bin/env python3
"""Live self-test of the Switchyard Envoy templates (loopback only, ports from the OS).

  ENVOY=/path/to/envoy python3 testdata/selftest.py [--epp-python /venv/bin/python]

Starts small Python HTTP backends, renders the templates with render.sh, runs Envoy
(--concurrency 1) and checks:
  * override_host: the request goes to the endpoint named in the header / metadata,
    retries walk the comma list (503 and refused connections), non-members are skipped,
    an exhausted list falls back to the fallback policy, header+metadata lists concatenate;
  * SSE flows through chunk by chunk;
  * FailClose with the EPP down -> 500; FailOpen with the EPP down -> served by the
    fallback policy, and client-supplied x-gateway-destination-endpoint* headers are gone;
  * with a stand-in EPP (mock_epp.py, needs grpcio in --epp-python): plaintext and TLS
    transports, EPP-chosen endpoint + fallback walked on retry, served endpoint reported
    back to the EPP, client routing headers never reach the EPP, SSE through ext_proc.
Every process started here is stopped before exit.
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.dirname(HERE)
PROCS = []
FAILED = []


def find_envoy():
    if os.environ.get("ENVOY"):
        return os.environ["ENVOY"]
    for cand in (os.path.join(CONF, "../../.venv/bin/envoy"),):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("envoy")


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)
    PROCS.append(p)
    return p


def read_port(p):
    line = p.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError("no port from %r" % p.args)
    return int(line.split()[1])


def backend(status=200, host="127.0.0.1"):
    p = start([sys.executable, os.path.join(HERE, "backend.py"), "--status", str(status), "--host", host])
    return read_port(p)


def refused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here any more: connections are refused
    return port


def render(template, tmp, **env):
    full = dict(os.environ, LISTEN_PORT="0", ADMIN_PORT="0", EPP_HOST="127.0.0.1", EPP_PORT="9")
    full.update({k: str(v) for k, v in env.items()})
    out = subprocess.run(["sh", os.path.join(CONF, "render.sh"), os.path.join(CONF, template)],
                         env=full, check=True, capture_output=True, text=True).stdout
    path = os.path.join(tmp, "rendered-" + os.path.basename(template))
    with open(path, "w") as f:
        f.write(out)
    return path


def envoy(envoy_bin, config, tmp):
    """Run Envoy, return (process, listener port). Real ports come from the admin API."""
    admin_path = os.path.join(tmp, "admin-%d" % len(PROCS))
    p = start([envoy_bin, "-c", config, "--concurrency", "1", "--disable-hot-restart",
               "--admin-address-path", admin_path, "-l", "error",
               "--log-path", os.path.join(tmp, "envoy-%d.log" % len(PROCS))])
    deadline = time.time() + 30
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError("envoy exited with %s" % p.returncode)
        try:
            admin = open(admin_path).read().strip()
            if admin:
                c = http.client.HTTPConnection(admin, timeout=2)
                c.request("GET", "/ready")
                ready = c.getresponse().read().strip() == b"LIVE"
                c.request("GET", "/listeners?format=json")
                ls = json.loads(c.getresponse().read())
                port = ls["listener_statuses"][0]["local_address"]["socket_address"].get("port_value", 0)
                if ready and port:
                    return p, port
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise RuntimeError("envoy not ready")


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def req(port, path, headers=None, body=None, method=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.request(method or ("POST" if body is not None else "GET"), path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        j = json.loads(data)
    except ValueError:
        j = None
    return r.status, {k.lower(): v for k, v in r.getheaders()}, j, data


def check(name, cond, detail):
    print(("PASS " if cond else "FAIL ") + name + "  " + detail)
    if not cond:
        FAILED.append(name)


def sse_times(port, path, headers=None, body=None):
    """Return arrival times (relative) of each SSE event."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
    r = c.getresponse()
    t0, times, buf = time.time(), [], b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            _, buf = buf.split(b"\n\n", 1)
            times.append(round(time.time() - t0, 2))
    c.close()
    return r.status, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epp-python", default=os.environ.get("EPP_PYTHON", sys.executable))
    args = ap.parse_args()
    envoy_bin = find_envoy()
    if not envoy_bin:
        sys.exit("no envoy binary: set ENVOY")
    tmp = tempfile.mkdtemp(prefix="sy-envoy-selftest-")
    try:
        run(envoy_bin, args.epp_python, tmp)
    finally:
        for p in reversed(PROCS):
            stop(p)
        if not os.environ.get("KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n%d check(s) failed: %s" % (len(FAILED), FAILED) if FAILED else "\nall checks passed")
    sys.exit(1 if FAILED else 0)


def eps(*ports):
    """lb_endpoints flow sequence; an int is a 127.0.0.1 port, a tuple is (host, port)."""
    ps = [p if isinstance(p, tuple) else ("127.0.0.1", p) for p in ports]
    return ", ".join('{endpoint: {address: {socket_address: {address: "%s", port_value: %d}}}}' % hp
                     for hp in ps).join("[]")


def run(envoy_bin, epp_python, tmp):
    A, B, C = backend(), backend(), backend()
    F = backend(503)
    R = refused_port()
    V6 = backend(host="::1")
    ip = lambda p: "127.0.0.1:%d" % p
    print("backends: A=%d B=%d C=%d F(503)=%d R(refused)=%d V6=[::1]:%d" % (A, B, C, F, R, V6))

    # ---- override_host without an EPP (test-only client-steered config) ----
    cfg = render("testdata/envoy-client-steered.yaml", tmp, BACKEND_ENDPOINTS=eps(A, B, C, F, R, ("::1", V6)))
    ev, port = envoy(envoy_bin, cfg, tmp)
    H = "x-gateway-destination-endpoint"

    def steer(name, path, hdrs, want_port, want_attempts):
        st, h, j, _ = req(port, path, hdrs)
        got = j and j.get("port")
        check(name, st == 200 and got == want_port and h.get("x-attempts") == str(want_attempts)
              and h.get("x-served-md") == ip(want_port),
              "%s %s -> %s from %s, attempts=%s, served-md=%s" % (path, hdrs, st, got, h.get("x-attempts"), h.get("x-served-md")))

    steer("header picks endpoint", "/hdr/v1/models", {H: ip(B)}, B, 1)
    steer("retry walks list after 503", "/hdr/v1/models", {H: "%s,%s" % (ip(F), ip(B))}, B, 2)
    steer("retry walks list after refused connection", "/hdr/v1/models", {H: "%s, %s" % (ip(R), ip(C))}, C, 2)
    steer("retry walks 3-entry list", "/hdr/v1/models", {H: "%s,%s,%s" % (ip(F), ip(R), ip(A))}, A, 3)
    steer("non-member endpoint skipped", "/hdr/v1/models", {H: "10.255.255.1:9,%s" % ip(B)}, B, 1)
    st, h, j, _ = req(port, "/hdr/v1/models", {H: "%s,[::1]:%d" % (ip(F), V6)})
    check("IPv6 entry in brackets", st == 200 and j["port"] == V6 and h.get("x-served-md") == "[::1]:%d" % V6,
          "%s=%s,[::1]:%d -> %s from %s, served-md=%s" % (H, ip(F), V6, st, j and j["port"], h.get("x-served-md")))
    steer("metadata source picks + walks", "/md/v1/models", {"x-test-lb-metadata": "%s,%s" % (ip(F), ip(C))}, C, 2)
    steer("header+metadata lists concatenate", "/both/v1/models",
          {H: ip(F), "x-test-lb-metadata": ip(A)}, A, 2)
    # Exhausted list: the fallback policy (round robin here) picks; previous_hosts keeps F out.
    st, h, j, _ = req(port, "/hdr/v1/models", {H: ip(F)})
    check("exhausted list -> fallback policy", st == 200 and j["port"] in (A, B, C, V6),
          "only F(503) listed -> %s from %s, attempts=%s" % (st, j and j["port"], h.get("x-attempts")))
    st, h, j, _ = req(port, "/hdr/v1/models")
    check("no header -> fallback policy", st == 200, "-> %s from %s" % (st, j and j["port"]))
    st, times = sse_times(port, "/hdr/sse", {H: ip(A)})
    check("SSE streams chunk by chunk", st == 200 and len(times) == 4 and times[2] - times[0] >= 0.8,
          "event arrival times %s" % times)
    stop(ev)

    pool = eps(A, B, C)
    body = json.dumps({"model": "m", "prompt": "hello"}).encode()
    client_steer = {H: ip(B), H + "-served": ip(B), H + "-subset": ip(B), H + "-fallbacks": ip(B),
                    "X-Gateway-Destination-Endpoint-Evil": ip(B), "content-type": "application/json"}

    # ---- real templates with the EPP down ----
    for tpl, want in (("envoy-plaintext.yaml", "fail"), ("envoy.yaml", "fail"),
                      ("envoy-plaintext-failopen.yaml", "open"), ("envoy-failopen.yaml", "open")):
        cfg = render(tpl, tmp, BACKEND_ENDPOINTS=pool, EPP_PORT=refused_port())
        ev, port = envoy(envoy_bin, cfg, tmp)
        for size in (len(body), 300000):
            b = body if size == len(body) else json.dumps({"model": "m", "prompt": "x" * size}).encode()
            results = [req(port, "/v1/completions", client_steer, b) for _ in range(12)]
            statuses = sorted({r[0] for r in results})
            if want == "fail":
                check("%s EPP down, %d-byte body -> 500" % (tpl, len(b)), statuses == [500],
                      "statuses %s body %r" % (statuses, results[0][3][:60]))
            else:
                served = sorted({r[2]["port"] for r in results if r[2]})
                leaked = sorted({k for r in results if r[2] for k in r[2]["headers"] if k.startswith(H)})
                check("%s EPP down, %d-byte body -> served by fallback" % (tpl, len(b)),
                      statuses == [200] and len(served) > 1 and not leaked,
                      "statuses %s, served by %s (client asked for B=%d), routing headers upstream: %s"
                      % (statuses, served, B, leaked or "none"))
        stop(ev)

    # ---- with a stand-in EPP ----
    try:
        subprocess.run([epp_python, "-c", "import grpc"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        print("SKIP stand-in EPP checks: no grpcio in %s (use --epp-python)" % epp_python)
        return
    cert, key = os.path.join(tmp, "epp.crt"), os.path.join(tmp, "epp.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=epp", "-keyout", key, "-out", cert], check=True, capture_output=True)
    for tpl, tls in (("envoy-plaintext.yaml", False), ("envoy.yaml", True), ("envoy-plaintext-failopen.yaml", False)):
        log = os.path.join(tmp, "epp-%s.log" % tpl)
        cmd = [epp_python, os.path.join(HERE, "mock_epp.py"), "--pick", "%s,%s" % (ip(F), ip(C)), "--log", log]
        if tls:
            cmd += ["--tls", cert, key]
        epp = start(cmd)
        epp_port = read_port(epp)
        cfg = render(tpl, tmp, BACKEND_ENDPOINTS=eps(A, B, C, F), EPP_PORT=epp_port)
        ev, port = envoy(envoy_bin, cfg, tmp)
        st, h, j, _ = req(port, "/v1/completions", client_steer, body)
        recs = [json.loads(x) for x in open(log)]
        seen = {k for r in recs if r["kind"] == "request_headers" for k in r["headers"]}
        served_md = [r.get("metadata", {}).get("envoy.lb", {}).get("x-gateway-destination-endpoint-served")
                     for r in recs if r["kind"] == "response_headers"]
        check("%s EPP picks F,C -> retry lands on C" % tpl,
              st == 200 and j and j["port"] == C and j["request_body_bytes"] == len(body),
              "-> %s from %s (%s body bytes); EPP saw: %s" % (st, j and j["port"], j and j["request_body_bytes"],
                                                            [r["kind"] for r in recs]))
        check("%s client routing headers never reach the EPP or upstream" % tpl,
              not any(k.startswith(H) for k in seen) and j and j["headers"].get(H) == "%s,%s" % (ip(F), ip(C)),
              "EPP saw %s; upstream saw %s=%r" % (sorted(k for k in seen if "gateway" in k) or "no x-gateway-* header",
                                                  H, j and j["headers"].get(H)))
        check("%s served endpoint reported to the EPP" % tpl, ip(C) in served_md,
              "response_headers metadata envoy.lb/x-gateway-destination-endpoint-served = %s" % served_md)
        big = json.dumps({"model": "m", "prompt": "y" * (3 << 20)}).encode()
        st, h, j, _ = req(port, "/v1/completions", {"content-type": "application/json"}, big)
        check("%s 3 MiB body, EPP picks F,C -> retry carries the whole body to C" % tpl,
              st == 200 and j and j["port"] == C and j["request_body_bytes"] == len(big),
              "-> %s from %s, %s of %d body bytes" % (st, j and j["port"], j and j["request_body_bytes"], len(big)))
        st, times = sse_times(port, "/sse", {"content-type": "application/json"},
                              json.dumps({"model": "m", "prompt": "p", "stream": True}).encode())
        check("%s SSE through ext_proc chunk by chunk" % tpl,
              st == 200 and len(times) == 4 and times[2] - times[0] >= 0.8, "event arrival times %s" % times)
        stop(ev)
        stop(epp)

    # ---- EPP dies while Envoy runs, then comes back on the same port ----
    for tpl, down in (("envoy-plaintext.yaml", 500), ("envoy-plaintext-failopen.yaml", 200)):
        log = os.path.join(tmp, "epp-restart-%s.log" % tpl)
        cmd = [epp_python, os.path.join(HERE, "mock_epp.py"), "--pick", ip(A), "--log", log]
        epp = start(cmd)
        epp_port = read_port(epp)
        cfg = render(tpl, tmp, BACKEND_ENDPOINTS=pool, EPP_PORT=epp_port)
        ev, port = envoy(envoy_bin, cfg, tmp)
        before = req(port, "/v1/completions", {}, body)
        stop(epp)
        timeline = poll(port, body, down, 5, "kill")
        epp = start(cmd + ["--port", str(epp_port)])
        read_port(epp)
        timeline += poll(port, body, "200 via EPP", 5, "restart")
        check("%s EPP killed -> %d, restarted -> EPP routes again" % (tpl, down),
              before[0] == 200 and before[2]["port"] == A and timeline[-1][1] == "200 via EPP"
              and any(s == down for _, s, _ in timeline),
              "timeline (s since kill/restart, outcome, phase): %s" % timeline)
        stop(ev)
        stop(epp)


def poll(port, body, want, limit, phase):
    """Send a request every 0.1 s until the outcome is `want` for 0.5 s; return the changes.
    Outcomes: an HTTP status, or "200 via EPP" when the upstream got the EPP's header."""
    t0, out, since = time.time(), [], None
    while time.time() - t0 < limit:
        st, _, j, _ = req(port, "/v1/completions", {}, body)
        if st == 200 and j and j["headers"].get("x-gateway-destination-endpoint"):
            st = "200 via EPP"
        t = round(time.time() - t0, 1)
        if not out or out[-1][1] != st:
            out.append((t, st, phase))
        if st == want:
            since = since or time.time()
            if time.time() - since > 0.5:
                break
        else:
            since = None
        time.sleep(0.1)
    return out


if __name__ == "__main__":
    main()
