"""Upstream chart values against our chart: the cases `validate.py` renders.

Drop-in promise (issue 11, item 7): every key of upstream's `inferencepool` chart values
(kubernetes-sigs/gateway-api-inference-extension, config/charts/inferencepool/values.yaml) is
honoured with upstream's meaning or refused at render time with a message naming it.

* SCENARIOS render upstream's own values files (test data under the chart's tests/upstream/,
  with their source commits), unchanged and with overrides, and assert the rendered objects.
  validate.py also validates every object, checks the EPP invariants, and compares the EPP's
  arguments with the golden files a Rust test parses with the EPP's own flag parser.
* REJECTIONS are value sets that must fail rendering with a message containing a given text.

Pure data and assertions on rendered objects; validate.py is the harness.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "charts", "switchyard-inferencepool")
UPSTREAM_DIR = os.path.join(CHART, "tests", "upstream")
RELEASE, NAMESPACE = "my-pool", "inference"
EPP = f"{RELEASE}-epp"
# The one value both charts require (upstream's values.yaml leaves it commented out).
SELECTOR = {"inferencePool": {"modelServers": {"matchLabels": {"app": "vllm-qwen3-32b"}}}}

Objs = list[dict[str, Any]]


def upstream(version: str) -> dict[str, Any]:
    with open(os.path.join(UPSTREAM_DIR, f"values-{version}.yaml")) as f:
        return yaml.safe_load(f)


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Layers merged as `helm -f a -f b` would (maps deep-merged; a None value is kept, so
    Helm deletes that key from the chart's defaults)."""
    out: dict[str, Any] = {}
    for layer in layers:
        _merge(out, copy.deepcopy(layer))
    return out


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


# --- accessors on rendered objects ---------------------------------------------------------

def of_kind(objs: Objs, kind: str) -> Objs:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Objs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def pod(objs: Objs) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def epp(objs: Objs) -> dict[str, Any]:
    return next(c for c in pod(objs)["containers"] if c["name"] == "epp")


def epp_args(objs: Objs) -> list[str]:
    return list(epp(objs).get("args", []))


def flag_values(args: list[str]) -> dict[str, list[str]]:
    """Every value each flag was given (`--name=value`; bare `--name` counts as true)."""
    out: dict[str, list[str]] = {}
    for a in args:
        name, _, value = a[2:].partition("=")
        out.setdefault(name, []).append(value if "=" in a else "true")
    return out


def env(objs: Objs) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in epp(objs).get("env", [])}


def pool(objs: Objs) -> dict[str, Any]:
    return one(objs, "InferencePool")["spec"]


def plugins_config(objs: Objs) -> dict[str, Any]:
    return yaml.safe_load(one(objs, "ConfigMap", EPP)["data"]["default-plugins.yaml"])


