//! Bounded label values for everything a client names.
//!
//! A model name comes from the request body: left alone, every distinct name would become a
//! label value on about 190 series, and a client sending unique names could grow `/metrics`
//! (and the EPP's memory) without limit. Model label values therefore come from a bounded set:
//!
//! - the models the pool is known to serve — what the engines report (served models and LoRA
//!   adapters), the InferenceModelRewrites' names and targets — up to [`MAX_KNOWN_MODELS`];
//! - plus at most [`MAX_UNKNOWN_MODELS`] other names, first come first served;
//! - every other name is recorded as [`OVERFLOW_LABEL`].
//!
//! A name that has a label of its own keeps it for the life of the process, so a gauge
//! incremented under a label is always decremented under the same one.
//!
//! Fairness ids (a client's header) get the same treatment ([`FairnessLabels`]: the first
//! `--fairness-id-metric-label-limit` ids, 1,000 by default as upstream, then `other`), and
//! families keyed on several such labels at once bound their label *sets* too ([`FirstSeen`]):
//! each label alone is bounded, their product is not.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use arc_swap::ArcSwap;
use endpoint_picker::datastore::PoolSnapshot;
use endpoint_picker::director::Policies;
use parking_lot::RwLock;

/// The label value of every model name past the budget.
pub const OVERFLOW_LABEL: &str = "other";
/// Most names the pool is known to serve that get a label of their own.
pub const MAX_KNOWN_MODELS: usize = 1_000;
/// Most names the pool is not known to serve that get a label of their own.
pub const MAX_UNKNOWN_MODELS: usize = 20;

/// Maps model names to bounded label values.
#[derive(Debug)]
pub struct ModelLabels {
    /// What the pool is known to serve, replaced as discovery and scrapes move.
    known: ArcSwap<HashSet<String>>,
    labelled: RwLock<Labelled>,
    overflow: Arc<str>,
}

#[derive(Debug, Default)]
struct Labelled {
    names: HashMap<String, Arc<str>>,
    known: usize,
    unknown: usize,
}

impl Default for ModelLabels {
    fn default() -> Self {
        Self {
            known: ArcSwap::from_pointee(HashSet::new()),
            labelled: RwLock::new(Labelled::default()),
            overflow: Arc::from(OVERFLOW_LABEL),
        }
    }
}

impl ModelLabels {
    /// The label value for `model`.
    pub fn label(&self, model: &str) -> Arc<str> {
        let known = {
            let labelled = self.labelled.read();
            if let Some(l) = labelled.names.get(model) {
                return l.clone();
            }
            let known = self.known.load().contains(model);
            // A spent budget stays spent (the counts only grow): a client sending a new name
            // with every request then takes the shared lock only, not the exclusive one three
            // times a request.
            let spent = if known {
                labelled.known >= MAX_KNOWN_MODELS
            } else {
                labelled.unknown >= MAX_UNKNOWN_MODELS
            };
            if spent {
                return self.overflow.clone();
            }
            known
        };
        let mut labelled = self.labelled.write();
        if let Some(l) = labelled.names.get(model) {
            return l.clone();
        }
        let admitted = if known {
            labelled.known < MAX_KNOWN_MODELS && {
                labelled.known += 1;
                true
            }
        } else {
            labelled.unknown < MAX_UNKNOWN_MODELS && {
                labelled.unknown += 1;
                true
            }
        };
        if !admitted {
            return self.overflow.clone();
        }
        let label: Arc<str> = Arc::from(model);
        labelled.names.insert(model.to_owned(), label.clone());
        label
    }

    /// Replaces the set of models the pool is known to serve: the engines' served models and
    /// adapters, and the rewrites' names and targets.
    pub fn learn(&self, pool: &PoolSnapshot, policies: &Policies) {
        let mut known: HashSet<String> = HashSet::new();
        for e in &pool.endpoints {
            let m = e.metrics();
            for name in m
                .served_models
                .iter()
                .chain(&m.active_models)
                .chain(&m.waiting_models)
            {
                if known.len() >= MAX_KNOWN_MODELS {
                    break;
                }
                known.insert(name.clone());
            }
        }
        for rule in policies.rewrites.iter().flat_map(|r| &r.rules) {
            for name in rule
                .matches
                .iter()
                .chain(rule.targets.iter().map(|t| &t.model))
            {
                if known.len() >= MAX_KNOWN_MODELS {
                    break;
                }
                known.insert(name.clone());
            }
        }
        if **self.known.load() != known {
            self.known.store(Arc::new(known));
        }
    }

    /// How many names have a label of their own.
    pub fn labelled(&self) -> usize {
        self.labelled.read().names.len()
    }
}

/// Most fairness ids with a label of their own unless `--fairness-id-metric-label-limit` says
/// otherwise (the reference's default).
pub const DEFAULT_MAX_FAIRNESS_LABELS: usize = 1_000;

