// Offline schema check of every Kubernetes YAML under gateway-configs/ (the plain-Envoy
// bootstraps in gateway-configs/envoy are checked by Envoy itself, in validate.sh).
//
//   node gateway-configs/schema-check/check.mjs              check every file
//   node gateway-configs/schema-check/check.mjs --self-test  also prove that broken documents
//                                                            are rejected
//
// Schemas (installed from npm by `make schema-tools`, pinned in package-lock.json):
//   gateway.networking.k8s.io       @kubernetes-models/gateway-api (Gateway API CRD schemas)
//   networking/install.istio.io     @kubernetes-models/istio
//   gateway.envoyproxy.io           @kubernetes-models/envoy-gateway
//   core, apps, rbac                kubernetes-models (Kubernetes OpenAPI)
//   inference.networking.(x-)k8s.io our own CRDs in manifests/crds (openAPIV3Schema, via ajv),
//                                   with unknown fields rejected as `kubectl --validate=strict`
//   gateway.kgateway.dev            schemas/<group>.json: written here (no published models on
//   agentgateway.dev                npm), only the fields we use, unknown ones rejected
// plus reference checks: every HTTPRoute backendRef to an InferencePool names a pool defined in
// its folder or in common/, and every parentRef names a Gateway defined somewhere here.
// A document whose apiVersion has no schema is an error; Helm values files (no apiVersion,
// name *values*.yaml) are only parsed.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";
import Ajv from "ajv";

const here = path.dirname(fileURLToPath(import.meta.url));
const configsDir = path.resolve(here, "..");
const repoDir = path.resolve(configsDir, "..");
const crdDir = path.join(repoDir, "manifests", "crds");

const MODEL_PACKAGES = {
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "networking.istio.io": "@kubernetes-models/istio",
  "install.istio.io": "@kubernetes-models/istio",
  "security.istio.io": "@kubernetes-models/istio",
  "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
  "": "kubernetes-models",
  apps: "kubernetes-models",
  "rbac.authorization.k8s.io": "kubernetes-models",
};
const CRD_GROUPS = new Set(["inference.networking.k8s.io", "inference.networking.x-k8s.io"]);
// Groups without published schemas: a JSON schema per version and kind, kept in schemas/.
const LOCAL_SCHEMA_GROUPS = new Set(["gateway.kgateway.dev", "agentgateway.dev"]);

// --- schema lookup ------------------------------------------------------------------------

function splitApiVersion(apiVersion) {
  const i = apiVersion.indexOf("/");
  return i < 0 ? ["", apiVersion] : [apiVersion.slice(0, i), apiVersion.slice(i + 1)];
}

async function modelValidator(group, version, kind) {
  const pkg = MODEL_PACKAGES[group];
  const modulePath = group === "" ? `${pkg}/${version}/${kind}` : `${pkg}/${group}/${version}/${kind}`;
  let mod;
  try {
    mod = await import(modulePath);
  } catch {
    return null;
  }
  const Model = mod[kind] ?? mod.default;
  if (!Model) return null;
  return (doc) => {
    try {
      new Model(doc).validate();
      return [];
    } catch (e) {
      return [e.message];
    }
  };
}

// Unknown fields: a structural CRD schema prunes them silently; `kubectl --validate=strict`
// (and we) reject them, so that a misspelt field is an error rather than a no-op.
function strict(schema) {
  if (Array.isArray(schema)) return schema.map(strict);
  if (!schema || typeof schema !== "object") return schema;
  const out = {};
  for (const [k, v] of Object.entries(schema)) {
    out[k] = k === "properties" ? Object.fromEntries(Object.entries(v).map(([p, s]) => [p, strict(s)])) : strict(v);
  }
  if (out.properties && out.additionalProperties === undefined && !out["x-kubernetes-preserve-unknown-fields"]) {
    out.additionalProperties = false;
  }
  return out;
}

let crdCache = null;
function loadCrds() {
  if (crdCache) return crdCache;
  crdCache = [];
  if (!fs.existsSync(crdDir)) return crdCache;
  for (const f of fs.readdirSync(crdDir).filter((f) => /\.ya?ml$/.test(f))) {
    for (const d of parseAllDocuments(fs.readFileSync(path.join(crdDir, f), "utf8"))) {
      const crd = d.toJSON();
      if (crd?.kind === "CustomResourceDefinition") crdCache.push({ file: f, crd });
    }
  }
  return crdCache;
}

const ajv = new Ajv({ allErrors: true, strict: false, validateFormats: false });

