//! Which LoRA adapter belongs to which base model: upstream BBR's data, kept per source.
//!
//! A source is one ConfigMap labelled `inference.networking.k8s.io/bbr-managed: "true"` (or one
//! entry of the mapping file) holding `baseModel` (a string) and `adapters` (a YAML list of
//! names, possibly empty). A name resolves as upstream resolves it: an adapter to its base
//! model, a base model named by any source to itself, anything else to nothing. When two
//! sources claim one adapter, the source applied last wins (upstream's behaviour); deleting a
//! source removes its own claims only.
//!
//! The request path reads an immutable [`Lookup`] through an `ArcSwap` (no lock); every
//! change rebuilds it from the sources. Sizes are bounded: a ConfigMap is written by an
//! operator, but a mistake (or a hostile namespace tenant) must not grow the router's memory
//! without limit, so sources, adapters per source and name lengths are capped, and a source
//! over a cap is rejected whole with its reason logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ext_proc::openai::validate_model_name;
use ext_proc::untrusted::Untrusted;
use parking_lot::Mutex;
use serde::Deserialize;

/// ConfigMap key of the base model.
pub const BASE_MODEL_KEY: &str = "baseModel";
/// ConfigMap key of the adapters (a YAML list).
pub const ADAPTERS_KEY: &str = "adapters";
/// Most sources (ConfigMaps or file entries) kept.
pub const MAX_SOURCES: usize = 10_000;
/// Most adapters one source may list.
pub const MAX_ADAPTERS_PER_SOURCE: usize = 10_000;
/// Most bytes of a source's `adapters` value parsed.
pub const MAX_ADAPTERS_BYTES: usize = 1 << 20;
/// Most adapters of all sources together: the per-source caps alone allow 10^8 names, each
/// held three times over and rebuilt on every change. A source that would pass it is refused.
pub const MAX_TOTAL_ADAPTERS: usize = 100_000;

/// Why a source was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// No `baseModel`, or an empty one.
    #[error("missing or empty baseModel")]
    MissingBaseModel,
    /// A name that no request could carry (empty, too long, control characters).
    #[error("invalid model name {name}: {reason}")]
    InvalidName {
        /// The name, escaped and truncated.
        name: String,
        /// Why.
        reason: String,
    },
    /// `adapters` is not a YAML list of strings.
    #[error("adapters is not a YAML list of names: {0}")]
    Adapters(String),
    /// Over a size cap.
    #[error("{0}")]
    TooLarge(&'static str),
}

/// One source's claim: a base model and its adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The base model.
    pub base_model: String,
    /// Its adapters.
    pub adapters: BTreeSet<String>,
}

fn checked_name(raw: &str) -> Result<String, MappingError> {
    // Upstream trims names; a request's model is compared trimmed as well.
    let name = raw.trim();
    validate_model_name(name).map_err(|e| MappingError::InvalidName {
        name: Untrusted(raw).to_string(),
        reason: e.to_string(),
    })?;
    Ok(name.to_owned())
}

impl Entry {
    /// An entry from a base model and adapter names: names trimmed and validated, empty adapter
    /// names skipped (as upstream).
    pub fn new<'a>(
        base_model: Option<&str>,
        adapters: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, MappingError> {
        let base = base_model
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .ok_or(MappingError::MissingBaseModel)?;
        let base_model = checked_name(base)?;
        let mut set = BTreeSet::new();
        for a in adapters {
            if a.trim().is_empty() {
                continue;
            }
            if set.len() == MAX_ADAPTERS_PER_SOURCE {
                return Err(MappingError::TooLarge(
                    "more than 10,000 adapters in one source",
                ));
            }
            set.insert(checked_name(a)?);
        }
        Ok(Self {
            base_model,
            adapters: set,
        })
    }

    /// An entry from a ConfigMap's `data` (`baseModel`, `adapters` as a YAML list).
    pub fn from_config_map_data(data: &BTreeMap<String, String>) -> Result<Self, MappingError> {
        let adapters: Vec<String> = match data.get(ADAPTERS_KEY).map(|s| s.trim()) {
            None | Some("") => Vec::new(),
            Some(raw) if raw.len() > MAX_ADAPTERS_BYTES => {
                return Err(MappingError::TooLarge("adapters is larger than 1 MiB"));
            }
            Some(raw) => endpoint_picker::yaml::from_str::<Option<Vec<String>>>(raw)
                .map_err(|e| MappingError::Adapters(Untrusted(&e.to_string()).to_string()))?
                .unwrap_or_default(),
        };
        Self::new(
            data.get(BASE_MODEL_KEY).map(String::as_str),
            adapters.iter().map(String::as_str),
        )
    }
}

