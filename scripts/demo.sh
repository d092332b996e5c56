#!/usr/bin/env bash
# The local demo: simulated vLLM replicas + the Switchyard EPP + a real Envoy, serving an
# OpenAI-compatible API on http://127.0.0.1:${DEMO_PORT:-8080}. Run through `make demo`.
#
#   DEMO_REPLICAS   number of simulated replicas (default 4)
#   DEMO_PORT       the OpenAI listener (default 8080)
#   DEMO_PROM_PORT  Prometheus (Debian's `prometheus` package) scraping the epp and the replicas
#                   (default 9091; skipped with a note when prometheus is not installed)
#   DEMO_ONESHOT=1  run the showcase requests, then stop everything (used by CI-style checks)
set -euo pipefail
cd "$(dirname "$0")/.."

REPLICAS=${DEMO_REPLICAS:-4}
LISTEN_PORT=${DEMO_PORT:-8080}
ADMIN_PORT=${DEMO_ADMIN_PORT:-9901}
SIM_BASE_PORT=${DEMO_SIM_PORT:-8001}
EPP_PORT=${DEMO_EPP_PORT:-9002}
EPP_HEALTH_PORT=${DEMO_EPP_HEALTH_PORT:-9003}
EPP_METRICS_PORT=${DEMO_EPP_METRICS_PORT:-9090}
PROM_PORT=${DEMO_PROM_PORT:-9091}
MODEL=meta-llama/Llama-3.1-8B-Instruct
RUN=.run/demo
BIN=${DEMO_BIN:-${CARGO_TARGET_DIR:-target}/release}
ENVOY=${ENVOY:?set ENVOY to the envoy binary (make demo does)}

mkdir -p "$RUN"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_http() { # url, what
    for _ in $(seq 1 200); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "demo: $2 did not come up ($1); logs in $RUN" >&2
    exit 1
}

echo "==> starting $REPLICAS simulated vLLM replicas on ports $SIM_BASE_PORT..$((SIM_BASE_PORT + REPLICAS - 1))"
"$BIN/sim" --host 127.0.0.1 --port "$SIM_BASE_PORT" --replicas "$REPLICAS" >"$RUN/sim.log" 2>&1 &
pids+=($!)
for i in $(seq 0 $((REPLICAS - 1))); do wait_http "http://127.0.0.1:$((SIM_BASE_PORT + i))/health" "sim replica $i"; done

# The pool: an InferencePool plus the replicas as its endpoints (what Kubernetes would list).
{
    cat <<YAML
pool:
  apiVersion: inference.networking.k8s.io/v1
  kind: InferencePool
  metadata: {name: demo-pool, namespace: default}
  spec:
    selector: {matchLabels: {app: sim}}
    targetPorts: [{number: 8000}]
    appProtocol: http
endpoints:
YAML
    for i in $(seq 0 $((REPLICAS - 1))); do
        echo "- {name: sim-$i, address: 127.0.0.1, ports: [$((SIM_BASE_PORT + i))], labels: {app: sim, inference.networking.k8s.io/engine-type: vllm}}"
    done
} >"$RUN/pool.yaml"

# /metrics and /debug/pool need a bearer token (--metrics-endpoint-auth is on by default).
METRICS_TOKEN_FILE="$RUN/metrics-token"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$METRICS_TOKEN_FILE"
AUTH="Authorization: Bearer $(cat "$METRICS_TOKEN_FILE")"
echo "==> starting the epp (ext_proc :$EPP_PORT over TLS, health :$EPP_HEALTH_PORT, metrics :$EPP_METRICS_PORT, token in $METRICS_TOKEN_FILE)"
"$BIN/epp" --pool-file "$RUN/pool.yaml" --bind-address 127.0.0.1 \
    --grpc-port "$EPP_PORT" --grpc-health-port "$EPP_HEALTH_PORT" --metrics-port "$EPP_METRICS_PORT" \
    --metrics-bearer-token-file "$METRICS_TOKEN_FILE" \
    --debug-decision-header --debug-pool --debug-decisions 64 \
    >"$RUN/epp.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$EPP_METRICS_PORT/healthz" "epp"

echo "==> starting Envoy ($("$ENVOY" --version | grep -o 'version: [^ ]*' | head -n1)) on 127.0.0.1:$LISTEN_PORT"
BACKENDS=""
for i in $(seq 0 $((REPLICAS - 1))); do BACKENDS="$BACKENDS 127.0.0.1:$((SIM_BASE_PORT + i))"; done
LISTEN_PORT=$LISTEN_PORT ADMIN_PORT=$ADMIN_PORT EPP_HOST=127.0.0.1 EPP_PORT=$EPP_PORT BACKENDS=$BACKENDS \
    gateway-configs/envoy/render.sh gateway-configs/envoy/envoy.yaml >"$RUN/envoy.yaml"
"$ENVOY" -c "$RUN/envoy.yaml" --disable-hot-restart --log-level warn >"$RUN/envoy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do
    [ "$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" 2>/dev/null)" = "LIVE" ] && break
    sleep 0.1
done
# Envoy health-checks the EPP once a second; wait until it is healthy.
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/clusters" 2>/dev/null | grep -q '^epp::.*health_flags::healthy$' && break
    sleep 0.1
done

