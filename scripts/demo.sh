#!/usr/bin/env bash
# The local demo: two base models behind one Envoy, serving an OpenAI-compatible API on
# http://127.0.0.1:${DEMO_PORT:-8080}. Run through `make demo`.
#
#   client -> Envoy -> bbr (body's model -> X-Gateway-Base-Model-Name) -> the route of that base
#   model -> its pool's epp -> the replica it picked
#
# Pool A serves meta-llama/Llama-3.1-8B-Instruct and its LoRA adapters food-review-1 and
# ski-resorts; pool B serves Qwen/Qwen2.5-7B-Instruct. Each pool has simulated vLLM replicas
# (`sim`) and its own Switchyard EPP; `bbr` (file mode) maps adapters to base models. Envoy's
# config is scripts/demo-envoy.yaml (the shape of gateway-configs/body-based-routing).
#
#   DEMO_REPLICAS    replicas of pool A (default 4)
#   DEMO_B_REPLICAS  replicas of pool B (default 2)
#   DEMO_PORT        the OpenAI listener (default 8080)
#   DEMO_PROM_PORT   Prometheus (Debian's `prometheus` package) scraping both EPPs, bbr and the
#                    replicas (default 9091; skipped with a note when prometheus is not installed)
#   DEMO_ONESHOT=1   run the showcase requests, check where they went, then stop everything
#                    (used by CI-style checks; exits non-zero when a request went astray)
set -euo pipefail
cd "$(dirname "$0")/.."

REPLICAS=${DEMO_REPLICAS:-4}
B_REPLICAS=${DEMO_B_REPLICAS:-2}
LISTEN_PORT=${DEMO_PORT:-8080}
ADMIN_PORT=${DEMO_ADMIN_PORT:-9901}
SIM_BASE_PORT=${DEMO_SIM_PORT:-8001}
SIM_B_BASE_PORT=${DEMO_SIM_B_PORT:-8101}
EPP_PORT=${DEMO_EPP_PORT:-9002}
EPP_HEALTH_PORT=${DEMO_EPP_HEALTH_PORT:-9003}
EPP_METRICS_PORT=${DEMO_EPP_METRICS_PORT:-9090}
EPP_B_PORT=${DEMO_EPP_B_PORT:-9012}
EPP_B_HEALTH_PORT=${DEMO_EPP_B_HEALTH_PORT:-9013}
EPP_B_METRICS_PORT=${DEMO_EPP_B_METRICS_PORT:-9092}
BBR_PORT=${DEMO_BBR_PORT:-9004}
BBR_HEALTH_PORT=${DEMO_BBR_HEALTH_PORT:-9005}
BBR_METRICS_PORT=${DEMO_BBR_METRICS_PORT:-9094}
PROM_PORT=${DEMO_PROM_PORT:-9091}
MODEL=meta-llama/Llama-3.1-8B-Instruct
MODEL_B=Qwen/Qwen2.5-7B-Instruct
ADAPTERS="food-review-1 ski-resorts"
POOL_A=llama3-8b-instruct
POOL_B=qwen2-5-7b-instruct
RUN=.run/demo
BIN=${DEMO_BIN:-${CARGO_TARGET_DIR:-target}/release}
ENVOY=${ENVOY:?set ENVOY to the envoy binary (make demo does)}