/// What a request's model resolves to.
#[derive(Debug, Default)]
pub struct Lookup {
    adapters: HashMap<String, String>,
    base_models: HashMap<String, usize>,
    /// Base model → its adapters, both in name order: the `/v1/models` listing's order, built
    /// here so that listing never sorts.
    by_base: BTreeMap<String, BTreeSet<String>>,
    /// Adapter names some source claims that are also a base model's (in name order, at most
    /// [`MAX_SHADOWED_REPORTED`] kept): the base model keeps the name.
    shadowed: Vec<String>,
    shadowed_count: usize,
}

/// Most adapter names shadowing a base model kept for the log (all are counted).
const MAX_SHADOWED_REPORTED: usize = 16;

impl Lookup {
    /// The base model of `model`: its base for an adapter, itself for a base model, `None`
    /// for a name no source mentions.
    pub fn base_model<'a>(&'a self, model: &'a str) -> Option<&'a str> {
        let model = model.trim();
        if let Some(base) = self.adapters.get(model) {
            return Some(base);
        }
        self.base_models.contains_key(model).then_some(model)
    }

    /// Adapters known.
    pub fn adapters(&self) -> usize {
        self.adapters.len()
    }

    /// Base models known.
    pub fn base_models(&self) -> usize {
        self.base_models.len()
    }

    /// True when some source has `name` as its base model.
    pub fn is_base_model(&self, name: &str) -> bool {
        self.base_models.contains_key(name.trim())
    }

    /// Every base model with its adapters, in name order (an adapter under the base model whose
    /// claim on it won).
    pub fn by_base(&self) -> impl Iterator<Item = (&str, &BTreeSet<String>)> {
        self.by_base.iter().map(|(b, a)| (b.as_str(), a))
    }

    /// True when `model` is named by some source (a bounded metric label may be given to it).
    pub fn is_known(&self, model: &str) -> bool {
        self.base_model(model).is_some()
    }

    /// Adapter claims dropped because a base model has the name (a second team's ConfigMap
    /// naming an adapter like another's base model would otherwise take that model's traffic).
    pub fn shadowed(&self) -> usize {
        self.shadowed_count
    }
}

#[derive(Debug, Default)]
struct Sources {
    /// Source key → its entry and when it was applied (a sequence number: the last applied
    /// claim on an adapter wins).
    entries: HashMap<String, (Entry, u64)>,
    next: u64,
}

impl Sources {
    fn build(&self) -> Lookup {
        let mut ordered: Vec<&(Entry, u64)> = self.entries.values().collect();
        ordered.sort_by_key(|(_, seq)| *seq);
        let mut lookup = Lookup::default();
        for (entry, _) in ordered {
            *lookup
                .base_models
                .entry(entry.base_model.clone())
                .or_default() += 1;
            for a in &entry.adapters {
                lookup.adapters.insert(a.clone(), entry.base_model.clone());
            }
        }
        // A base model keeps its own name: an adapter claim on it would send every request for
        // that model to another model's pool.
        let mut shadowed: Vec<String> = lookup
            .adapters
            .keys()
            .filter(|a| lookup.base_models.contains_key(*a))
            .cloned()
            .collect();
        shadowed.sort();
        for name in &shadowed {
            lookup.adapters.remove(name);
        }
        lookup.shadowed_count = shadowed.len();
        shadowed.truncate(MAX_SHADOWED_REPORTED);
        lookup.shadowed = shadowed;
        for base in lookup.base_models.keys() {
            lookup.by_base.insert(base.clone(), BTreeSet::new());
        }
        for (adapter, base) in &lookup.adapters {
            if let Some(set) = lookup.by_base.get_mut(base) {
                set.insert(adapter.clone());
            }
        }
        lookup
    }
}

