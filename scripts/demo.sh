#!/usr/bin/env bash
# The local demo: simulated vLLM replicas + the Switchyard EPP + a real Envoy, serving an
# OpenAI-compatible API on http://127.0.0.1:${DEMO_PORT:-8080}. Run through `make demo`.
#
#   DEMO_REPLICAS   number of simulated replicas (default 4)
#   DEMO_PORT       the OpenAI listener (default 8080)
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
MODEL=meta-llama/Llama-3.1-8B-Instruct
RUN=.run/demo
BIN=target/release
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

echo "==> starting the epp (ext_proc :$EPP_PORT over TLS, health :$EPP_HEALTH_PORT, metrics :$EPP_METRICS_PORT)"
"$BIN/epp" --pool-file "$RUN/pool.yaml" --bind-address 127.0.0.1 \
    --grpc-port "$EPP_PORT" --grpc-health-port "$EPP_HEALTH_PORT" --metrics-port "$EPP_METRICS_PORT" \
    >"$RUN/epp.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$EPP_METRICS_PORT/metrics" "epp"

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

URL="http://127.0.0.1:$LISTEN_PORT"
echo
echo "==> a streamed chat completion through Envoy -> epp -> replica:"
curl -sN -D "$RUN/headers.txt" "$URL/v1/chat/completions" -H 'content-type: application/json' -d "{
  \"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 24,
  \"stream_options\": {\"include_usage\": true},
  \"messages\": [{\"role\": \"user\", \"content\": \"Say hello to Switchyard.\"}]}" >"$RUN/stream.txt"
grep '^data: ' "$RUN/stream.txt" | head -n 4 | cut -c1-150 | sed 's/^/   /'
echo "   ... ($(grep -c '^data: ' "$RUN/stream.txt") SSE events; served by $(grep -i '^x-inference-pod' "$RUN/headers.txt" | tr -d '\r'))"

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
curl -s "http://127.0.0.1:$EPP_METRICS_PORT/metrics" | grep -E '^inference_objective_request_total|^inference_pool_ready_pods' | sed 's/^/   /'

if [ "${DEMO_ONESHOT:-0}" = "1" ]; then
    echo "==> demo done (DEMO_ONESHOT=1)"
    exit 0
fi
echo
echo "Serving an OpenAI-compatible API on $URL (model \"$MODEL\"). Try:"
echo "  curl -sN $URL/v1/chat/completions -H 'content-type: application/json' \\"
echo "    -d '{\"model\":\"$MODEL\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
echo "Logs: $RUN/{sim,epp,envoy}.log. Ctrl-C stops everything."
wait