/// The first `max` distinct values seen, each admitted for the life of the process; later
/// ones are not. What keeps a family's label sets bounded when its values come from clients.
#[derive(Debug)]
pub struct FirstSeen<K> {
    seen: RwLock<HashSet<K>>,
    max: usize,
}

impl<K: Hash + Eq + Clone> FirstSeen<K> {
    /// Admits at most `max` distinct values.
    pub fn new(max: usize) -> Self {
        Self {
            seen: RwLock::new(HashSet::new()),
            max,
        }
    }

    /// Whether `value` is, or now becomes, one of the first `max`.
    pub fn admits(&self, value: &K) -> bool {
        {
            let seen = self.seen.read();
            if seen.contains(value) {
                return true;
            }
            // A spent budget stays spent (values are never given back): a client sending a
            // new value with every request takes the shared lock only.
            if seen.len() >= self.max {
                return false;
            }
        }
        let mut seen = self.seen.write();
        if seen.len() < self.max || seen.contains(value) {
            seen.insert(value.clone());
            return true;
        }
        false
    }
}

/// Fairness ids as label values: the first `limit` distinct ids keep their own (for the life
/// of the process), every later one is [`OVERFLOW_LABEL`]. One instance serves every family
/// labelled by fairness id, so a tenant has its own label everywhere or nowhere.
#[derive(Debug)]
pub struct FairnessLabels {
    ids: FirstSeen<Arc<str>>,
    overflow: Arc<str>,
}

impl Default for FairnessLabels {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_FAIRNESS_LABELS)
    }
}

impl FairnessLabels {
    /// At most `limit` ids with a label of their own (0: every id is `other`).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            ids: FirstSeen::new(limit),
            overflow: Arc::from(OVERFLOW_LABEL),
        }
    }

    /// The label value of `id`.
    pub fn label(&self, id: &Arc<str>) -> Arc<str> {
        if self.ids.admits(id) {
            id.clone()
        } else {
            self.overflow.clone()
        }
    }

    /// The label value of `id`, allocating only for an id not seen before.
    pub fn label_of(&self, id: &str) -> Arc<str> {
        {
            let seen = self.ids.seen.read();
            if let Some(seen) = seen.get(id) {
                return seen.clone();
            }
            if seen.len() >= self.ids.max {
                return self.overflow.clone();
            }
        }
        self.label(&Arc::from(id))
    }

    /// The label value shared by every id past the limit.
    pub fn overflow(&self) -> &Arc<str> {
        &self.overflow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_picker::datastore::{Datastore, EngineMetrics, test_util::pool};

    #[test]
    fn unknown_names_share_one_label_past_the_budget() {
        let labels = ModelLabels::default();
        for i in 0..10_000 {
            let l = labels.label(&format!("model-{i}"));
            if i < MAX_UNKNOWN_MODELS {
                assert_eq!(&*l, format!("model-{i}"));
            } else {
                assert_eq!(&*l, OVERFLOW_LABEL);
            }
        }
        assert_eq!(labels.labelled(), MAX_UNKNOWN_MODELS);
        // A name that got its label keeps it.
        assert_eq!(&*labels.label("model-0"), "model-0");
    }

    #[test]
    fn models_the_pool_serves_are_labelled_even_past_the_unknown_budget() {
        let labels = ModelLabels::default();
        for i in 0..100 {
            labels.label(&format!("junk-{i}"));
        }
        let ds = Datastore::new();
        let snap = ds.apply(pool(1));
        snap.endpoints[0].store_metrics(EngineMetrics {
            served_models: vec!["llama".into()],
            active_models: vec!["lora-a".into()],
            ..Default::default()
        });
        labels.learn(&ds.snapshot(), &Policies::default());
        assert_eq!(&*labels.label("llama"), "llama");
        assert_eq!(&*labels.label("lora-a"), "lora-a");
        assert_eq!(&*labels.label("junk-99"), OVERFLOW_LABEL);
    }

    #[test]
    fn fairness_labels_are_bounded() {
        let labels = FairnessLabels::default();
        for i in 0..(DEFAULT_MAX_FAIRNESS_LABELS + 50) {
            let id: Arc<str> = Arc::from(format!("tenant-{i}").as_str());
            let l = labels.label(&id);
            if i < DEFAULT_MAX_FAIRNESS_LABELS {
                assert_eq!(l, id);
            } else {
                assert_eq!(&*l, OVERFLOW_LABEL);
            }
        }
        assert_eq!(&*labels.label(&Arc::from("tenant-0")), "tenant-0");
    }

    #[test]
    fn a_zero_fairness_limit_labels_every_id_other() {
        let labels = FairnessLabels::with_limit(0);
        assert_eq!(&*labels.label(&Arc::from("tenant-0")), OVERFLOW_LABEL);
        let labels = FairnessLabels::with_limit(1);
        assert_eq!(&*labels.label(&Arc::from("a")), "a");
        assert_eq!(&*labels.label(&Arc::from("b")), OVERFLOW_LABEL);
        assert_eq!(&*labels.label(&Arc::from("a")), "a");
    }
}