/// The mapping: sources in, [`Lookup`] snapshots out.
#[derive(Debug)]
pub struct Mapping {
    sources: Mutex<Sources>,
    lookup: ArcSwap<Lookup>,
    synced: tokio::sync::watch::Sender<bool>,
    /// Bumped on every new [`Lookup`]: what depends on the mapping (the `/v1/models` listing,
    /// the route index) rebuilds on it.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Mapping {
    fn default() -> Self {
        Self {
            sources: Mutex::new(Sources::default()),
            lookup: ArcSwap::from_pointee(Lookup::default()),
            synced: tokio::sync::watch::channel(false).0,
            version: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Mapping {
    /// An empty, unsynced mapping.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current lookup (lock-free).
    pub fn lookup(&self) -> Arc<Lookup> {
        self.lookup.load_full()
    }

    /// True once a complete listing was applied (readiness).
    pub fn synced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Changes whenever the lookup is replaced.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn publish(&self, sources: &Sources) {
        let lookup = sources.build();
        tracing::debug!(
            sources = sources.entries.len(),
            base_models = lookup.base_models(),
            adapters = lookup.adapters(),
            "mapping updated"
        );
        if lookup.shadowed() > 0 {
            tracing::warn!(
                count = lookup.shadowed(),
                first = ?lookup.shadowed,
                "mapping: adapter names that are also base models are ignored (the base model keeps them)"
            );
        }
        self.lookup.store(Arc::new(lookup));
        self.version.send_modify(|v| *v += 1);
    }

    /// Adds or replaces one source; `Err` leaves the mapping as it was for that source.
    pub fn apply(&self, key: &str, entry: Entry) -> Result<(), MappingError> {
        let mut sources = self.sources.lock();
        if !sources.entries.contains_key(key) && sources.entries.len() >= MAX_SOURCES {
            return Err(MappingError::TooLarge("more than 10,000 mapping sources"));
        }
        if sources.entries.get(key).is_some_and(|(e, _)| *e == entry) {
            return Ok(());
        }
        let others: usize = sources
            .entries
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(_, (e, _))| e.adapters.len())
            .sum();
        if others + entry.adapters.len() > MAX_TOTAL_ADAPTERS {
            return Err(MappingError::TooLarge(
                "more than 100,000 adapters over all sources",
            ));
        }
        sources.next += 1;
        let seq = sources.next;
        sources.entries.insert(key.to_owned(), (entry, seq));
        self.publish(&sources);
        Ok(())
    }

    /// The source under `key` as it is now.
    pub fn current(&self, key: &str) -> Option<Entry> {
        self.sources.lock().entries.get(key).map(|(e, _)| e.clone())
    }

    /// Removes one source (unknown keys are ignored).
    pub fn delete(&self, key: &str) {
        let mut sources = self.sources.lock();
        if sources.entries.remove(key).is_some() {
            self.publish(&sources);
        }
    }

    /// Replaces every source with a complete listing (a relist or a file read) and marks the
    /// mapping synced. Sources over [`MAX_SOURCES`] or [`MAX_TOTAL_ADAPTERS`] are dropped and
    /// counted in the result.
    pub fn reset(&self, listing: impl IntoIterator<Item = (String, Entry)>) -> usize {
        let mut sources = self.sources.lock();
        let old = std::mem::take(&mut sources.entries);
        let mut dropped = 0;
        let mut adapters = 0usize;
        for (key, entry) in listing {
            if sources.entries.len() >= MAX_SOURCES
                || adapters + entry.adapters.len() > MAX_TOTAL_ADAPTERS
            {
                dropped += 1;
                continue;
            }
            adapters += entry.adapters.len();
            // A source unchanged by the relist keeps its place in the order of claims.
            let seq = match old.get(&key) {
                Some((e, seq)) if *e == entry => *seq,
                _ => {
                    sources.next += 1;
                    sources.next
                }
            };
            sources.entries.insert(key, (entry, seq));
        }
        self.publish(&sources);
        drop(sources);
        self.synced.send_replace(true);
        dropped
    }
}

/// The mapping file of file mode: the ConfigMaps' data as one YAML (or JSON) document.
///
/// ```yaml
/// mappings:
/// - name: llama            # optional, for logs
///   baseModel: meta-llama/Llama-3.1-8B-Instruct
///   adapters: [food-review, sql-lora]
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// One entry per base model (a base model may appear in several).
    #[serde(default)]
    pub mappings: Vec<FileEntry>,
}

/// One entry of a [`MappingFile`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileEntry {
    /// A name for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// The base model.
    #[serde(default)]
    pub base_model: Option<String>,
    /// Its adapters.
    #[serde(default)]
    pub adapters: Vec<String>,
}

