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

use std::collections::{HashMap, HashSet};
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
}