function crdValidator(group, version, kind) {
  for (const { file, crd } of loadCrds()) {
    if (crd.spec?.group !== group || crd.spec?.names?.kind !== kind) continue;
    const v = (crd.spec.versions ?? []).find((x) => x.name === version && x.served !== false);
    if (!v?.schema?.openAPIV3Schema) continue;
    const schema = strict(v.schema.openAPIV3Schema);
    // apiVersion/kind/metadata are checked by the API server, not by the CRD schema.
    schema.properties = { apiVersion: { type: "string" }, kind: { type: "string" }, metadata: { type: "object" }, ...schema.properties };
    const validate = ajv.compile(schema);
    return (doc) => (validate(doc) ? [] : validate.errors.map((e) => `${e.instancePath || "/"} ${e.message} (${file})`));
  }
  return null;
}

function localValidator(group, version, kind) {
  const file = path.join(here, "schemas", `${group}.json`);
  if (!fs.existsSync(file)) return null;
  const schema = JSON.parse(fs.readFileSync(file, "utf8"))[version]?.[kind];
  if (!schema) return null;
  const strictSchema = strict(schema);
  strictSchema.properties = { apiVersion: { type: "string" }, kind: { type: "string" }, metadata: { type: "object" }, ...strictSchema.properties };
  const validate = ajv.compile(strictSchema);
  return (doc) => (validate(doc) ? [] : validate.errors.map((e) => `${e.instancePath || "/"} ${e.message} (schemas/${group}.json)`));
}

const validators = new Map();
async function validatorFor(apiVersion, kind) {
  const key = `${apiVersion}/${kind}`;
  if (!validators.has(key)) {
    const [group, version] = splitApiVersion(apiVersion);
    let v = null;
    if (CRD_GROUPS.has(group)) v = crdValidator(group, version, kind);
    else if (LOCAL_SCHEMA_GROUPS.has(group)) v = localValidator(group, version, kind);
    else if (group in MODEL_PACKAGES) v = await modelValidator(group, version, kind);
    validators.set(key, v);
  }
  return validators.get(key);
}

// --- files --------------------------------------------------------------------------------

function yamlFiles(dir) {
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) {
      // Envoy bootstraps are validated by Envoy (envoy/validate.sh); node_modules is ours.
      if (["envoy", "schema-check", "node_modules"].includes(e.name)) continue;
      out.push(...yamlFiles(p));
    } else if (/\.ya?ml$/.test(e.name)) {
      out.push(p);
    }
  }
  return out.sort();
}

async function checkDocuments(entries) {
  const errors = [];
  let checked = 0;
  const pools = new Map(); // folder -> Set(pool name)
  const gateways = new Set();
  const routes = [];
  for (const { file, folder, text } of entries) {
    const docs = parseAllDocuments(text);
    for (const [i, d] of docs.entries()) {
      const where = `${file}#${i + 1}`;
      if (d.errors.length) {
        errors.push(`${where}: YAML: ${d.errors.map((e) => e.message).join("; ")}`);
        continue;
      }
      const doc = d.toJSON();
      if (doc === null || doc === undefined) continue;
      if (!doc.apiVersion || !doc.kind) {
        if (/values\.ya?ml$/.test(file)) continue; // Helm values: parsed, nothing else.
        errors.push(`${where}: no apiVersion/kind`);
        continue;
      }
      const v = await validatorFor(doc.apiVersion, doc.kind);
      if (!v) {
        errors.push(`${where}: no schema for ${doc.apiVersion} ${doc.kind}`);
        continue;
      }
      for (const e of v(doc)) errors.push(`${where}: ${doc.kind} ${doc.metadata?.name}: ${e}`);
      checked++;
      if (doc.kind === "InferencePool") {
        if (!pools.has(folder)) pools.set(folder, new Set());
        pools.get(folder).add(doc.metadata?.name);
      }
      if (doc.kind === "Gateway") gateways.add(doc.metadata?.name);
      if (doc.kind === "HTTPRoute") routes.push({ where, folder, doc });
    }
  }
  for (const { where, folder, doc } of routes) {
    const known = new Set([...(pools.get(folder) ?? []), ...(pools.get("common") ?? [])]);
    for (const rule of doc.spec?.rules ?? []) {
      for (const ref of rule.backendRefs ?? []) {
        if (ref.kind !== "InferencePool") continue;
        if (ref.group !== "inference.networking.k8s.io") {
          errors.push(`${where}: InferencePool backendRef ${ref.name} must use group inference.networking.k8s.io`);
        }
        if (!known.has(ref.name)) errors.push(`${where}: backendRef to unknown InferencePool ${ref.name}`);
      }
    }
    for (const p of doc.spec?.parentRefs ?? []) {
      if ((p.kind ?? "Gateway") === "Gateway" && !gateways.has(p.name)) {
        errors.push(`${where}: parentRef to unknown Gateway ${p.name}`);
      }
    }
  }
  return { errors, checked };
}