# Prometheus scraping the epp and every replica, so the metrics can be queried while the demo runs.
PROM=""
if command -v prometheus >/dev/null 2>&1; then
    {
        cat <<YAML
global: {scrape_interval: 1s, evaluation_interval: 5s}
scrape_configs:
- job_name: switchyard-epp
  authorization: {credentials_file: '$METRICS_TOKEN_FILE'}
  static_configs: [{targets: ['127.0.0.1:$EPP_METRICS_PORT']}]
- job_name: model-servers
  static_configs:
  - targets:
YAML
        for i in $(seq 0 $((REPLICAS - 1))); do echo "    - 127.0.0.1:$((SIM_BASE_PORT + i))"; done
    } >"$RUN/prometheus.yml"
    if command -v promtool >/dev/null 2>&1; then promtool check config "$RUN/prometheus.yml" >/dev/null; fi
    echo "==> starting Prometheus on 127.0.0.1:$PROM_PORT (scraping the epp and $REPLICAS replicas every 1s)"
    rm -rf "$RUN/prometheus-data"
    prometheus --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/prometheus-data" \
        --web.listen-address="127.0.0.1:$PROM_PORT" >"$RUN/prometheus.log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$PROM_PORT/-/ready" "prometheus"
    PROM="http://127.0.0.1:$PROM_PORT"
else
    echo "==> prometheus not installed (make prometheus installs Debian's package); skipping it"
fi

URL="http://127.0.0.1:$LISTEN_PORT"
echo
echo "==> a streamed chat completion through Envoy -> epp -> replica:"
curl -sN -D "$RUN/headers.txt" "$URL/v1/chat/completions" -H 'content-type: application/json' -d "{
  \"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 24,
  \"stream_options\": {\"include_usage\": true},
  \"messages\": [{\"role\": \"user\", \"content\": \"Say hello to Switchyard.\"}]}" >"$RUN/stream.txt"
grep '^data: ' "$RUN/stream.txt" | head -n 4 | cut -c1-150 | sed 's/^/   /'
echo "   ... ($(grep -c '^data: ' "$RUN/stream.txt") SSE events; served by $(grep -i '^x-inference-pod' "$RUN/headers.txt" | tr -d '\r'))"
echo "   why: $(grep -i '^x-switchyard-decision' "$RUN/headers.txt" | tr -d '\r' | cut -c1-160)"

echo
echo "==> where requests went: 3 conversations x 4 turns sharing a long system prompt each"
SYSTEM=$(printf 'You are a meticulous assistant for the %s team. %.0s' $(seq 1 40))
for conv in A B C; do
    line="   conversation $conv:"
    for turn in 1 2 3 4; do
        pod=$(curl -s -D - -o /dev/null "$URL/v1/chat/completions" -H 'content-type: application/json' -d "{
          \"model\": \"$MODEL\", \"max_tokens\": 4,
          \"messages\": [{\"role\": \"system\", \"content\": \"[$conv] $SYSTEM\"},
                         {\"role\": \"user\", \"content\": \"turn $turn\"}]}" | grep -i '^x-inference-pod' | awk '{print $2}' | tr -d '\r')
        line="$line $pod"
    done
    echo "$line"
done
echo "   (prefix-cache affinity keeps a conversation on the replica that holds its prefix)"
echo
echo "==> EPP metrics (http://127.0.0.1:$EPP_METRICS_PORT/metrics):"
curl -s -H "$AUTH" "http://127.0.0.1:$EPP_METRICS_PORT/metrics" | grep -E '^inference_objective_request_total|^inference_pool_ready_pods' | sed 's/^/   /'
echo
echo "==> the last decision, from http://127.0.0.1:$EPP_METRICS_PORT/debug/pool:"
curl -s -H "$AUTH" "http://127.0.0.1:$EPP_METRICS_PORT/debug/pool" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("   endpoints: " + ", ".join("%s (queue %d, kv %.2f, in flight %d)" % (e["name"], e["metrics"]["waiting_queue_size"], e["metrics"]["kv_cache_usage"], e["in_flight"]) for e in d["endpoints"]))
last = d["decisions"][-1]
print("   %s -> %s in %d us; scorers %s" % (last["request_id"][:8], ",".join(last["picked"]), last["scheduling_us"], ", ".join("%s x%g" % (s["name"], s["weight"]) for s in last["scorers"])))
for c in last["candidates"]:
    print("     %-10s total %.3f  %s" % (c["endpoint"], c["total"], " ".join("%.2f" % s for s in c["scores"])))
'
if [ -n "$PROM" ]; then
    echo
    echo "==> Prometheus ($PROM) sees the same counters once it has scraped:"
    Q='sum(inference_objective_request_total)'
    for _ in $(seq 1 50); do
        v=$(curl -s "$PROM/api/v1/query" --data-urlencode "query=$Q" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
        [ "$v" = "13" ] && break
        sleep 0.2
    done
    echo "   $Q = $v"
    Q='inference_pool_average_queue_size'
    echo "   $Q = $(curl -s "$PROM/api/v1/query" --data-urlencode "query=$Q" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "n/a")')"
    Q='count(up{job="model-servers"} == 1)'
    echo "   replicas scraped: $(curl -s "$PROM/api/v1/query" --data-urlencode "query=$Q" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')"
fi

if [ "${DEMO_ONESHOT:-0}" = "1" ]; then
    echo "==> demo done (DEMO_ONESHOT=1)"
    exit 0
fi
echo
echo "Serving an OpenAI-compatible API on $URL (model \"$MODEL\"). Try:"
echo "  curl -sN $URL/v1/chat/completions -H 'content-type: application/json' \\"
echo "    -d '{\"model\":\"$MODEL\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
if [ -n "$PROM" ]; then
    echo "Prometheus: $PROM (e.g. $PROM/graph?g0.expr=rate(inference_objective_request_total[1m])); the"
    echo "Grafana dashboard is manifests/observability/grafana-dashboard.json. Decisions: curl -H \"Authorization: Bearer $(cat $METRICS_TOKEN_FILE)\" http://127.0.0.1:$EPP_METRICS_PORT/debug/pool"
fi
echo "Logs: $RUN/{sim,epp,envoy,prometheus}.log. Ctrl-C stops everything."
wait
