#!/usr/bin/env bash
# A controlled A/B of the `epp`'s CPU per request: one Envoy (a template of
# gateway-configs/envoy/), one fixed backend (`scenario backend`), and the `epp` restarted for
# each variant in turn, rounds interleaved. Requests go one at a time (completions with a
# SIZE-byte prompt, one output token); the EPP's CPU comes from /proc/<pid>/task/*/schedstat
# and its minor page faults from /proc/<pid>/stat, over N requests after 20 warm-up ones; the
# client's latency p50 / p99 over the same requests (the whole request through Envoy: compare
# variants with it, it is not the EPP's share).
#
#   bench/epp-ab.sh TEMPLATE ROUNDS N SIZE VARIANT...
#   VARIANT = NAME|ENV...   (environment for that variant's epp, e.g. "glibc|X=1" or
#             "tuned|GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4194304"), or
#             NAME|ENV...|EPP_BINARY to compare two builds.
#
# Needs `cargo build --release -p epp -p bench` and `make envoy`. Real time: serialize it with
# any other benchmark (the bench's runs use `flock /work/bench.lock`).
# TOKENS=N (environment) streams answers of N SSE events instead of one token. PERF=FILE
# records the measured requests of every variant with `perf record -g` into
# FILE.<round>.<variant> (needs perf). A fail-open template cannot be measured here: Envoy
# fails open until it has health-checked each freshly started epp, so most requests would
# not reach it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REL=$ROOT/target/release
ENVOY=${ENVOY:-$(ls "$ROOT"/.venv/lib/python3*/site-packages/envoy/_bin/envoy | head -1)}
TEMPLATE=$1 ROUNDS=$2 N=$3 SIZE=$4 TOKENS=${TOKENS:-1} PERF=${PERF:-}
shift 4
DIR=$(mktemp -d /tmp/epp-ab.XXXXXX)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
LISTEN=$(port) ADMIN=$(port) GRPC=$(port) HEALTH=$(port) METRICS=$(port)

"$REL/scenario" backend --ports 1 > "$DIR/backend.out" 2>&1 &
PIDS=($!)
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q http "$DIR/backend.out" && break; sleep 0.1; done
ADDR=$(grep -o 'http://[0-9.:]*' "$DIR/backend.out" | head -1 | sed 's|http://||')
BIP=${ADDR%:*} BPORT=${ADDR#*:}
cat > "$DIR/pool.yaml" <<POOL
pool:
  apiVersion: inference.networking.k8s.io/v1
  kind: InferencePool
  metadata: {name: ab-pool, namespace: default}
  spec:
    selector: {matchLabels: {app: sim}}
    targetPorts: [{number: 8000}]
    appProtocol: http
endpoints:
- {name: sim-0, address: $BIP, ports: [$BPORT], labels: {app: sim, inference.networking.k8s.io/engine-type: vllm}}
POOL
sed -e "s/\${LISTEN_PORT}/$LISTEN/; s/\${ADMIN_PORT}/$ADMIN/; s/\${EPP_HOST}/127.0.0.1/; s/\${EPP_PORT}/$GRPC/" \
    -e "s|\${BACKEND_ENDPOINTS}|[{endpoint: {address: {socket_address: {address: \"$BIP\", port_value: $BPORT}}}}]|" \
    "$TEMPLATE" > "$DIR/envoy.yaml"
"$ENVOY" -c "$DIR/envoy.yaml" --concurrency 2 -l error > "$DIR/envoy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN/ready" > /dev/null && break; sleep 0.1; done

send() { # send COUNT [RETRIES]: COUNT completions, one at a time; a failure is retried
  # RETRIES times, 0.1 s apart (the warm-up's, while Envoy first health-checks a new epp).
  # Prints the latency p50 and p99 in µs (of the successful tries).
  python3 - "http://127.0.0.1:$LISTEN" "$1" "$SIZE" "${2:-0}" "$TOKENS" <<'PY'
import http.client, json, sys, time, urllib.parse
url, n, size, retries, tokens = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                 int(sys.argv[4]), int(sys.argv[5]))
u = urllib.parse.urlparse(url)
text = ("lorem ipsum dolor sit amet consectetur " * (size // 38 + 1))[:size]
c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
lat = []
for i in range(n):
    body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": f"{i} {text}",
                       "max_tokens": tokens, "stream": tokens > 1})
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status == 200:
            lat.append(time.perf_counter() - t0)
            break
        if attempt == retries:
            sys.exit(f"request {i}: status {r.status}: {r.getheaders()}")
        c.close(); time.sleep(0.1)
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6 if lat else 0
print(f"{pct(0.5):.0f} {pct(0.99):.0f}")
PY
}
usage() { # usage PID: "<cpu ns of all threads> <minor faults>"
  local t=0 a
  for f in /proc/"$1"/task/*/schedstat; do read -r a _ < "$f"; t=$((t + a)); done
  echo "$t $(awk '{print $10}' /proc/"$1"/stat)"
}

for r in $(seq "$ROUNDS"); do
  for v in "$@"; do
    IFS='|' read -r name envs bin <<< "$v"
    bin=${bin:-$REL/epp}
    # shellcheck disable=SC2086 # ENV... is a list of assignments
    env $envs "$bin" --pool-file "$DIR/pool.yaml" --bind-address 127.0.0.1 \
      --secure-serving=false --metrics-endpoint-auth=false --grpc-port "$GRPC" \
      --grpc-health-port "$HEALTH" --metrics-port "$METRICS" > "$DIR/epp-$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$METRICS/metrics" > /dev/null && break; sleep 0.1; done
    send 20 50 > /dev/null
    if [ -n "$PERF" ]; then
      perf record -q -g -F 1999 -p "$pid" -o "$PERF.$r.$name" > /dev/null 2>&1 &
      perf_pid=$!
      sleep 0.5
    fi
    read -r t0 f0 < <(usage "$pid"); s0=$(date +%s%N)
    lat=$(send "$N")
    read -r p50 p99 <<< "$lat"
    read -r t1 f1 < <(usage "$pid"); s1=$(date +%s%N)
    hwm=$(awk '/VmHWM/{print $2}' /proc/"$pid"/status)
    if [ -n "$PERF" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi
    echo "round $r $name: epp CPU/req $(( (t1 - t0) / N / 1000 )) µs, minor faults/req $(( (f1 - f0) / N )), wall/req $(( (s1 - s0) / N / 1000 )) µs, latency p50 / p99 $p50 / $p99 µs, peak RSS $hwm kB"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
rm -rf "$DIR"
