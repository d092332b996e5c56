//! The syncer's Prometheus metrics. Adapter labels come from the config file (at most
//! [`crate::config::MAX_ADAPTERS`] ids), never from a client, and an adapter dropped from the
//! config loses its series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use epp::supervisor::TaskExitLabels;

/// `adapter_name` (upstream's label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabels {
    /// The adapter id.
    pub adapter_name: String,
}

/// `adapter_name, state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The adapter id.
    pub adapter_name: String,
    /// See [`crate::reconcile::AdapterState`].
    pub state: &'static str,
}

/// `operation, result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `load` or `unload`.
    pub operation: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// What happened.
    pub result: &'static str,
}

/// Every metric of the syncer.
#[derive(Debug, Default)]
pub struct Metrics {
    /// 1 while the adapter is loaded, 0 otherwise (upstream's `lora_syncer_adapter_status`).
    pub status: Family<AdapterLabels, Gauge>,
    /// 1 for the adapter's current state.
    pub state: Family<StateLabels, Gauge>,
    /// Load and unload calls.
    pub operations: Family<OperationLabels, Counter>,
    /// Reconcile passes by outcome (`ok`, `engine_unavailable`).
    pub reconciles: Family<ResultLabels, Counter>,
    /// Loaded adapters found missing from the engine (it restarted), each loaded again.
    pub engine_restarts: Counter,
    /// Config file reads that found it changed, by outcome: `ok`; `engine_refused` (valid,
    /// its adapter lists applied to the pinned engine, its `host`/`port` naming another
    /// refused); `error` (missing or invalid, once per distinct error).
    pub config_reloads: Family<ResultLabels, Counter>,
    /// 1 while the last read of the config file gave a valid config, else 0 (from start-up
    /// until the first valid read, and while a bad version is kept out).
    pub config_valid: Gauge,
    /// Supervised tasks that ended unexpectedly.
    pub task_exits: Family<TaskExitLabels, Counter>,
}

/// Every family (names as exposed, without `_total`).
pub const FAMILIES: [&str; 8] = [
    "lora_syncer_adapter_status",
    "lora_syncer_adapter_state",
    "lora_syncer_operations",
    "lora_syncer_reconciles",
    "lora_syncer_engine_restarts",
    "lora_syncer_config_reloads",
    "lora_syncer_config_valid",
    "lora_syncer_task_exits",
];

impl Metrics {
    /// Registers every family under `lora_syncer_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("lora_syncer");
        r.register(
            "adapter_status",
            "1 while the adapter is loaded on the engine, else 0",
            self.status.clone(),
        );
        r.register(
            "adapter_state",
            "1 for each adapter's current state (loaded, unloaded, pending, failed, conflict)",
            self.state.clone(),
        );
        r.register(
            "operations",
            "Adapter load and unload calls to the engine, by result",
            self.operations.clone(),
        );
        r.register(
            "reconciles",
            "Reconcile passes by result",
            self.reconciles.clone(),
        );
        r.register(
            "engine_restarts",
            "Times loaded adapters were found missing from the engine (a restart) and loaded again",
            self.engine_restarts.clone(),
        );
        r.register(
            "config_reloads",
            "Reads of the config file that found it changed, by result (ok, engine_refused, error)",
            self.config_reloads.clone(),
        );
        r.register(
            "config_valid",
            "1 while the last read of the config file gave a valid config, else 0",
            self.config_valid.clone(),
        );
        r.register(
            "task_exits",
            "Supervised tasks that ended unexpectedly, by task and reason",
            self.task_exits.clone(),
        );
    }

    /// Counts one call.
    pub fn operation(&self, operation: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.operations
            .get_or_create(&OperationLabels { operation, result })
            .inc();
    }

    /// Counts one pass or config read.
    pub fn result(family: &Family<ResultLabels, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabels { result }).inc();
    }
}
