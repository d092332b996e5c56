#!/bin/sh
# Render a Switchyard Envoy template to stdout.
#
#   render.sh TEMPLATE > envoy.yaml
#
# Every ${NAME} placeholder below is replaced by the value of the environment variable
# of the same name (plain string substitution, like envsubst restricted to these names):
#
#   LISTEN_PORT        OpenAI listener port on 127.0.0.1            default 8081
#   ADMIN_PORT         admin port on 127.0.0.1                       default 19000
#   EPP_HOST           EPP ext_proc host                             default 127.0.0.1
#   EPP_PORT           EPP ext_proc port                             default 9002
#   BACKEND_ENDPOINTS  one-line YAML flow sequence of lb_endpoints   required
#                      (or BACKENDS="ip:port ip:port ..." to build it; IPv6 as [addr]:port)
#
# Fails if the template still contains a placeholder afterwards.
set -eu

if [ "$#" -ne 1 ] || [ ! -r "$1" ]; then
    echo "usage: $0 TEMPLATE.yaml  (variables: LISTEN_PORT ADMIN_PORT EPP_HOST EPP_PORT BACKEND_ENDPOINTS or BACKENDS)" >&2
    exit 2
fi
template=$1

LISTEN_PORT=${LISTEN_PORT:-8081}
ADMIN_PORT=${ADMIN_PORT:-19000}
EPP_HOST=${EPP_HOST:-127.0.0.1}
EPP_PORT=${EPP_PORT:-9002}

# BACKENDS="10.0.0.1:8000 [fd00::1]:8000" -> BACKEND_ENDPOINTS flow sequence.
if [ -z "${BACKEND_ENDPOINTS:-}" ] && [ -n "${BACKENDS:-}" ]; then
    BACKEND_ENDPOINTS=
    for hp in $BACKENDS; do
        port=${hp##*:}
        host=${hp%:*}
        host=${host#\[}
        host=${host%\]}
        if [ -z "$host" ] || [ -z "$port" ] || [ "$host" = "$hp" ]; then
            echo "$0: bad backend '$hp' (want ip:port or [ipv6]:port)" >&2
            exit 2
        fi
        ep="{endpoint: {address: {socket_address: {address: \"$host\", port_value: $port}}}}"
        BACKEND_ENDPOINTS="${BACKEND_ENDPOINTS:+$BACKEND_ENDPOINTS, }$ep"
    done
    BACKEND_ENDPOINTS="[$BACKEND_ENDPOINTS]"
fi
if [ -z "${BACKEND_ENDPOINTS:-}" ]; then
    echo "$0: set BACKEND_ENDPOINTS (YAML flow sequence of lb_endpoints) or BACKENDS (\"ip:port ...\")" >&2
    exit 2
fi

# Values go through awk's ENVIRON, so no character in them needs escaping.
LISTEN_PORT=$LISTEN_PORT ADMIN_PORT=$ADMIN_PORT EPP_HOST=$EPP_HOST EPP_PORT=$EPP_PORT \
BACKEND_ENDPOINTS=$BACKEND_ENDPOINTS \
awk '
BEGIN { n = split("LISTEN_PORT ADMIN_PORT EPP_HOST EPP_PORT BACKEND_ENDPOINTS", names, " ") }
{
    line = $0
    out = ""
    # Scan left to right so that substituted text is never rescanned.
    while ((i = index(line, "${")) > 0) {
        out = out substr(line, 1, i - 1)
        rest = substr(line, i + 2)
        j = index(rest, "}")
        name = (j > 0) ? substr(rest, 1, j - 1) : ""
        known = 0
        for (k = 1; k <= n; k++) if (names[k] == name) known = 1
        if (known) {
            out = out ENVIRON[name]
            line = substr(rest, j + 1)
        } else {
            out = out "${"
            line = rest
            bad = 1
        }
    }
    print out line
}
END { if (bad) { print "render.sh: unknown ${...} placeholder left in template" > "/dev/stderr"; exit 3 } }
' "$template"