/// Largest mapping file read.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// Parses a mapping file: every entry must be valid (a file is all or nothing, so a typo never
/// silently drops a model from routing).
pub fn parse_file(text: &str) -> Result<Vec<(String, Entry)>, MappingError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(MappingError::TooLarge("mapping file larger than 16 MiB"));
    }
    let file: MappingFile = endpoint_picker::yaml::from_str(text)
        .map_err(|e| MappingError::Adapters(Untrusted(&e.to_string()).to_string()))?;
    if file.mappings.len() > MAX_SOURCES {
        return Err(MappingError::TooLarge("more than 10,000 mapping entries"));
    }
    file.mappings
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let key = match &f.name {
                Some(n) => format!("file/{i}/{n}"),
                None => format!("file/{i}"),
            };
            Entry::new(
                f.base_model.as_deref(),
                f.adapters.iter().map(String::as_str),
            )
            .map(|e| (key, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data(base: Option<&str>, adapters: Option<&str>) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        if let Some(b) = base {
            d.insert(BASE_MODEL_KEY.into(), b.into());
        }
        if let Some(a) = adapters {
            d.insert(ADAPTERS_KEY.into(), a.into());
        }
        d
    }

    #[test]
    fn config_map_data_parses_as_upstream() {
        let e = Entry::from_config_map_data(&data(
            Some(" meta-llama/Llama-3.1-8B-Instruct "),
            Some("- food-review\n- ' sql-lora '\n- ''\n"),
        ))
        .unwrap();
        assert_eq!(e.base_model, "meta-llama/Llama-3.1-8B-Instruct");
        assert_eq!(
            e.adapters.iter().map(String::as_str).collect::<Vec<_>>(),
            ["food-review", "sql-lora"]
        );
        // No adapters at all: a base model alone.
        let e = Entry::from_config_map_data(&data(Some("qwen"), None)).unwrap();
        assert!(e.adapters.is_empty());
        assert_eq!(
            Entry::from_config_map_data(&data(None, Some("[a]"))),
            Err(MappingError::MissingBaseModel)
        );
        assert!(matches!(
            Entry::from_config_map_data(&data(Some("b"), Some("a: 1"))),
            Err(MappingError::Adapters(_))
        ));
        assert!(matches!(
            Entry::from_config_map_data(&data(Some("b"), Some("[\"a\\nb\"]"))),
            Err(MappingError::InvalidName { .. })
        ));
    }

    /// A namespace tenant's ConfigMap of under 1 MiB whose one long name is referred to by
    /// thousands of aliases would be copied once per alias (tens of GB at the size cap): it is
    /// refused before anything is deserialized.
    #[test]
    fn config_map_aliases_are_refused_before_they_expand() {
        let bomb = format!("[&a \"{}\", {}]", "x".repeat(64 << 10), "*a, ".repeat(200));
        let err = Entry::from_config_map_data(&data(Some("b"), Some(&bomb))).unwrap_err();
        assert!(
            matches!(&err, MappingError::Adapters(m) if m.contains("aliases are not accepted")),
            "{err}"
        );
        let file = "mappings:\n- baseModel: &m llama\n  adapters: [*m]\n";
        assert!(matches!(parse_file(file), Err(MappingError::Adapters(_))));
    }

    /// The adapters of all sources together are capped: a source that would pass the cap is
    /// refused (applied) or dropped and counted (relisted), the mapping left as it was.
    #[test]
    fn all_sources_together_hold_at_most_the_total_cap() {
        let per = MAX_ADAPTERS_PER_SOURCE;
        let source = |i: usize| {
            let names: Vec<String> = (0..per).map(|j| format!("a{i}-{j}")).collect();
            Entry::new(Some(&format!("base-{i}")), names.iter().map(String::as_str)).unwrap()
        };
        let fit = MAX_TOTAL_ADAPTERS / per;
        let m = Mapping::new();
        for i in 0..fit {
            m.apply(&format!("ns/{i}"), source(i)).unwrap();
        }
        assert_eq!(
            m.apply("ns/one-too-many", source(fit)),
            Err(MappingError::TooLarge(
                "more than 100,000 adapters over all sources"
            ))
        );
        // Replacing a source by one of the same size still fits.
        m.apply("ns/0", source(fit)).unwrap();
        assert_eq!(m.lookup().adapters(), MAX_TOTAL_ADAPTERS);
        let dropped = m.reset((0..=fit).map(|i| (format!("ns/{i}"), source(i))));
        assert_eq!(dropped, 1);
        assert_eq!(m.lookup().adapters(), MAX_TOTAL_ADAPTERS);
    }

    #[test]
    fn lookup_resolves_adapters_bases_and_nothing_else() {
        let m = Mapping::new();
        m.apply(
            "ns/llama",
            Entry::new(Some("llama"), ["food", "sql"]).unwrap(),
        )
        .unwrap();
        m.apply("ns/qwen", Entry::new(Some("qwen"), []).unwrap())
            .unwrap();
        let l = m.lookup();
        assert_eq!(l.base_model("food"), Some("llama"));
        assert_eq!(l.base_model(" sql "), Some("llama"));
        assert_eq!(l.base_model("llama"), Some("llama"));
        assert_eq!(l.base_model("qwen"), Some("qwen"));
        assert_eq!(l.base_model("gpt-4"), None);
        // The last applied claim on an adapter wins; deleting it restores nothing of its own.
        m.apply("ns/other", Entry::new(Some("qwen"), ["food"]).unwrap())
            .unwrap();
        assert_eq!(m.lookup().base_model("food"), Some("qwen"));
        m.delete("ns/other");
        assert_eq!(m.lookup().base_model("food"), Some("llama"));
        m.delete("ns/llama");
        assert_eq!(m.lookup().base_model("food"), None);
        assert_eq!(m.lookup().base_model("llama"), None);
        assert_eq!(m.lookup().base_model("qwen"), Some("qwen"));
    }

    #[test]
    fn reset_replaces_everything_and_marks_synced() {
        let m = Mapping::new();
        assert!(!*m.synced().borrow());
        m.apply("a", Entry::new(Some("x"), ["x1"]).unwrap())
            .unwrap();
        let dropped = m.reset([("b".to_owned(), Entry::new(Some("y"), ["y1"]).unwrap())]);
        assert_eq!(dropped, 0);
        assert!(*m.synced().borrow());
        assert_eq!(m.lookup().base_model("x1"), None);
        assert_eq!(m.lookup().base_model("y1"), Some("y"));
    }

    #[test]
    fn sizes_are_capped() {
        let many: Vec<String> = (0..=MAX_ADAPTERS_PER_SOURCE)
            .map(|i| format!("a{i}"))
            .collect();
        assert!(matches!(
            Entry::new(Some("b"), many.iter().map(String::as_str)),
            Err(MappingError::TooLarge(_))
        ));
        let long = "x".repeat(300);
        assert!(matches!(
            Entry::new(Some(&long), []),
            Err(MappingError::InvalidName { .. })
        ));
        let m = Mapping::new();
        let listing =
            (0..=MAX_SOURCES).map(|i| (format!("s{i}"), Entry::new(Some("b"), []).unwrap()));
        assert_eq!(m.reset(listing), 1);
        assert!(m.apply("new", Entry::new(Some("c"), []).unwrap()).is_err());
    }

    /// An adapter named like another source's base model does not take that model's requests
    /// (adapters were looked up first): the base model keeps its name, and the conflict is
    /// counted.
    #[test]
    fn an_adapter_named_like_a_base_model_does_not_take_its_requests() {
        let m = Mapping::new();
        m.apply("ns/llama", Entry::new(Some("llama"), ["food"]).unwrap())
            .unwrap();
        m.apply("ns/team-b", Entry::new(Some("qwen"), ["llama"]).unwrap())
            .unwrap();
        let l = m.lookup();
        assert_eq!(l.base_model("llama"), Some("llama"));
        assert_eq!(l.base_model("food"), Some("llama"));
        assert_eq!((l.adapters(), l.shadowed()), (1, 1));
        assert!(l.by_base().all(|(_, adapters)| !adapters.contains("llama")));
    }

    #[test]
    fn mapping_file_is_all_or_nothing() {
        let ok = parse_file(
            "mappings:\n- name: llama\n  baseModel: llama\n  adapters: [food, sql]\n- baseModel: qwen\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].1.adapters.len(), 2);
        assert!(parse_file("mappings:\n- adapters: [a]\n").is_err());
        assert!(parse_file("mappings:\n- baseModel: b\n  adaptrs: [a]\n").is_err());
        // JSON is YAML.
        assert_eq!(
            parse_file(r#"{"mappings": [{"baseModel": "b", "adapters": ["a"]}]}"#)
                .unwrap()
                .len(),
            1
        );
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    /// The mapping ConfigMaps the gateway configs ship parse as the router reads them.
    #[test]
    fn shipped_model_mapping_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway-configs/body-based-routing/model-mapping.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mapping = Mapping::new();
        let mut n = 0;
        for doc in text.split("\n---") {
            #[derive(Deserialize)]
            struct Cm {
                data: BTreeMap<String, String>,
            }
            let cm: Cm = yaml_serde::from_str(doc).unwrap();
            let entry = Entry::from_config_map_data(&cm.data).unwrap();
            mapping.apply(&format!("default/{n}"), entry).unwrap();
            n += 1;
        }
        assert_eq!(n, 2);
        let l = mapping.lookup();
        assert_eq!(
            l.base_model("food-review-1"),
            Some("meta-llama/Llama-3.1-8B-Instruct")
        );
        assert_eq!(
            l.base_model("legal-summaries"),
            Some("Qwen/Qwen2.5-7B-Instruct")
        );
    }
}