def plugin(cfg: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(p for p in cfg["plugins"] if p["type"] == type_)


class Check:
    """Collects mismatches instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def eq(self, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.problems.append(f"{what}: got {got!r}, want {want!r}")

    def true(self, what: str, cond: bool) -> None:
        if not cond:
            self.problems.append(what)

    def flags(self, objs: Objs, **want: str) -> None:
        """Each named flag is passed exactly once, with this value (underscores for dashes)."""
        got = flag_values(epp_args(objs))
        for name, value in want.items():
            name = name.replace("_", "-")
            self.eq(f"--{name}", got.get(name), [value])


@dataclass
class Scenario:
    name: str
    doc: str
    values: dict[str, Any]
    expect: Callable[[Objs, Check], None]


@dataclass
class Rejection:
    doc: str
    values: dict[str, Any]
    message: str  # a text the rendering error must contain


# --- scenarios ------------------------------------------------------------------------------

def expect_upstream_v150(objs: Objs, c: Check) -> None:
    # Upstream's image (the reference EPP) is honoured: the key means the image, whoever's.
    c.eq("image", epp(objs)["image"], "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0")
    c.eq("pullPolicy", epp(objs)["imagePullPolicy"], "Always")
    c.flags(objs, v="1", tracing="false", metrics_endpoint_auth="true", zap_encoder="json",
            ha_enable_leader_election="false", model_server_metrics_path="/metrics")
    c.eq("failureMode", pool(objs)["endpointPickerRef"]["failureMode"], "FailOpen")
    c.eq("targetPorts", pool(objs)["targetPorts"], [{"number": 8000}])
    c.eq("appProtocol", pool(objs)["appProtocol"], "http")
    c.eq("resources", epp(objs)["resources"],
         {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}})
    expect_metrics_auth_rbac(objs, c, reader_bound_to=None)
    for kind in ("ServiceMonitor", "PodMonitoring", "DestinationRule", "HTTPRoute",
                 "InferenceObjective", "HealthCheckPolicy"):
        c.eq(f"{kind} objects", of_kind(objs, kind), [])
    c.eq("metrics-data-source", plugin(plugins_config(objs), "metrics-data-source")["parameters"],
         {"scheme": "http", "path": "/metrics", "insecureSkipVerify": True})


def expect_metrics_auth_rbac(objs: Objs, c: Check, reader_bound_to: str | None) -> None:
    """Metrics auth on: the EPP may create token and subject access reviews; a ClusterRole
    allows GET /metrics, bound to the chart's metrics reader when the chart has a monitor."""
    auth, reader = f"{NAMESPACE}-{EPP}-metrics-auth", f"{NAMESPACE}-{EPP}-metrics-reader"
    c.eq("metrics-auth rules", one(objs, "ClusterRole", auth)["rules"], [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ])
    c.eq("metrics-auth subject", one(objs, "ClusterRoleBinding", auth)["subjects"],
         [{"kind": "ServiceAccount", "name": EPP, "namespace": NAMESPACE}])
    c.eq("metrics-reader rules", one(objs, "ClusterRole", reader)["rules"],
         [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    bindings = [b for b in of_kind(objs, "ClusterRoleBinding") if b["roleRef"]["name"] == reader]
    if reader_bound_to is None:
        c.eq("metrics-reader bindings", bindings, [])
    else:
        c.eq("metrics-reader subject", [b["subjects"] for b in bindings],
             [[{"kind": "ServiceAccount", "name": reader_bound_to, "namespace": NAMESPACE}]])


def expect_upstream_v140(objs: Objs, c: Check) -> None:
    # v1.4's image.hub/image.name form; targetPortNumber 8000 agrees with targetPorts.
    c.eq("image", epp(objs)["image"], "registry.k8s.io/gateway-api-inference-extension/epp:v1.4.0")
    c.eq("targetPorts", pool(objs)["targetPorts"], [{"number": 8000}])
    c.flags(objs, v="1", tracing="false", metrics_endpoint_auth="true")


OVERRIDES_V150 = {
    "inferenceExtension": {
        "replicas": 2,
        # v1.4's image form on top of v1.5's values: hub/name win (our defaults never set them).
        "image": {"hub": "registry.example.com/mirror", "name": "switchyard-epp", "tag": "0.1.0"},
        "failureMode": "FailClose",
        "flags": {"v": 3, "refresh-metrics-interval": "100ms", "max-request-body-bytes": 33554432},
        "extraContainerPorts": [{"name": "debug", "containerPort": 8081, "protocol": "TCP"}],
        "extraServicePorts": [{"name": "http-debug", "port": 8081, "targetPort": 8081, "protocol": "TCP"}],
        "monitoring": {"interval": "15s",
                       "prometheus": {"enabled": True, "extraLabels": {"release": "kube-prometheus"}}},
        "tracing": {"enabled": True, "otelExporterEndpoint": "http://otel-collector.observability:4317",
                    "sampling": {"samplerArg": "0.5"}},
        "metricsDataSource": {"path": "/custom/metrics", "scheme": "https", "insecureSkipVerify": False},
    },
    "inferencePool": {
        # Upstream's single-port form replaces the list, which is nulled as a user would.
        "targetPorts": None,
        "targetPortNumber": 8001,
        "modelServerType": "triton-tensorrt-llm",
        "modelServerProtocol": "http",
        "parser": "openai-parser",
    },
    "provider": {"name": "istio", "istio": {"destinationRule": {
        "host": "epp.inference.svc.cluster.local",
        "trafficPolicy": {"connectionPool": {"http": {"maxRequestsPerConnection": 256000}}}}}},
    "experimentalHttpRoute": {"enabled": True, "inferenceGatewayName": "gw",
                              "inferenceGatewayNamespace": "gateways", "baseModel": "qwen",
                              "headerMatches": {"x-route": "a"}},
    "inferenceObjectives": [{"name": "high-priority", "priority": 5},
                            {"name": "low-priority", "priority": 1}],
}


def expect_overrides_v150(objs: Objs, c: Check) -> None:
    c.flags(objs, v="3", refresh_metrics_interval="100ms", max_request_body_bytes="33554432",
            tracing="true", ha_enable_leader_election="true", metrics_endpoint_auth="true",
            model_server_metrics_path="/custom/metrics")
    c.eq("image", epp(objs)["image"], "registry.example.com/mirror/switchyard-epp:0.1.0")
    c.eq("failureMode", pool(objs)["endpointPickerRef"]["failureMode"], "FailClose")
    c.eq("targetPorts", pool(objs)["targetPorts"], [{"number": 8001}])
    c.eq("replicas", one(objs, "Deployment")["spec"]["replicas"], 2)
    ports = {p["name"]: p["containerPort"] for p in epp(objs)["ports"]}
    c.eq("container port debug", ports.get("debug"), 8081)
    svc = {p["name"]: p for p in one(objs, "Service", EPP)["spec"]["ports"]}
    c.eq("service port http-debug", svc.get("http-debug"),
         {"name": "http-debug", "port": 8081, "targetPort": 8081, "protocol": "TCP"})
    # Monitoring: a ServiceMonitor scraping with the metrics reader's token, not the EPP's.
    reader = f"{EPP}-metrics-reader"
    sm = one(objs, "ServiceMonitor")
    c.eq("ServiceMonitor label", sm["metadata"]["labels"].get("release"), "kube-prometheus")
    c.eq("ServiceMonitor endpoint", sm["spec"]["endpoints"], [{
        "port": "http-metrics", "path": "/metrics", "interval": "15s",
        "authorization": {"credentials": {"name": "inference-gateway-sa-metrics-reader-secret", "key": "token"}}}])
    secret = one(objs, "Secret", "inference-gateway-sa-metrics-reader-secret")
    c.eq("token Secret type", secret["type"], "kubernetes.io/service-account-token")
    c.eq("token Secret account", secret["metadata"]["annotations"]["kubernetes.io/service-account.name"], reader)
    expect_metrics_auth_rbac(objs, c, reader_bound_to=reader)
    e = env(objs)
    c.eq("OTEL endpoint", e.get("OTEL_EXPORTER_OTLP_ENDPOINT"), "http://otel-collector.observability:4317")
    c.eq("OTEL sampler", (e.get("OTEL_TRACES_SAMPLER"), e.get("OTEL_TRACES_SAMPLER_ARG")),
         ("parentbased_traceidratio", "0.5"))
    cfg = plugins_config(objs)
    c.eq("metrics-data-source", plugin(cfg, "metrics-data-source")["parameters"],
         {"scheme": "https", "path": "/custom/metrics", "insecureSkipVerify": False})
    c.eq("engine", plugin(cfg, "core-metrics-extractor")["parameters"]["defaultEngine"], "triton")
    dr = one(objs, "DestinationRule")["spec"]
    c.eq("DestinationRule", dr, {"host": "epp.inference.svc.cluster.local", "trafficPolicy": {
        "tls": {"mode": "SIMPLE", "insecureSkipVerify": True},
        "connectionPool": {"http": {"maxRequestsPerConnection": 256000}}}})
    route = one(objs, "HTTPRoute")["spec"]
    c.eq("HTTPRoute parent", route["parentRefs"],
         [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw", "namespace": "gateways"}])
    c.eq("HTTPRoute headers", route["rules"][0]["matches"][0]["headers"], [
        {"type": "Exact", "name": "X-Gateway-Base-Model-Name", "value": "qwen"},
        {"type": "Exact", "name": "x-route", "value": "a"}])
    c.eq("HTTPRoute timeout", route["rules"][0]["timeouts"], {"request": "300s"})
    c.eq("HTTPRoute backend", route["rules"][0]["backendRefs"],
         [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": RELEASE}])
    c.eq("InferenceObjectives", sorted((o["metadata"]["name"], o["spec"]["priority"], o["spec"]["poolRef"]["name"])
                                       for o in of_kind(objs, "InferenceObjective")),
         [("high-priority", 5, RELEASE), ("low-priority", 1, RELEASE)])
    c.true("leases for leader election", any(
        r["resources"] == ["leases"] for r in one(objs, "Role", EPP)["rules"]))


OVERRIDES_V140_GKE = {
    "inferenceExtension": {
        "flags": {"v": 4, "secure-serving": False},
        "monitoring": {"prometheus": {"enabled": True}},
    },
    "inferencePool": {"targetPorts": None, "targetPortNumber": 8001},
    "provider": {"name": "gke", "gke": {"autopilot": True}},
}


def expect_v140_gke(objs: Objs, c: Check) -> None:
    c.flags(objs, v="4", secure_serving="false", metrics_endpoint_auth="true")
    c.eq("targetPorts", pool(objs)["targetPorts"], [{"number": 8001}])
    hc = one(objs, "HealthCheckPolicy")["spec"]["default"]["config"]["httpHealthCheck"]
    c.eq("health check port", hc["port"], 8001)
    c.eq("ServiceMonitor objects", of_kind(objs, "ServiceMonitor"), [])
    secret = f"{RELEASE}-metrics-reader-secret"
    pm = one(objs, "PodMonitoring")["spec"]["endpoints"]
    c.eq("PodMonitoring credentials", pm[0]["authorization"],
         {"type": "Bearer", "credentials": {"secret": {"name": secret, "key": "token"}}})
    c.eq("token Secret account", one(objs, "Secret", secret)["metadata"]["annotations"]
         ["kubernetes.io/service-account.name"], f"{EPP}-metrics-reader")
    c.eq("collector binding", one(objs, "RoleBinding", f"{secret}-read")["subjects"],
         [{"kind": "ServiceAccount", "name": "collector", "namespace": "gke-gmp-system"}])
    c.eq("collector may read", one(objs, "Role", f"{secret}-read")["rules"],
         [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret],
           "verbs": ["get", "list", "watch"]}])
    expect_metrics_auth_rbac(objs, c, reader_bound_to=f"{EPP}-metrics-reader")


LEGACY_SHAPES = {
    "inferencePool": {"failureMode": "FailClose"},  # this chart's older spelling, alone
    "inferenceExtension": {
        "flags": [{"name": "v", "value": 4}, {"name": "zap-encoder", "value": "console"}],  # v1.0
        "env": {"RUST_BACKTRACE": "1"},  # the map shape upstream's comment shows
        "enableLeaderElection": True,  # v1.0
        "monitoring": {"prometheus": {"auth": {"enabled": False}}},
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "sidecar": {
            "enabled": True, "name": "proxy", "image": "envoyproxy/envoy:v1.34.0",
            "command": "/usr/local/bin/envoy", "args": ["-c", "/etc/proxy/envoy.yaml"],
            "ports": [{"name": "proxy", "containerPort": 8080}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            "volumeMounts": [{"name": "proxy-config", "mountPath": "/etc/proxy"}],
            "volumes": [{"name": "proxy-config", "configMap": {"name": "{{ .Release.Name }}-proxy"}}],
            "configMap": {"name": "my-pool-proxy", "data": {"envoy.yaml": "static_resources: {}\n"}},
        },
    },
    "provider": {"name": "istio"},
    # Upstream v1.1-v1.3's top-level istio block.
    "istio": {"destinationRule": {"trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}},
}


def expect_legacy_shapes(objs: Objs, c: Check) -> None:
    c.flags(objs, v="4", zap_encoder="console", ha_enable_leader_election="true",
            metrics_endpoint_auth="false")
    c.eq("failureMode", pool(objs)["endpointPickerRef"]["failureMode"], "FailClose")
    c.eq("env RUST_BACKTRACE", env(objs).get("RUST_BACKTRACE"), "1")
    c.eq("cluster roles without metrics auth", of_kind(objs, "ClusterRole") + of_kind(objs, "ClusterRoleBinding"), [])
    containers = pod(objs)["containers"]
    c.eq("containers", [x["name"] for x in containers], ["proxy", "epp"])
    c.eq("sidecar command", containers[0].get("command"), ["/usr/local/bin/envoy"])
    c.eq("sidecar args", containers[0].get("args"), ["-c", "/etc/proxy/envoy.yaml"])
    c.eq("volumes", sorted(v["name"] for v in pod(objs)["volumes"]), ["plugins-config", "proxy-config", "scratch", "tmp"])
    c.eq("templated sidecar volume", next(v for v in pod(objs)["volumes"] if v["name"] == "proxy-config"),
         {"name": "proxy-config", "configMap": {"name": "my-pool-proxy"}})
    c.true("EPP mounts scratch", {"name": "scratch", "mountPath": "/scratch"} in epp(objs)["volumeMounts"])
    c.eq("sidecar ConfigMap", one(objs, "ConfigMap", "my-pool-proxy")["data"], {"envoy.yaml": "static_resources: {}\n"})
    c.eq("DestinationRule policy", one(objs, "DestinationRule")["spec"]["trafficPolicy"],
         {"tls": {"mode": "SIMPLE", "insecureSkipVerify": True}, "loadBalancer": {"simple": "LEAST_REQUEST"}})


STRING_FALSES = {
    "inferenceExtension": {
        # Off, so neither a name nor an image is needed.
        "sidecar": {"enabled": "false", "configMap": {"name": "my-pool-proxy", "data": {"a": "b"}}},
        "monitoring": {"prometheus": {"enabled": "false"}},
        "tracing": {"enabled": "false"},
        "latencyPredictor": {"enabled": "false"},
        # Two replicas imply leader election, whatever this says (as with a boolean false).
        "replicas": 2,
        "leaderElection": {"enabled": "false"},
    },
    "experimentalHttpRoute": {"enabled": "false"},
}


def expect_string_falses(objs: Objs, c: Check) -> None:
    """A string "false" is false everywhere (a template's plain truthiness read it as true)."""
    c.eq("containers", [x["name"] for x in pod(objs)["containers"]], ["epp"])
    c.eq("HTTPRoutes", of_kind(objs, "HTTPRoute"), [])
    c.eq("ServiceMonitors", of_kind(objs, "ServiceMonitor"), [])
    c.eq("sidecar ConfigMap", [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"] == "my-pool-proxy"], [])
    c.true("no OTEL_* environment", not any(k.startswith("OTEL_") for k in env(objs)))
    c.flags(objs, tracing="false")


NETWORK_POLICY = {
    "inferenceExtension": {"replicas": 2, "activeActive": {"enabled": True}},
    "networkPolicy": {
        "enabled": "true",
        "gateways": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gw"}}}],
        "scrapers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
}


def expect_network_policy(objs: Objs, c: Check) -> None:
    """ext_proc from the gateways, /metrics from the scrapers, health from anywhere, peers
    from this release's EPPs; nothing else admitted."""
    rules = one(objs, "NetworkPolicy", EPP)["spec"]["ingress"]
    by_port = {r["ports"][0]["port"]: r.get("from") for r in rules}
    c.eq("ports admitted", sorted(by_port), [5570, 9002, 9003, 9090])
    c.eq("ext_proc from", by_port.get(9002), NETWORK_POLICY["networkPolicy"]["gateways"])
    c.eq("metrics from", by_port.get(9090), NETWORK_POLICY["networkPolicy"]["scrapers"])
    c.eq("health from anywhere", by_port.get(9003), None)
    c.eq("peers from the release", by_port.get(5570),
         [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "switchyard-epp",
                                           "app.kubernetes.io/instance": RELEASE}}}])


SCENARIOS = [
    Scenario("network-policy", "networkPolicy on, active-active",
             merged(SELECTOR, NETWORK_POLICY), expect_network_policy),
    Scenario("string-falses", "\"false\" as a string for every enabled switch",
             merged(SELECTOR, STRING_FALSES), expect_string_falses),
    Scenario("upstream-v1.5.0", "upstream v1.5.0 values.yaml unchanged (plus the required selector)",
             merged(upstream("v1.5.0"), SELECTOR), expect_upstream_v150),
    Scenario("upstream-v1.4.0", "upstream v1.4.0 values.yaml unchanged (plus the required selector)",
             merged(upstream("v1.4.0"), SELECTOR), expect_upstream_v140),
    Scenario("upstream-v1.5.0-overrides", "upstream v1.5.0 values with users' usual overrides",
             merged(upstream("v1.5.0"), SELECTOR, OVERRIDES_V150), expect_overrides_v150),
    Scenario("upstream-v1.4.0-gke", "upstream v1.4.0 values on GKE with monitoring and targetPortNumber",
             merged(upstream("v1.4.0"), SELECTOR, OVERRIDES_V140_GKE), expect_v140_gke),
    Scenario("legacy-shapes", "older upstream shapes: list flags, env map, top-level istio, sidecar",
             merged(SELECTOR, LEGACY_SHAPES), expect_legacy_shapes),
]


def _with(*layers: dict[str, Any]) -> dict[str, Any]:
    return merged(SELECTOR, *layers)


def _ext(**kw: Any) -> dict[str, Any]:
    return {"inferenceExtension": kw}


def _pool(**kw: Any) -> dict[str, Any]:
    return {"inferencePool": kw}


REJECTIONS = [
    Rejection("upstream values without a selector (upstream fails too)", upstream("v1.5.0"),
              "inferencePool.modelServers.matchLabels"),
    Rejection("a flag the chart derives, changed", _with(_ext(flags={"grpc-port": 9005})),
              "inferenceExtension.flags.grpc-port (9005) disagrees with the chart, which sets it from inferenceExtension.extProcPort"),
    Rejection("a flag the EPP lacks (reference metric flags)",
              _with(_ext(flags={"total-queued-requests-metric": "vllm:num_requests_waiting"})),
              "the Switchyard EPP has no flag --total-queued-requests-metric"),
    Rejection("a flag that cannot apply here", _with(_ext(flags={"pool-file": "/pool.yaml"})),
              "inferenceExtension.flags.pool-file is refused: local mode"),
    Rejection("a flag written with dashes", _with(_ext(flags={"--v": 3})), "without dashes"),
    Rejection("a drain grace period the chart cannot read", _with(_ext(flags={"drain-grace-period": "1m30s"})),
              "inferenceExtension.flags.drain-grace-period \"1m30s\": write it in one unit"),
    Rejection("a boolean flag that is not a boolean", _with(_ext(flags={"secure-serving": "yes"})),
              "inferenceExtension.flags.secure-serving must be true or false"),
    Rejection("leader election off with two replicas",
              _with(_ext(replicas=2, flags={"ha-enable-leader-election": False})), "more than one replica"),
    Rejection("active-active with leader election",
              _with(_ext(replicas=2, activeActive={"enabled": True}, leaderElection={"enabled": True})),
              "inferenceExtension.activeActive.enabled and leader election exclude each other"),
    Rejection("active-active peers on the ext_proc port",
              _with(_ext(activeActive={"enabled": True, "peersPort": 9002})),
              "inferenceExtension.activeActive.peersPort (9002) is one of the EPP's other ports"),
    Rejection("an unknown failureMode", _with(_ext(failureMode="FailSafe")),
              "inferenceExtension.failureMode must be FailOpen or FailClose"),
    Rejection("both failureMode spellings, disagreeing",
              merged(upstream("v1.5.0"), SELECTOR, _pool(failureMode="FailClose")),
              "inferenceExtension.failureMode (FailOpen) and inferencePool.failureMode (FailClose) disagree"),
    Rejection("targetPortNumber outside targetPorts",
              merged(upstream("v1.5.0"), SELECTOR, _pool(targetPortNumber=8001)),
              "inferencePool.targetPortNumber (8001) is not one of inferencePool.targetPorts"),
    Rejection("a v1alpha2 pool", merged(upstream("v1.4.0"), SELECTOR,
                                        _pool(apiVersion="inference.networking.x-k8s.io/v1alpha2")),
              "inferencePool.apiVersion \"inference.networking.x-k8s.io/v1alpha2\""),
    Rejection("gRPC model servers", _with(_pool(modelServerProtocol="grpc")),
              "inferencePool.modelServerProtocol grpc"),
    Rejection("a parser Switchyard lacks", _with(_pool(parser="vllmgrpc-parser")),
              "inferencePool.parser \"vllmgrpc-parser\""),
    Rejection("an unknown engine", _with(_pool(modelServerType="tgi")), "inferencePool.modelServerType"),
    Rejection("an engine a custom config cannot know",
              _with(_pool(modelServerType="sglang"),
                    _ext(pluginsConfigFile="c.yaml",
                         pluginsCustomConfig={"c.yaml": "plugins:\n- type: queue-scorer\n"})),
              "inferencePool.modelServerType sglang reaches the EPP through a core-metrics-extractor plugin"),
    Rejection("a NetworkPolicy without gateways (none could reach the EPP)",
              _with({"networkPolicy": {"enabled": True}}),
              "networkPolicy.gateways must name the gateways' pods"),
    Rejection("the metrics token as a flag (in the pod spec)",
              _with(_ext(flags={"metrics-bearer-token": "s3cret"})),
              "inferenceExtension.flags.metrics-bearer-token is refused"),
    Rejection("nine ports", _with(_pool(targetPorts=[{"number": 8000 + i} for i in range(9)])),
              "inferencePool.targetPorts needs 1 to 8 ports"),
    Rejection("the latency predictor", merged(upstream("v1.5.0"), SELECTOR, _ext(latencyPredictor={"enabled": True})),
              "inferenceExtension.latencyPredictor.enabled"),
    Rejection("a scrape scheme other than http or https", _with(_ext(metricsDataSource={"scheme": "ftp"})),
              "inferenceExtension.metricsDataSource.scheme \"ftp\" must be http or https"),
    Rejection("standalone mode", _with(_ext(endpointsServer={"createInferencePool": False})),
              "inferenceExtension.endpointsServer"),
    Rejection("a sidecar without an image", _with(_ext(sidecar={"enabled": True, "name": "proxy"})),
              "sidecar.enabled needs sidecar.name and sidecar.image"),
    Rejection("the README's sidecar.configMapData", _with(_ext(sidecar={"configMapData": {"a": "b"}})),
              "inferenceExtension.sidecar.configMapData"),
    Rejection("v1.0's gke.monitoringSecret", _with({"gke": {"monitoringSecret": {"name": "s", "namespace": "default"}}}),
              "gke.monitoringSecret"),
    Rejection("an unknown provider", _with({"provider": {"name": "kgateway"}}), "provider.name must be none, istio or gke"),
    Rejection("a key neither chart has (v0.5's enablePprof)", _with(_ext(enablePprof=True)),
              "additional properties 'enablePprof' not allowed"),
]
