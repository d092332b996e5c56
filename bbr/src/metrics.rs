//! The router's Prometheus metrics: upstream BBR's names (`bbr_*`), plus per-model counts and
//! the mapping's size.
//!
//! Model names come from request bodies: a label per distinct name would let a client grow
//! `/metrics` without limit. The `model` label therefore takes a name of its own only when the
//! mapping knows it (up to [`MAX_KNOWN_MODELS`]) or, for other names, for the first
//! [`MAX_UNKNOWN_MODELS`] seen; every other name is counted as [`OVERFLOW_LABEL`], as the
//! EPP's labels do (`epp::labels`). A known name that leaves the mapping gives its label back,
//! series and all ([`Metrics::reclaim_model_labels`]): with adapters rolled out and retired
//! over weeks, the known slots would otherwise fill with names no longer served, and every new
//! adapter be counted as `other` until a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use epp::supervisor::TaskExitLabels;

use crate::mapping::Lookup;

/// The label value of every model name past the budget.
pub const OVERFLOW_LABEL: &str = "other";
/// Most names the mapping knows that get a label of their own.
pub const MAX_KNOWN_MODELS: usize = 1_000;
/// Most names the mapping does not know that get a label of their own.
pub const MAX_UNKNOWN_MODELS: usize = 20;
/// The `base_model` label of a model the mapping does not know.
pub const UNKNOWN_BASE: &str = "";

/// `field` of the body-field counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabels {
    /// The body field (always `model`).
    pub field: &'static str,
}

/// `model, base_model` of the per-model counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The requested model (bounded, see the module's documentation).
    pub model: Arc<str>,
    /// Its base model from the mapping (empty when unknown).
    pub base_model: Arc<str>,
}

/// `reason` of unmatchable routes (`crate::routes::Reason`: three values).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `unknown_model`, `missing_pool` or `port_mismatch`.
    pub reason: &'static str,
}

/// `code` of refused requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The HTTP status.
    pub code: u16,
}

/// `extension_point, plugin_type, plugin_name` of the processing histogram (upstream's
/// labels; the router's one step is reported as upstream's two default plugins would be).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// `request`.
    pub extension_point: &'static str,
    /// The plugin type.
    pub plugin_type: &'static str,
    /// The plugin name.
    pub plugin_name: &'static str,
}

#[derive(Debug, Default)]
struct Budget {
    names: HashMap<String, Labelled>,
    known: usize,
    unknown: usize,
}

/// A name with a label of its own.
#[derive(Debug)]
struct Labelled {
    label: Arc<str>,
    /// Counted in the known budget (the mapping knew it when it got its label).
    known: bool,
    /// The `base_model` labels it was counted under (its series), up to
    /// [`MAX_BASES_PER_LABEL`]; past that it is never reclaimed (its series could not all
    /// be found).
    bases: Vec<Arc<str>>,
    pinned: bool,
}

/// Base models one model label is tracked under (a mapping change can move an adapter).
const MAX_BASES_PER_LABEL: usize = 8;

/// Every metric of the router.
#[derive(Debug)]
pub struct Metrics {
    success: Counter,
    not_found: Family<FieldLabels, Counter>,
    by_model: Family<ModelLabels, Counter>,
    refused: Family<CodeLabels, Counter>,
    duration: Family<PluginLabels, Histogram>,
    /// Base models in the mapping.
    pub base_models: Gauge,
    /// Adapters in the mapping.
    pub adapters: Gauge,
    /// Adapter names ignored because a base model has the name.
    pub shadowed_adapters: Gauge,
    /// Adapter claims ignored because another source claimed the adapter first.
    pub contested_adapters: Gauge,
    /// Mapping sources (ConfigMaps, file reads) rejected as invalid.
    pub sources_rejected: Counter,
    /// Errors of the ConfigMap watch (each retried by the watcher's backoff, for ever).
    pub watch_errors: Counter,
    /// Unix time (seconds) of the ConfigMap watch's last complete listing or event.
    pub watch_last_success: Gauge,
    /// Open ext_proc streams.
    pub streams_inflight: Gauge,
    /// Supervised tasks that ended unexpectedly.
    pub task_exits: Family<TaskExitLabels, Counter>,
    /// `GET /v1/models` answered by the router.
    pub models_requests: Counter,
    /// Entries in the current `/v1/models` list.
    pub models_listed: Gauge,
    /// Entries left out of the `/v1/models` list by its cap.
    pub models_list_truncated: Gauge,
    unmatchable_routes: Family<ReasonLabels, Gauge>,
    budget: Mutex<Budget>,
    overflow: Arc<str>,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            success: Counter::default(),
            not_found: Family::default(),
            by_model: Family::default(),
            refused: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            base_models: Gauge::default(),
            adapters: Gauge::default(),
            shadowed_adapters: Gauge::default(),
            contested_adapters: Gauge::default(),
            sources_rejected: Counter::default(),
            watch_errors: Counter::default(),
            watch_last_success: Gauge::default(),
            streams_inflight: Gauge::default(),
            task_exits: Family::default(),
            models_requests: Counter::default(),
            models_listed: Gauge::default(),
            models_list_truncated: Gauge::default(),
            unmatchable_routes: Family::default(),
            budget: Mutex::new(Budget::default()),
            overflow: Arc::from(OVERFLOW_LABEL),
        }
    }
}

