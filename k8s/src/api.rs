//! The custom resources Switchyard reads, as Rust types.
//!
//! * [`InferencePool`] — `inference.networking.k8s.io/v1`, the GA pool API: which pods
//!   (`selector.matchLabels`), which ports on them (`targetPorts`, 1–8, each a data-parallel
//!   rank), how to speak to them (`appProtocol`) and which EPP fronts them
//!   (`endpointPickerRef`, with the gateway's `failureMode`).
//! * [`InferenceObjective`] — `inference.networking.x-k8s.io/v1alpha2`: a named priority that
//!   requests select with the `x-gateway-inference-objective` header.
//! * [`InferenceModelRewrite`] — `inference.networking.x-k8s.io/v1alpha2`: weighted rewrites of
//!   the request's `model` field.
//!
//! The CRD YAML under `manifests/crds/` is generated from these types by the `crdgen` binary
//! (`cargo run -p k8s --bin crdgen`); a test fails when the checked-in files drift.
//! Validation the API server enforces (ranges, enums, list sizes, the unique-port CEL rule) is
//! declared here so the generated schemas carry it.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Group of the GA pool API.
pub const POOL_GROUP: &str = "inference.networking.k8s.io";
/// Group of the alpha objective and rewrite APIs.
pub const ALPHA_GROUP: &str = "inference.networking.x-k8s.io";

/// Desired state of an InferencePool.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    namespaced,
    status = "InferencePoolStatus",
    shortname = "infpool",
    doc = "InferencePool is the Schema for the InferencePools API: a set of model-server Pods \
           selected by label, the ports they serve on, and the Endpoint Picker that routes to them."
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Which Pods of the pool's namespace are members (matchLabels only, as Service selectors).
    pub selector: LabelSelector,
    /// Ports of the selected Pods; each port is a distinct endpoint (a data-parallel rank).
    #[schemars(length(min = 1, max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    #[x_kube(validation = Rule::new("self.all(p1, self.exists_one(p2, p1.number == p2.number))").message("port number must be unique"))]
    pub target_ports: Vec<Port>,
    /// Protocol of every target port: `http` (HTTP/1.1, the default) or `kubernetes.io/h2c`.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// The Endpoint Picker extension that serves this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<EndpointPickerRef>,
}

/// A label selector restricted to `matchLabels`, so that it maps onto a Service selector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels a Pod must all carry to be a member.
    #[schemars(extend("minProperties" = 1, "maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
}

/// A port on the selected Pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Port {
    /// Port number, 1–65535.
    #[schemars(range(min = 1, max = 65535))]
    pub number: i32,
}

/// The protocol the gateway speaks to the model servers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AppProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    #[serde(rename = "http")]
    Http,
    /// HTTP/2 over cleartext.
    #[serde(rename = "kubernetes.io/h2c")]
    H2c,
}

impl AppProtocol {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::H2c => "kubernetes.io/h2c",
        }
    }
}

/// Reference to the Endpoint Picker serving a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind != 'Service' || has(self.port)").message("port is required when kind is 'Service' or unspecified (defaults to 'Service')"))]
pub struct EndpointPickerRef {
    /// API group of the referent; `""` is the core group.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub group: String,
    /// Kind of the referent; `Service` (ExternalName Services are not supported).
    #[serde(default = "default_service_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Name of the referent.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The Service port of the EPP (required when kind is Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    /// What the gateway does when the EPP does not answer.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

fn default_service_kind() -> String {
    "Service".into()
}

/// How the gateway behaves when the EPP is unavailable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FailureMode {
    /// Route to an endpoint of the gateway's choosing.
    FailOpen,
    /// Fail the request (the API default).
    #[default]
    FailClose,
}

/// Observed state of an InferencePool, written by gateways (shared ownership).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    /// One entry per parent (usually a Gateway) that uses the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub parents: Vec<ParentStatus>,
}

/// The pool's status as one parent sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    /// `Accepted`, `ResolvedRefs`, `Exported`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The parent.
    pub parent_ref: ParentReference,
    /// The controller that wrote this entry (`DOMAIN/PATH`, e.g. `example.net/gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$"
    ))]
    pub controller_name: Option<String>,
}

/// Identifies a parent (a Gateway by default).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// API group; `gateway.networking.k8s.io` by default.
    #[serde(default = "default_gateway_group")]
    #[schemars(length(max = 253))]
    pub group: String,
    /// Kind; `Gateway` by default.
    #[serde(default = "default_gateway_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace; the pool's own when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

fn default_gateway_group() -> String {
    "gateway.networking.k8s.io".into()
}

fn default_gateway_kind() -> String {
    "Gateway".into()
}

/// The `metav1.Condition` shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Accepted`.
    #[schemars(length(max = 316))]
    pub r#type: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// The generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// CamelCase reason.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// Human-readable detail.
    #[schemars(length(max = 32768))]
    pub message: String,
}

/// Status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known yet.
    Unknown,
}

