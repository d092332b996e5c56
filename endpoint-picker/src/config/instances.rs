//! The plugin instances of one config, by name, and how the phases look them up.

use std::collections::HashMap;
use std::sync::Arc;

use yaml_serde::Value;

use super::ConfigError;
use super::params::Params;
use crate::scheduling::plugins::cost::TtftCostProducer;
use crate::scheduling::plugins::p2p::P2pSourceProducer;
use crate::scheduling::plugins::precise::PrecisePrefixCacheProducer;
use crate::scheduling::plugins::prefix::ApproxPrefixCacheProducer;
use crate::scheduling::plugins::response::{ResponsePlugin, ScorerResponse};
use crate::scheduling::registry::{self, Built, Role};

/// The declared plugin instances (plus any the phases add), by name.
#[derive(Debug, Default)]
pub(super) struct Plugins<'a> {
    list: Vec<Instance<'a>>,
    by_name: HashMap<String, usize>,
}

/// One plugin instance.
#[derive(Debug)]
pub(super) struct Instance<'a> {
    /// Its name, unique in the config.
    pub(super) name: String,
    /// The registered type, as written (an alias stays an alias).
    pub(super) type_name: &'static str,
    /// Its parameters as written (`None` for instances the phases add).
    pub(super) parameters: Option<&'a Value>,
    /// What it built.
    pub(super) built: Built,
}

// === impl Plugins ===

impl<'a> Plugins<'a> {
    /// Adds an instance; its name must be new.
    pub(super) fn add(&mut self, instance: Instance<'a>) -> Result<(), ConfigError> {
        if self.by_name.contains_key(&instance.name) {
            return Err(ConfigError::DuplicatePlugin(instance.name));
        }
        self.by_name.insert(instance.name.clone(), self.list.len());
        self.list.push(instance);
        Ok(())
    }

    /// The instance named `name`.
    pub(super) fn get(&self, name: &str) -> Option<&Instance<'a>> {
        self.by_name.get(name).and_then(|&i| self.list.get(i))
    }

    /// The instance `name` refers to from `context`.
    pub(super) fn resolve(&self, context: &str, name: &str) -> Result<&Instance<'a>, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError::UnknownRef {
            context: context.to_owned(),
            plugin: name.to_owned(),
        })
    }

    /// The instance `name` refers to from `context`; an undeclared name that is a type of
    /// `role` gets an instance with default parameters, as the reference makes one.
    pub(super) fn resolve_or_default(
        &mut self,
        context: &str,
        name: &str,
        role: Role,
        warnings: &mut Vec<String>,
    ) -> Result<&Instance<'a>, ConfigError> {
        if self.get(name).is_none()
            && let Some(entry) = registry::lookup(name).filter(|e| e.role == role)
        {
            let built = entry.build(&mut Params::new(name, entry.type_name, None, warnings))?;
            self.add(Instance {
                name: name.to_owned(),
                type_name: entry.type_name,
                parameters: None,
                built,
            })?;
        }
        self.resolve(context, name)
    }

    /// Checks that `name`, referred to from `context`, is declared and of `role`.
    pub(super) fn expect_role(
        &self,
        context: &str,
        name: &str,
        role: Role,
        expected: &'static str,
    ) -> Result<(), ConfigError> {
        let inst = self.resolve(context, name)?;
        if inst.built.role() == role {
            return Ok(());
        }
        Err(ConfigError::WrongRole {
            context: context.to_owned(),
            plugin: name.to_owned(),
            type_name: inst.type_name.to_owned(),
            expected,
        })
    }

    /// The prefix producers, declared or made.
    pub(super) fn prefix_producers(&self) -> Vec<Arc<ApproxPrefixCacheProducer>> {
        self.iter()
            .filter_map(|i| match &i.built {
                Built::PrefixProducer(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// The precise prefix-cache producers (one per `precise-prefix-cache-scorer`).
    pub(super) fn precise_producers(&self) -> Vec<Arc<PrecisePrefixCacheProducer>> {
        self.iter()
            .filter_map(|i| match &i.built {
                Built::PreciseScorer(s) => Some(s.producer.clone()),
                _ => None,
            })
            .collect()
    }

    /// The cost producers, declared or made.
    pub(super) fn cost_producers(&self) -> Vec<Arc<TtftCostProducer>> {
        self.iter()
            .filter_map(|i| match &i.built {
                Built::CostProducer(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// The `p2p-source-producer`s.
    pub(super) fn p2p_producers(&self) -> Vec<Arc<P2pSourceProducer>> {
        self.iter()
            .filter_map(|i| match &i.built {
                Built::P2pSource(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// The response plugins, in declaration order: the declared ones and the response side
    /// of scorers that have one and that a profile uses (`referenced`; `None`: every one), so
    /// that a scorer declared and never used does not write its headers either.
    pub(super) fn response_plugins(
        &self,
        referenced: Option<&std::collections::HashSet<String>>,
    ) -> Vec<Arc<dyn ResponsePlugin>> {
        self.iter()
            .filter_map(|i| match &i.built {
                Built::Response(r) => Some(r.clone()),
                Built::Scorer(s)
                    if s.response_plugin().is_some()
                        && referenced.is_none_or(|r| r.contains(&i.name)) =>
                {
                    Some(Arc::new(ScorerResponse(s.clone())) as Arc<dyn ResponsePlugin>)
                }
                _ => None,
            })
            .collect()
    }

    /// Every instance, in declaration order (those the phases add last).
    pub(super) fn iter(&self) -> std::slice::Iter<'_, Instance<'a>> {
        self.list.iter()
    }
}