function entriesFromDisk() {
  return yamlFiles(configsDir).map((p) => {
    const rel = path.relative(configsDir, p);
    return { file: rel, folder: rel.split(path.sep)[0], text: fs.readFileSync(p, "utf8") };
  });
}

// --- self-test: each broken document must be rejected ---------------------------------------

const POOL = `apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: p}
spec: {selector: {matchLabels: {app: a}}, targetPorts: [{number: 8000}], endpointPickerRef: {name: e, port: {number: 9002}}}
`;
const GW = `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: g}
spec: {gatewayClassName: c, listeners: [{name: http, protocol: HTTP, port: 80}]}
`;
const ROUTE = (extra = "", pool = "p") => `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: g}]
  rules: [{backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: ${pool}}]${extra}}]
`;
const BROKEN = {
  "HTTPRoute path match type not in the enum": ROUTE(", matches: [{path: {type: Prefix, value: /}}]"),
  "HTTPRoute to a pool that does not exist": ROUTE("", "missing"),
  "Gateway listener port out of range": GW.replace("port: 80", "port: 80000"),
  "InferencePool without targetPorts": POOL.replace(", targetPorts: [{number: 8000}]", ""),
  "InferencePool with a misspelt field": POOL.replace("targetPorts:", "appProtocl: http, targetPorts:"),
  "InferencePool failureMode not in the enum": POOL.replace("port: {number: 9002}", "port: {number: 9002}, failureMode: Open"),
  "DestinationRule TLS mode not in the enum": `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec: {host: e, trafficPolicy: {tls: {mode: SIMPLEST}}}
`,
  "EnvoyExtensionPolicy body mode not in the enum": `apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: x}
spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}], extProc: [{backendRefs: [{name: b, port: 9004}], processingMode: {request: {body: Streaming}}}]}
`,
  "kgateway extra Envoy argument over 256 characters": `apiVersion: gateway.kgateway.dev/v1alpha1
kind: GatewayParameters
metadata: {name: p}
spec: {kube: {envoyContainer: {extraArgs: [--config-yaml, "${"x".repeat(257)}"]}}}
`,
  "ClientTrafficPolicy removeOnMatch type not in the enum": `apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: {name: c}
spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}], headers: {earlyRequestHeaders: {removeOnMatch: [{type: StartsWith, value: x-gateway-destination-endpoint}]}}}
`,
  "agentgateway policy phase not in the enum": `apiVersion: agentgateway.dev/v1alpha1
kind: AgentgatewayPolicy
metadata: {name: a}
spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}], traffic: {phase: Early, transformation: {request: {remove: [x-a]}}}}
`,
  "Service port as a string": `apiVersion: v1
kind: Service
metadata: {name: s}
spec: {ports: [{port: "9002"}]}
`,
  "unknown apiVersion": `apiVersion: example.com/v1
kind: Thing
metadata: {name: t}
`,
};

async function selfTest() {
  const base = [
    { file: "self/pool.yaml", folder: "self", text: POOL },
    { file: "self/gw.yaml", folder: "self", text: GW },
  ];
  const good = await checkDocuments([...base, { file: "self/route.yaml", folder: "self", text: ROUTE() }]);
  if (good.errors.length) {
    console.error(`self-test: the valid documents were rejected:\n  ${good.errors.join("\n  ")}`);
    return false;
  }
  let ok = true;
  for (const [name, text] of Object.entries(BROKEN)) {
    const r = await checkDocuments([...base, { file: "self/broken.yaml", folder: "self", text }]);
    if (r.errors.length === 0) {
      console.error(`self-test: NOT rejected: ${name}`);
      ok = false;
    } else {
      console.log(`self-test: rejected ${name}: ${r.errors[0]}`);
    }
  }
  console.log(`self-test: ${Object.keys(BROKEN).length} broken documents, ${ok ? "all rejected" : "some accepted"}`);
  return ok;
}

// --- main ---------------------------------------------------------------------------------

const entries = entriesFromDisk();
const { errors, checked } = await checkDocuments(entries);
for (const e of errors) console.error(`FAIL ${e}`);
console.log(`gateway-configs: ${checked} documents in ${entries.length} files checked, ${errors.length} errors`);
let ok = errors.length === 0;
if (process.argv.includes("--self-test")) ok = (await selfTest()) && ok;
process.exit(ok ? 0 : 1);