/// Every family this module registers (names as exposed, without `_total`), checked against
/// the registry by a test.
pub const FAMILIES: [&str; 18] = [
    "bbr_success",
    "bbr_body_field_not_found",
    "bbr_requests_by_model",
    "bbr_requests_refused",
    "bbr_plugin_duration_seconds",
    "bbr_mapping_base_models",
    "bbr_mapping_adapters",
    "bbr_mapping_shadowed_adapters",
    "bbr_mapping_contested_adapters",
    "bbr_mapping_sources_rejected",
    "bbr_mapping_watch_errors",
    "bbr_mapping_watch_last_success_timestamp_seconds",
    "bbr_extproc_streams_inflight",
    "bbr_task_exits",
    "bbr_models_requests",
    "bbr_models_listed",
    "bbr_models_list_truncated",
    "bbr_unmatchable_routes",
];

impl Metrics {
    /// Registers every family under `bbr_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("bbr");
        r.register(
            "success",
            "Requests whose body was read and whose model headers were set",
            self.success.clone(),
        );
        r.register(
            "body_field_not_found",
            "Request bodies without the field (no model headers set)",
            self.not_found.clone(),
        );
        r.register(
            "requests_by_model",
            "Requests by model and the base model it mapped to (bounded labels)",
            self.by_model.clone(),
        );
        r.register(
            "requests_refused",
            "Requests refused by the router (400 bad body, 413 too large)",
            self.refused.clone(),
        );
        r.register(
            "plugin_duration_seconds",
            "Time to read the model from the body and map it, in seconds",
            self.duration.clone(),
        );
        r.register(
            "mapping_base_models",
            "Base models in the adapter mapping",
            self.base_models.clone(),
        );
        r.register(
            "mapping_adapters",
            "LoRA adapters in the adapter mapping",
            self.adapters.clone(),
        );
        r.register(
            "mapping_shadowed_adapters",
            "Adapter names in the mapping ignored because a base model has the name",
            self.shadowed_adapters.clone(),
        );
        // A gauge of the conflicts standing, as the shadowed names: a counter would count one
        // conflict again on every rebuild of the mapping. No label: the names are the log's.
        r.register(
            "mapping_contested_adapters",
            "Adapter claims in the mapping ignored because another source claimed the adapter first for another base model",
            self.contested_adapters.clone(),
        );
        r.register(
            "mapping_sources_rejected",
            "Mapping ConfigMaps or file reads rejected as invalid",
            self.sources_rejected.clone(),
        );
        // The watch retries for ever and readiness stays up on the last good mapping (a
        // router that turned unready would take every model off the gateway): these two are
        // what shows a watch that stopped working after the first listing.
        r.register(
            "mapping_watch_errors",
            "Errors of the mapping ConfigMaps' watch (list or watch calls refused or failed; each retried with backoff)",
            self.watch_errors.clone(),
        );
        r.register(
            "mapping_watch_last_success_timestamp_seconds",
            "Unix time of the mapping ConfigMaps' last complete listing or watch event (0 before the first; a quiet watch does not advance it)",
            self.watch_last_success.clone(),
        );
        r.register(
            "extproc_streams_inflight",
            "Open ext_proc streams",
            self.streams_inflight.clone(),
        );
        r.register(
            "task_exits",
            "Supervised tasks that ended unexpectedly, by task and reason",
            self.task_exits.clone(),
        );
        r.register(
            "models_requests",
            "GET /v1/models requests answered by the router",
            self.models_requests.clone(),
        );
        r.register(
            "models_listed",
            "Entries in the /v1/models list",
            self.models_listed.clone(),
        );
        r.register(
            "models_list_truncated",
            "Models left out of the /v1/models list by its cap",
            self.models_list_truncated.clone(),
        );
        r.register(
            "unmatchable_routes",
            "HTTPRoute rules (per rule, reason and detail) that can never match, by reason (Kubernetes mode)",
            self.unmatchable_routes.clone(),
        );
    }

    /// Sets the number of unmatchable route rules for `reason`.
    pub fn unmatchable(&self, reason: &'static str, n: usize) {
        self.unmatchable_routes
            .get_or_create(&ReasonLabels { reason })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Requests whose model headers were set.
    pub fn success_total(&self) -> u64 {
        self.success.get()
    }

    /// The bounded label of `model`.
    pub fn model_label(&self, lookup: &Lookup, model: &str) -> Arc<str> {
        // The name as the mapping reads it: padded spellings of one model are one label, not
        // one each of the known budget.
        self.label_in(&mut self.budget.lock(), lookup, model)
    }

    /// [`Self::model_label`] under the budget's lock.
    fn label_in(&self, budget: &mut Budget, lookup: &Lookup, model: &str) -> Arc<str> {
        let model = model.trim();
        if let Some(l) = budget.names.get(model) {
            return l.label.clone();
        }
        let known = lookup.is_known(model);
        let room = if known {
            budget.known < MAX_KNOWN_MODELS
        } else {
            budget.unknown < MAX_UNKNOWN_MODELS
        };
        if !room {
            return self.overflow.clone();
        }
        if known {
            budget.known += 1;
        } else {
            budget.unknown += 1;
        }
        let label: Arc<str> = Arc::from(model);
        budget.names.insert(
            model.to_owned(),
            Labelled {
                label: label.clone(),
                known,
                bases: Vec::new(),
                pinned: false,
            },
        );
        label
    }

    /// Gives back the labels of known names the mapping no longer has, and removes their
    /// series. Names outside the mapping keep theirs (they never took a known slot).
    pub fn reclaim_model_labels(&self, lookup: &Lookup) {
        let mut budget = self.budget.lock();
        let gone: Vec<String> = budget
            .names
            .iter()
            .filter(|(name, l)| l.known && !l.pinned && !lookup.is_known(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let Some(l) = budget.names.remove(&name) else {
                continue;
            };
            budget.known -= 1;
            for base_model in l.bases {
                self.by_model.remove(&ModelLabels {
                    model: l.label.clone(),
                    base_model,
                });
            }
        }
    }

    /// A request whose model headers were set.
    pub fn routed(&self, lookup: &Lookup, model: &str, base: Option<&str>) {
        self.success.inc();
        // A base model comes from the mapping, which is bounded; an unknown one is empty.
        let base_model: Arc<str> = Arc::from(base.unwrap_or(UNKNOWN_BASE));
        // The label, where its series are (for a reclaim) and the count, under one hold of
        // the lock a reclaim takes: a series is never made for a label just given back.
        let mut budget = self.budget.lock();
        let model = self.label_in(&mut budget, lookup, model);
        if let Some(l) = budget.names.get_mut(model.as_ref())
            && !l.bases.contains(&base_model)
        {
            if l.bases.len() < MAX_BASES_PER_LABEL {
                l.bases.push(base_model.clone());
            } else {
                l.pinned = true;
            }
        }
        self.by_model
            .get_or_create(&ModelLabels { model, base_model })
            .inc();
    }

    /// A request without a model.
    pub fn no_model(&self) {
        self.not_found
            .get_or_create(&FieldLabels { field: "model" })
            .inc();
    }

    /// A request refused with `code`.
    pub fn refused(&self, code: u16) {
        self.refused.get_or_create(&CodeLabels { code }).inc();
    }

    /// The time spent reading and mapping one body.
    pub fn observe_processing(&self, d: Duration) {
        self.duration
            .get_or_create(&PluginLabels {
                extension_point: "request",
                plugin_type: "base-model-to-header",
                plugin_name: "base-model-to-header",
            })
            .observe(d.as_secs_f64());
    }

    /// The ConfigMap watch listed the ConfigMaps or delivered an event: now is its last success.
    pub fn watch_succeeded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.watch_last_success
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Publishes the mapping's size.
    pub fn mapping_size(&self, lookup: &Lookup) {
        self.base_models
            .set(i64::try_from(lookup.base_models()).unwrap_or(i64::MAX));
        self.adapters
            .set(i64::try_from(lookup.adapters()).unwrap_or(i64::MAX));
        self.shadowed_adapters
            .set(i64::try_from(lookup.shadowed()).unwrap_or(i64::MAX));
        self.contested_adapters
            .set(i64::try_from(lookup.contested()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::mapping::{Entry, Mapping};

    /// Fresh metrics, and a mapping of one base model `llama` with one adapter `food`.
    fn llama_with_food() -> (Metrics, Arc<Mapping>) {
        let mapping = Mapping::new();
        mapping
            .apply("a", Entry::new(Some("llama"), ["food"]).unwrap())
            .unwrap();
        (Metrics::default(), mapping)
    }

    /// Whitespace-padded spellings of one mapped adapter (the lookup trims) share its label:
    /// they once took one of the 1,000 known labels each, and a model mapped later was then
    /// counted as "other".
    #[test]
    fn padded_names_share_one_label() {
        let (m, mapping) = llama_with_food();
        let lookup = mapping.lookup();
        let mut sent = 0;
        'outer: for lead in 0..100 {
            for trail in 0..100 {
                let name = format!("{}food{}", " ".repeat(lead), " ".repeat(trail));
                ext_proc::openai::validate_model_name(&name).unwrap();
                m.routed(&lookup, &name, lookup.base_model(&name));
                sent += 1;
                if sent == MAX_KNOWN_MODELS {
                    break 'outer;
                }
            }
        }
        mapping
            .apply("b", Entry::new(Some("qwen"), ["sql"]).unwrap())
            .unwrap();
        let lookup = mapping.lookup();
        assert_eq!(&*m.model_label(&lookup, "  food "), "food");
        assert_eq!(&*m.model_label(&lookup, "sql"), "sql");
        assert_eq!(&*m.model_label(&lookup, "qwen"), "qwen");
    }

    /// A known model that leaves the mapping gives its label back, series and all: models
    /// mapped later get labels of their own instead of `other`.
    #[test]
    fn labels_of_models_no_longer_mapped_are_given_back() {
        let mapping = Mapping::new();
        let names: Vec<String> = (0..MAX_KNOWN_MODELS).map(|i| format!("a{i}")).collect();
        mapping
            .apply(
                "old",
                Entry::new(Some("base"), names.iter().map(String::as_str)).unwrap(),
            )
            .unwrap();
        let m = Metrics::default();
        let lookup = mapping.lookup();
        for n in &names {
            m.routed(&lookup, n, lookup.base_model(n));
        }
        // The base model took no slot of its own yet; the budget is full of adapters.
        mapping.delete("old");
        mapping
            .apply("new", Entry::new(Some("base"), ["fresh"]).unwrap())
            .unwrap();
        let lookup = mapping.lookup();
        assert_eq!(&*m.model_label(&lookup, "fresh"), OVERFLOW_LABEL, "full");
        m.reclaim_model_labels(&lookup);
        assert_eq!(&*m.model_label(&lookup, "fresh"), "fresh");
        m.routed(&lookup, "fresh", lookup.base_model("fresh"));
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("bbr_requests_by_model_total{"))
            .collect();
        assert_eq!(
            series,
            [r#"bbr_requests_by_model_total{model="fresh",base_model="base"} 1"#]
        );
    }

    #[test]
    fn client_model_names_cannot_grow_the_label_set() {
        let (m, mapping) = llama_with_food();
        let lookup = mapping.lookup();
        for i in 0..10_000 {
            m.routed(&lookup, &format!("random-{i}"), None);
        }
        m.routed(&lookup, "food", Some("llama"));
        // Families without a series are not exposed; give each one.
        m.no_model();
        m.refused(400);
        m.observe_processing(Duration::from_micros(10));
        m.task_exits
            .get_or_create(&TaskExitLabels {
                task: "watch-configmaps".into(),
                reason: "returned",
            })
            .inc();
        m.unmatchable("missing_pool", 1);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("bbr_requests_by_model_total{"))
            .count();
        assert_eq!(series, MAX_UNKNOWN_MODELS + 2, "{text}");
        assert!(text.contains(r#"model="other""#));
        assert!(text.contains(r#"model="food",base_model="llama""#));
        for family in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
    }
}