/// Reference from an alpha resource to its pool (same namespace).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolObjectReference {
    /// API group of the pool; `inference.networking.k8s.io` by default.
    #[serde(default = "default_pool_group")]
    #[schemars(length(max = 253))]
    pub group: String,
    /// Kind; `InferencePool` by default.
    #[serde(default = "default_pool_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Pool name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_pool_group() -> String {
    POOL_GROUP.into()
}

fn default_pool_kind() -> String {
    "InferencePool".into()
}

/// Desired state of an InferenceObjective.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "inference.networking.x-k8s.io",
    version = "v1alpha2",
    kind = "InferenceObjective",
    namespaced,
    status = "ConditionsStatus",
    doc = "InferenceObjective gives requests that name it (header x-gateway-inference-objective) \
           a priority within one InferencePool; negative priorities are sheddable."
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceObjectiveSpec {
    /// Higher is more important; negative is sheddable; unset is 0.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_i32"
    )]
    pub priority: Option<i32>,
    /// The pool this objective applies to.
    pub pool_ref: PoolObjectReference,
}

/// Status of the alpha resources: conditions only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct ConditionsStatus {
    /// Known type: `Accepted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Desired state of an InferenceModelRewrite.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "inference.networking.x-k8s.io",
    version = "v1alpha2",
    kind = "InferenceModelRewrite",
    namespaced,
    status = "ConditionsStatus",
    doc = "InferenceModelRewrite rewrites the model named in a request to weighted targets \
           (canaries, A/B tests, aliases) for one InferencePool."
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceModelRewriteSpec {
    /// The pool these rules apply to.
    pub pool_ref: PoolObjectReference,
    /// Ordered rules; the first match wins within this resource.
    pub rules: Vec<InferenceModelRewriteRule>,
}

/// One rewrite rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct InferenceModelRewriteRule {
    /// ORed matches; empty matches every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<Match>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1))]
    pub targets: Vec<TargetModel>,
}

/// A request match.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Match {
    /// Match on the body's `model` field.
    pub model: ModelMatch,
}

/// How a model name is matched.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ModelMatch {
    /// Only `Exact`.
    #[serde(default)]
    pub r#type: MatchType,
    /// The model name.
    #[schemars(length(min = 1))]
    pub value: String,
}

/// Model match kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum MatchType {
    /// Byte-for-byte equality.
    #[default]
    Exact,
    /// A kind this EPP does not know (a newer or laxer CRD allowed it): the match matches
    /// nothing. Read rather than refused, because one object that fails to decode fails the
    /// whole list of its kind, and the watch with it, for every object.
    #[serde(other)]
    #[schemars(skip)]
    Unsupported,
}

/// An integer field of a custom resource, read whatever number it holds: the API server does
/// not enforce `format: int32` (kubernetes/kubernetes#136091), and one object that fails to
/// decode fails the whole list of its kind, so that no objective or rewrite of the namespace
/// would load. Past the range it is clamped; a value that is not a number reads as unset.
fn lenient_i32<'de, D>(deserializer: D) -> Result<Option<i32>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(value.and_then(|v| match v {
        serde_json::Value::Number(n) => {
            let wide = n
                .as_i64()
                .or_else(|| n.as_u64().map(|_| i64::MAX))
                .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))?;
            Some(wide.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32)
        }
        _ => None,
    }))
}

/// A weighted rewrite destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetModel {
    /// Relative weight (all set or none set; none set = uniform).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_i32"
    )]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub weight: Option<i32>,
    /// The model name sent to the engine.
    pub model_rewrite: String,
}

/// The API-review annotation the API server demands of CRDs in `*.k8s.io` groups (KEP 1111);
/// the value is the review that approved the InferencePool API.
pub const API_APPROVED_ANNOTATION: (&str, &str) = (
    "api-approved.kubernetes.io",
    "https://github.com/kubernetes-sigs/gateway-api-inference-extension/pull/1173",
);

/// The generated CRDs, each as one YAML document, with the file name it is checked in under.
pub fn crd_documents() -> Result<Vec<(&'static str, String)>, yaml_serde::Error> {
    let mut pool = InferencePool::crd();
    // Without it, the API server refuses a CRD in the protected inference.networking.k8s.io group.
    pool.metadata.annotations.get_or_insert_default().insert(
        API_APPROVED_ANNOTATION.0.to_owned(),
        API_APPROVED_ANNOTATION.1.to_owned(),
    );
    Ok(vec![
        (
            "inference.networking.k8s.io_inferencepools.yaml",
            yaml_serde::to_string(&pool)?,
        ),
        (
            "inference.networking.x-k8s.io_inferenceobjectives.yaml",
            yaml_serde::to_string(&InferenceObjective::crd())?,
        ),
        (
            "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
            yaml_serde::to_string(&InferenceModelRewrite::crd())?,
        ),
    ])
}

/// The banner put at the top of every generated file.
pub const GENERATED_HEADER: &str =
    "# Generated by `cargo run -p k8s --bin crdgen` from k8s/src/api.rs. Do not edit.\n";