for b in sim epp bbr; do
    [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b missing (make demo builds it: cargo build --release -p epp -p sim -p bbr)" >&2; exit 1; }
done
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

# The value of response header $2 in the header dump $1 ("" when absent; never fails).
header() { awk -v h="$2" 'BEGIN { h = tolower(h) ":" } tolower($1) == h { sub(/\r$/, ""); $1 = ""; sub(/^ /, ""); v = $0 } END { print v }' "$1"; }

# Replicas: one `sim` process each, so that every replica has its pool's name (x-inference-pod).
start_replicas() { # name-prefix, first port, count, model, extra sim flags...
    local prefix=$1 base=$2 count=$3 model=$4
    shift 4
    for i in $(seq 0 $((count - 1))); do
        "$BIN/sim" --host 127.0.0.1 --port $((base + i)) --model "$model" --pod-name "$prefix-$i" "$@" \
            >"$RUN/sim-$prefix-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in $(seq 0 $((count - 1))); do wait_http "http://127.0.0.1:$((base + i))/health" "sim replica $prefix-$i"; done
}

# A pool file: an InferencePool plus the replicas as its endpoints (what Kubernetes would list).
write_pool() { # pool name, name-prefix, first port, count, file
    {
        cat <<YAML
pool:
  apiVersion: inference.networking.k8s.io/v1
  kind: InferencePool
  metadata: {name: $1, namespace: default}
  spec:
    selector: {matchLabels: {app: $2}}
    targetPorts: [{number: 8000}]
    appProtocol: http
endpoints:
YAML
        for i in $(seq 0 $(($4 - 1))); do
            echo "- {name: $2-$i, address: 127.0.0.1, ports: [$(($3 + i))], labels: {app: $2, inference.networking.k8s.io/engine-type: vllm}}"
        done
    } >"$5"
}

lb_endpoints() { # first port, count
    local out=""
    for i in $(seq 0 $(($2 - 1))); do
        out="${out:+$out, }{endpoint: {address: {socket_address: {address: \"127.0.0.1\", port_value: $(($1 + i))}}}}"
    done
    echo "[$out]"
}

echo "==> pool $POOL_A: $REPLICAS simulated vLLM replicas of $MODEL (adapters: $ADAPTERS) on ports $SIM_BASE_PORT..$((SIM_BASE_PORT + REPLICAS - 1))"
start_replicas llama "$SIM_BASE_PORT" "$REPLICAS" "$MODEL" --lora-modules "${ADAPTERS// /,}" --max-loras 2
echo "==> pool $POOL_B: $B_REPLICAS simulated vLLM replicas of $MODEL_B on ports $SIM_B_BASE_PORT..$((SIM_B_BASE_PORT + B_REPLICAS - 1))"
start_replicas qwen "$SIM_B_BASE_PORT" "$B_REPLICAS" "$MODEL_B"
write_pool "$POOL_A" llama "$SIM_BASE_PORT" "$REPLICAS" "$RUN/pool-a.yaml"
write_pool "$POOL_B" qwen "$SIM_B_BASE_PORT" "$B_REPLICAS" "$RUN/pool-b.yaml"

# /metrics and /debug/pool need a bearer token (--metrics-endpoint-auth is on by default); the
# EPPs and bbr share one here.
# Absolute: Prometheus reads credentials_file relative to its config file's directory.
METRICS_TOKEN_FILE="$PWD/$RUN/metrics-token"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$METRICS_TOKEN_FILE"
AUTH="Authorization: Bearer $(cat "$METRICS_TOKEN_FILE")"

start_epp() { # pool file, ext_proc port, health port, metrics port, log
    "$BIN/epp" --pool-file "$1" --bind-address 127.0.0.1 \
        --grpc-port "$2" --grpc-health-port "$3" --metrics-port "$4" \
        --metrics-bearer-token-file "$METRICS_TOKEN_FILE" \
        --debug-decision-header --debug-pool --debug-decisions 64 \
        >"$5" 2>&1 &
    pids+=($!)
}
echo "==> epp of $POOL_A: ext_proc :$EPP_PORT (TLS), health :$EPP_HEALTH_PORT, metrics http://127.0.0.1:$EPP_METRICS_PORT/metrics"
start_epp "$RUN/pool-a.yaml" "$EPP_PORT" "$EPP_HEALTH_PORT" "$EPP_METRICS_PORT" "$RUN/epp-a.log"
echo "==> epp of $POOL_B: ext_proc :$EPP_B_PORT (TLS), health :$EPP_B_HEALTH_PORT, metrics http://127.0.0.1:$EPP_B_METRICS_PORT/metrics"
start_epp "$RUN/pool-b.yaml" "$EPP_B_PORT" "$EPP_B_HEALTH_PORT" "$EPP_B_METRICS_PORT" "$RUN/epp-b.log"

# bbr in file mode: the mapping of gateway-configs/body-based-routing/model-mapping.yaml.
cat >"$RUN/model-mapping.yaml" <<YAML
mappings:
- name: $POOL_A
  baseModel: $MODEL
  adapters: [$(echo "$ADAPTERS" | sed 's/ /, /g')]
- name: $POOL_B
  baseModel: $MODEL_B
YAML
echo "==> bbr (file mode, $RUN/model-mapping.yaml): ext_proc :$BBR_PORT (TLS), health :$BBR_HEALTH_PORT, metrics http://127.0.0.1:$BBR_METRICS_PORT/metrics"
"$BIN/bbr" --mapping-file "$RUN/model-mapping.yaml" --streaming --bind-address 127.0.0.1 \
    --grpc-port "$BBR_PORT" --grpc-health-port "$BBR_HEALTH_PORT" --metrics-port "$BBR_METRICS_PORT" \
    --metrics-bearer-token-file "$METRICS_TOKEN_FILE" >"$RUN/bbr.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$EPP_METRICS_PORT/healthz" "epp ($POOL_A)"
wait_http "http://127.0.0.1:$EPP_B_METRICS_PORT/healthz" "epp ($POOL_B)"
wait_http "http://127.0.0.1:$BBR_METRICS_PORT/healthz" "bbr"

echo "==> starting Envoy ($("$ENVOY" --version | grep -o 'version: [^ ]*' | head -n1)) on 127.0.0.1:$LISTEN_PORT (scripts/demo-envoy.yaml)"
# Plain string substitution of the template's placeholders (awk's ENVIRON: no escaping needed).
LISTEN_PORT=$LISTEN_PORT ADMIN_PORT=$ADMIN_PORT BBR_PORT=$BBR_PORT EPP_A_PORT=$EPP_PORT EPP_B_PORT=$EPP_B_PORT \
MODEL_A=$MODEL MODEL_B=$MODEL_B POOL_A=$POOL_A POOL_B=$POOL_B \
A_ENDPOINTS=$(lb_endpoints "$SIM_BASE_PORT" "$REPLICAS") B_ENDPOINTS=$(lb_endpoints "$SIM_B_BASE_PORT" "$B_REPLICAS") \
awk '
BEGIN { n = split("LISTEN_PORT ADMIN_PORT BBR_PORT EPP_A_PORT EPP_B_PORT MODEL_A MODEL_B POOL_A POOL_B A_ENDPOINTS B_ENDPOINTS", names, " ") }
{
    line = $0; out = ""
    while ((i = index(line, "${")) > 0) {
        out = out substr(line, 1, i - 1); rest = substr(line, i + 2); j = index(rest, "}")
        name = (j > 0) ? substr(rest, 1, j - 1) : ""; known = 0
        for (k = 1; k <= n; k++) if (names[k] == name) known = 1
        if (known) { out = out ENVIRON[name]; line = substr(rest, j + 1) }
        else { out = out "${"; line = rest; if ($0 !~ /^ *#/) bad = 1 }
    }
    print out line
}
END { if (bad) { print "demo: unknown ${...} placeholder left in scripts/demo-envoy.yaml" > "/dev/stderr"; exit 3 } }
' scripts/demo-envoy.yaml >"$RUN/envoy.yaml"
"$ENVOY" -c "$RUN/envoy.yaml" --disable-hot-restart --log-level warn >"$RUN/envoy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do
    [ "$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" 2>/dev/null)" = "LIVE" ] && break
    sleep 0.1
done
# Envoy health-checks bbr and both EPPs once a second; wait until all three are healthy.
for _ in $(seq 1 100); do
    healthy=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/clusters" 2>/dev/null | grep -cE '^(bbr|epp_a|epp_b)::.*health_flags::healthy$' || true)
    [ "$healthy" = "3" ] && break
    sleep 0.1
done

# Prometheus scraping both EPPs, bbr and every replica, so the metrics can be queried while
# the demo runs.
PROM=""
if command -v prometheus >/dev/null 2>&1; then
    {
        cat <<YAML
global: {scrape_interval: 1s, evaluation_interval: 5s}
scrape_configs:
- job_name: switchyard-epp
  authorization: {credentials_file: '$METRICS_TOKEN_FILE'}
  static_configs:
  - {targets: ['127.0.0.1:$EPP_METRICS_PORT'], labels: {pool: $POOL_A}}
  - {targets: ['127.0.0.1:$EPP_B_METRICS_PORT'], labels: {pool: $POOL_B}}
- job_name: switchyard-bbr
  authorization: {credentials_file: '$METRICS_TOKEN_FILE'}
  static_configs: [{targets: ['127.0.0.1:$BBR_METRICS_PORT']}]
- job_name: model-servers
  static_configs:
  - labels: {pool: $POOL_A}
    targets:
YAML
        for i in $(seq 0 $((REPLICAS - 1))); do echo "    - 127.0.0.1:$((SIM_BASE_PORT + i))"; done
        echo "  - labels: {pool: $POOL_B}"
        echo "    targets:"
        for i in $(seq 0 $((B_REPLICAS - 1))); do echo "    - 127.0.0.1:$((SIM_B_BASE_PORT + i))"; done
    } >"$RUN/prometheus.yml"
    if command -v promtool >/dev/null 2>&1; then promtool check config "$RUN/prometheus.yml" >/dev/null; fi
    echo "==> starting Prometheus on 127.0.0.1:$PROM_PORT (scraping both epps, bbr and $((REPLICAS + B_REPLICAS)) replicas every 1s)"
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
echo "==> a streamed chat completion through Envoy -> bbr -> epp -> replica:"
curl -sN -D "$RUN/headers.txt" "$URL/v1/chat/completions" -H 'content-type: application/json' -d "{
  \"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 24,
  \"stream_options\": {\"include_usage\": true},
  \"messages\": [{\"role\": \"user\", \"content\": \"Say hello to Switchyard.\"}]}" >"$RUN/stream.txt"
grep '^data: ' "$RUN/stream.txt" | head -n 4 | cut -c1-150 | sed 's/^/   /' || true
echo "   ... ($(grep -c '^data: ' "$RUN/stream.txt" || true) SSE events; served by x-inference-pod: $(header "$RUN/headers.txt" x-inference-pod) of pool $(header "$RUN/headers.txt" x-demo-pool))"
echo "   why: $(header "$RUN/headers.txt" x-switchyard-decision | cut -c1-160)"

echo
echo "==> where requests went: 3 conversations x 4 turns sharing a long system prompt each ($MODEL)"
SYSTEM=$(printf 'You are a meticulous assistant for the %s team. %.0s' $(seq 1 40))
for conv in A B C; do
    line="   conversation $conv:"
    for turn in 1 2 3 4; do
        curl -s -D "$RUN/turn.txt" -o /dev/null "$URL/v1/chat/completions" -H 'content-type: application/json' -d "{
          \"model\": \"$MODEL\", \"max_tokens\": 4,
          \"messages\": [{\"role\": \"system\", \"content\": \"[$conv] $SYSTEM\"},
                         {\"role\": \"user\", \"content\": \"turn $turn\"}]}"
        line="$line $(header "$RUN/turn.txt" x-inference-pod)"
    done
    echo "$line"
done
echo "   (prefix-cache affinity keeps a conversation on the replica that holds its prefix)"

echo
echo "==> one gateway, two base models: bbr names the base model, the route picks its pool, the"
echo "    pool's epp picks the replica (* also sends x-gateway-base-model-name: $MODEL, which is ignored)"
printf '   %-34s %-34s %-21s %-9s %-6s %s\n' "model asked" "base model (bbr)" "pool" "replica" "status" "answered as"
failures=0
route() { # label, model, expected pool ("-" for none), expected status, extra curl args...
    local label=$1 model=$2 want_pool=$3 want_status=$4
    shift 4
    local status pool pod base answered
    status=$(curl -s -D "$RUN/route.txt" -o "$RUN/route.json" -w '%{http_code}' "$URL/v1/completions" \
        -H 'content-type: application/json' "$@" \
        -d "{\"model\": \"$model\", \"prompt\": \"Where does this go?\", \"max_tokens\": 4}")
    pool=$(header "$RUN/route.txt" x-demo-pool)
    pod=$(header "$RUN/route.txt" x-inference-pod)
    base=$(header "$RUN/route.txt" x-demo-base-model)
    if [ "$status" = "200" ]; then
        answered=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("model", "?"))' "$RUN/route.json" 2>/dev/null || echo "?")
    else
        answered=$(head -c 120 "$RUN/route.json")
    fi
    printf '   %-34s %-34s %-21s %-9s %-6s %s\n' "$label" "${base:--}" "${pool:--}" "${pod:--}" "$status" "$answered"
    if [ "${pool:--}" != "$want_pool" ] || [ "$status" != "$want_status" ]; then
        echo "   ^ expected pool $want_pool, status $want_status" >&2
        failures=$((failures + 1))
    fi
}
route "$MODEL" "$MODEL" "$POOL_A" 200
route "$MODEL_B" "$MODEL_B" "$POOL_B" 200
route "food-review-1 (adapter)" food-review-1 "$POOL_A" 200
route "ski-resorts (adapter)" ski-resorts "$POOL_A" 200
route "gpt-4o (served nowhere)" gpt-4o - 404
route "$MODEL_B *" "$MODEL_B" "$POOL_B" 200 -H "x-gateway-base-model-name: $MODEL"

echo
# ---- GET /v1/models (issue 17 item 2) -------------------------------------------------------
# Every model and adapter behind the gateway, answered by bbr itself at the request headers
# (bbr/README.md: a GET has no body to route on, and only the router knows every pool's
# models). Checked: both base models and both adapters are listed.
echo "==> GET $URL/v1/models (answered by bbr: every model behind the gateway):"
status=$(curl -s -o "$RUN/models.json" -w '%{http_code}' "$URL/v1/models")
if [ "$status" = "200" ] && ids=$(python3 -c '
import json, sys
for m in json.load(open(sys.argv[1]))["data"]:
    print("%-34s %s" % (m["id"], "adapter of " + m["parent"] if m.get("parent") else "base model"))' "$RUN/models.json" 2>/dev/null); then
    echo "$ids" | sed 's/^/   /'
    for m in "$MODEL" "$MODEL_B" $ADAPTERS; do
        if ! awk -v m="$m" '$1 == m { found = 1 } END { exit !found }' <<<"$ids"; then
            echo "   ^ $m is not listed" >&2
            failures=$((failures + 1))
        fi
    done
else
    echo "   $status: $(head -c 160 "$RUN/models.json")" >&2
    failures=$((failures + 1))
fi
# ---- end of GET /v1/models -----------------------------------------------------------------

echo
for p in "$POOL_A $EPP_METRICS_PORT" "$POOL_B $EPP_B_METRICS_PORT"; do
    set -- $p
    echo "==> epp of $1 (http://127.0.0.1:$2/metrics):"
    curl -s -H "$AUTH" "http://127.0.0.1:$2/metrics" | grep -E '^inference_objective_request_total|^inference_pool_ready_pods' | sed 's/^/   /' || true
done
echo "==> bbr (http://127.0.0.1:$BBR_METRICS_PORT/metrics):"
curl -s -H "$AUTH" "http://127.0.0.1:$BBR_METRICS_PORT/metrics" | grep -E '^bbr_requests_by_model_total|^bbr_mapping_(base_models|adapters) ' | sed 's/^/   /' || true
echo
echo "==> the last decision of $POOL_A's epp, from http://127.0.0.1:$EPP_METRICS_PORT/debug/pool:"
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
    # What the two EPPs count themselves; Prometheus has caught up when its sum is the same.
    want=0
    for port in "$EPP_METRICS_PORT" "$EPP_B_METRICS_PORT"; do
        n=$(curl -s -H "$AUTH" "http://127.0.0.1:$port/metrics" | awk '/^inference_objective_request_total/ { s += $NF } END { print s + 0 }')
        want=$((want + n))
    done
    prom() { curl -s "$PROM/api/v1/query" --data-urlencode "query=$1" | python3 -c "import json,sys; r=json.load(sys.stdin)['data']['result']; print(r[0]['value'][1] if r else '$2')"; }
    Q='sum(inference_objective_request_total)'
    for _ in $(seq 1 50); do
        v=$(prom "$Q" 0)
        [ "$v" = "$want" ] && break
        sleep 0.2
    done
    echo "   $Q = $v (the epps count $want)"
    Q='sum by (pool) (inference_objective_request_total)'
    echo "   $Q: $(curl -s "$PROM/api/v1/query" --data-urlencode "query=$Q" | python3 -c 'import json,sys; print(", ".join("%s %s" % (r["metric"].get("pool", "?"), r["value"][1]) for r in json.load(sys.stdin)["data"]["result"]))')"
    Q='sum(bbr_requests_by_model_total)'
    echo "   $Q = $(prom "$Q" n/a)"
    Q='count(up{job="model-servers"} == 1)'
    echo "   replicas scraped: $(prom "$Q" 0)"
fi

if [ "$failures" != "0" ]; then
    echo "demo: $failures request(s) did not go where expected; logs in $RUN" >&2
    exit 1
fi
if [ "${DEMO_ONESHOT:-0}" = "1" ]; then
    echo "==> demo done (DEMO_ONESHOT=1)"
    exit 0
fi
echo
echo "Serving an OpenAI-compatible API on $URL (models \"$MODEL\", its adapters $ADAPTERS, and \"$MODEL_B\"). Try:"
echo "  curl -sN $URL/v1/chat/completions -H 'content-type: application/json' \\"
echo "    -d '{\"model\":\"$MODEL_B\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
echo "Metrics (bearer token in $METRICS_TOKEN_FILE): epp $POOL_A http://127.0.0.1:$EPP_METRICS_PORT/metrics,"
echo "  epp $POOL_B http://127.0.0.1:$EPP_B_METRICS_PORT/metrics, bbr http://127.0.0.1:$BBR_METRICS_PORT/metrics."
echo "Decisions: curl -H \"Authorization: Bearer $(cat $METRICS_TOKEN_FILE)\" http://127.0.0.1:$EPP_METRICS_PORT/debug/pool (or :$EPP_B_METRICS_PORT)"
if [ -n "$PROM" ]; then
    echo "Prometheus: $PROM (e.g. $PROM/graph?g0.expr=sum%20by%20(pool)%20(rate(inference_objective_request_total[1m]))); the"
    echo "Grafana dashboard is manifests/observability/grafana-dashboard.json."
fi
echo "Logs: $RUN/{sim-*,epp-a,epp-b,bbr,envoy,prometheus}.log. Ctrl-C stops everything."
wait
