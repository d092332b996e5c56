//! The names of the gateway ↔ EPP protocol, in one place: routing headers and metadata keys
//! (GIE's endpoint-picker protocol), the control headers a request may carry, and the headers
//! the EPP adds to responses.
//!
//! The reference EPP renamed its control headers from `x-gateway-*` to `x-llm-d-*` and accepts
//! both; so does Switchyard. Where two spellings exist, the `x-llm-d-*` one wins when a request
//! carries both.

/// The routing header: `ip:port[,ip:port…]`, primary first, fallbacks after.
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
/// Every request header starting with this is the EPP's to set; a client's copy is removed.
pub const PROTECTED_HEADER_PREFIX: &str = "x-gateway-destination-endpoint";
/// Subset hint key under [`SUBSET_HINT_NAMESPACE`].
pub const DESTINATION_SUBSET: &str = "x-gateway-destination-endpoint-subset";
/// Served endpoint key under [`LB_NAMESPACE`] (response path).
pub const DESTINATION_SERVED: &str = "x-gateway-destination-endpoint-served";
/// Per-endpoint scores under [`LB_NAMESPACE`] (`--emit-endpoint-scores`).
pub const DESTINATION_SCORES: &str = "x-gateway-destination-endpoint-scores";
/// Envoy's load-balancer metadata namespace.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Subset hint namespace.
pub const SUBSET_HINT_NAMESPACE: &str = "envoy.lb.subset_hint";

/// Upstream request headers only the EPP's plugins set (a client's copy is always removed),
/// e.g. `x-kv-cache-source-host-port` (`p2p-source-producer`).
pub use endpoint_picker::scheduling::{INTERNAL_REQUEST_HEADERS, KV_CACHE_SOURCE_HEADER};

/// `x-request-id` (generated when absent).
pub const REQUEST_ID: &str = "x-request-id";

/// A control header with its current and legacy spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlHeader {
    /// The reference's current name (`x-llm-d-*`).
    pub name: &'static str,
    /// The older name, still accepted.
    pub legacy: Option<&'static str>,
}

impl ControlHeader {
    /// Every spelling, current first.
    pub fn spellings(&self) -> impl Iterator<Item = &'static str> {
        std::iter::once(self.name).chain(self.legacy)
    }
}

/// Names the InferenceObjective (and so the priority) of a request.
pub const OBJECTIVE: ControlHeader = ControlHeader {
    name: "x-llm-d-inference-objective",
    legacy: Some("x-gateway-inference-objective"),
};
/// Forces the model the engine sees.
pub const MODEL_REWRITE: ControlHeader = ControlHeader {
    name: "x-llm-d-model-name-rewrite",
    legacy: Some("x-gateway-model-name-rewrite"),
};
/// The request's flow (tenant) for fairness.
pub const FAIRNESS_ID: ControlHeader = ControlHeader {
    name: "x-llm-d-inference-fairness-id",
    legacy: Some("x-gateway-inference-fairness-id"),
};
/// Per-request TTFT objective in milliseconds.
pub const SLO_TTFT_MS: ControlHeader = ControlHeader {
    name: "x-llm-d-slo-ttft-ms",
    legacy: Some("x-slo-ttft-ms"),
};
/// Per-request TPOT objective in milliseconds.
pub const SLO_TPOT_MS: ControlHeader = ControlHeader {
    name: "x-llm-d-slo-tpot-ms",
    legacy: Some("x-slo-tpot-ms"),
};

/// Every control header whose value a client could use to pick its own policy.
pub const CONTROL_HEADERS: [ControlHeader; 5] = [
    OBJECTIVE,
    MODEL_REWRITE,
    FAIRNESS_ID,
    SLO_TTFT_MS,
    SLO_TPOT_MS,
];

/// The fairness id of a request that names none (the reference's default flow).
pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";

/// Why the EPP answered a request itself (response header, reference name).
pub const DROPPED_REASON: &str = "x-llm-d-request-dropped-reason";

/// Opt-in decision trace header on the response (`--debug-decision-header`).
pub const DECISION_HEADER: &str = "x-switchyard-decision";

/// Set by the body-based router (`bbr`): the body's `model`, for route matching.
pub const MODEL_NAME: &str = "x-gateway-model-name";
/// Set by the body-based router: the base model of the body's `model` (itself for a base
/// model, its base for a LoRA adapter, empty for an unknown name), for route matching.
pub const BASE_MODEL_NAME: &str = "x-gateway-base-model-name";
/// The label that marks the ConfigMaps the body-based router reads (upstream's name).
pub const BBR_MANAGED_LABEL: &str = "inference.networking.k8s.io/bbr-managed";
