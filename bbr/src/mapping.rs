//! Which LoRA adapter belongs to which base model: upstream BBR's data, kept per source.
//!
//! A source is one ConfigMap labelled `inference.networking.k8s.io/bbr-managed: "true"` (or one
//! entry of the mapping file) holding `baseModel` (a string) and `adapters` (a YAML list of
//! names, possibly empty). A name resolves as upstream resolves it: an adapter to its base
//! model, a base model named by any source to itself, anything else to nothing.
//!
//! When two sources claim one adapter for different base models, the **first claimant keeps
//! it** (upstream lets the last applied win). ConfigMaps come from every tenant of the watched
//! namespaces: with the last claim winning, any of them could take another team's adapter
//! name, and its prompts, to its own pool by creating one ConfigMap. A claim is dated when its
//! source first lists the adapter (an edit dates only the adapters it adds), so an edit never
//! moves an adapter away from the source serving it, not even an older source's. The refused
//! claims are counted ([`Lookup::contested`]) and logged; when the first claimant's source is
//! deleted or stops claiming the adapter, the next claimant in date order gets it. The dates
//! live in this process: a relist keeps them, and on a fresh process the first listing dates
//! the sources in the order it is given ([`Mapping::relist`]; the ConfigMap watch gives the
//! oldest `creationTimestamp` first, then namespace/name). A mapping file is one author's
//! document, read whole: there a later entry's claim wins, as upstream applies its entries
//! ([`Mapping::reset`]).
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
    /// Adapter names some source claims that a base model claimed first (in name order, at
    /// most [`MAX_SHADOWED_REPORTED`] kept): the base model keeps the name.
    shadowed: Vec<String>,
    shadowed_count: usize,
    /// Adapter claims refused because another source claimed the adapter first for another
    /// base model, each as a line for the log (escaped, in name order, at most
    /// [`MAX_SHADOWED_REPORTED`] kept).
    contested: Vec<String>,
    contested_count: usize,
}

/// Most adapter names shadowing a base model (or contested) kept for the log (all are counted).
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

    /// Adapter claims dropped because a base model claimed the name first (a second team's
    /// ConfigMap naming an adapter like another's base model would otherwise take that model's
    /// traffic).
    pub fn shadowed(&self) -> usize {
        self.shadowed_count
    }

    /// Claims refused because another source had claimed the name first as an adapter: an
    /// adapter claim for another base model (a ConfigMap naming another team's adapter would
    /// otherwise take its requests), or a base model named like it. Adapter names a base model
    /// claimed first are counted in [`Self::shadowed`] instead.
    pub fn contested(&self) -> usize {
        self.contested_count
    }
}

/// One accepted source.
#[derive(Debug)]
struct Source {
    entry: Entry,
    /// When it was first accepted: its place on a relist, ahead of sources accepted later.
    accepted: u64,
    /// When it claimed each adapter, in `entry.adapters`' order: of two claims on an adapter,
    /// the earlier keeps it.
    claims: Vec<u64>,
    /// When it claimed its base model's name: of a base model's and an adapter's claim on one
    /// name, the earlier keeps it.
    base_claimed: u64,
}

impl Source {
    /// `entry` under a key that held `previous`: claims `previous` made keep their dates, new
    /// ones are dated `now`.
    fn claiming(previous: Option<Source>, entry: Entry, now: u64) -> Source {
        let Some(previous) = previous else {
            return Source {
                claims: vec![now; entry.adapters.len()],
                entry,
                accepted: now,
                base_claimed: now,
            };
        };
        if previous.entry == entry {
            return previous;
        }
        // Both lists are in name order: one merge walk.
        let mut old = previous
            .entry
            .adapters
            .iter()
            .zip(&previous.claims)
            .peekable();
        let claims = entry
            .adapters
            .iter()
            .map(|a| {
                while old.next_if(|(o, _)| o.as_str() < a.as_str()).is_some() {}
                old.next_if(|(o, _)| *o == a).map_or(now, |(_, d)| *d)
            })
            .collect();
        let base_claimed = if previous.entry.base_model == entry.base_model {
            previous.base_claimed
        } else {
            now
        };
        Source {
            entry,
            accepted: previous.accepted,
            claims,
            base_claimed,
        }
    }
}

/// The claim that keeps an adapter so far.
struct Kept<'a> {
    /// Claim date, then the source's acceptance, then its key: the smallest keeps the adapter
    /// (dates are distinct between sources; the rest makes the order total whatever the map's
    /// iteration order).
    rank: (u64, u64, &'a str),
    base: &'a str,
}

#[derive(Debug, Default)]
struct Sources {
    /// Source key → the source.
    entries: HashMap<String, Source>,
    /// The last date given (claims and acceptances share one clock).
    next: u64,
}

impl Sources {
    /// A date later than every one given so far.
    fn now(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn build(&self) -> Lookup {
        let mut lookup = Lookup::default();
        let mut kept: HashMap<&str, Kept<'_>> = HashMap::new();
        for (key, source) in &self.entries {
            let base = source.entry.base_model.as_str();
            *lookup.base_models.entry(base.to_owned()).or_default() += 1;
            for (adapter, &claimed) in source.entry.adapters.iter().zip(&source.claims) {
                let claim = Kept {
                    rank: (claimed, source.accepted, key.as_str()),
                    base,
                };
                match kept.entry(adapter.as_str()) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(claim);
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        if claim.rank < o.get().rank {
                            o.insert(claim);
                        }
                    }
                }
            }
        }
        // The earliest claim on each base model's name.
        let mut base_since: HashMap<&str, u64> = HashMap::new();
        for source in self.entries.values() {
            let since = base_since
                .entry(source.entry.base_model.as_str())
                .or_insert(u64::MAX);
            *since = (*since).min(source.base_claimed);
        }
        // A name claimed as a base model no later than as an adapter is the base model's.
        let shadows = |adapter: &str, k: &Kept<'_>| {
            base_since
                .get(adapter)
                .is_some_and(|&since| since <= k.rank.0)
        };
        // The refused claims: for another base model (two sources agreeing on an adapter's
        // base are no conflict) on a name that is not a base model's first (those are
        // shadowed); and base models named like an adapter claimed before them, which keeps
        // the name: a ConfigMap naming its base model like another team's adapter would
        // otherwise take that adapter's requests.
        let mut refused: Vec<(&str, &str, &str)> = Vec::new();
        for (key, source) in &self.entries {
            for adapter in &source.entry.adapters {
                if let Some(k) = kept.get(adapter.as_str())
                    && k.rank.2 != key.as_str()
                    && k.base != source.entry.base_model
                    && !shadows(adapter, k)
                {
                    refused.push((adapter.as_str(), key.as_str(), k.rank.2));
                }
            }
            let base = source.entry.base_model.as_str();
            if let Some(k) = kept.get(base)
                && k.base != base
                && !shadows(base, k)
            {
                refused.push((base, key.as_str(), k.rank.2));
            }
        }
        // A source's adapter named like its own refused base model is one refusal.
        refused.sort_unstable();
        refused.dedup();
        lookup.contested_count = refused.len();
        if !refused.is_empty() {
            refused.truncate(MAX_SHADOWED_REPORTED);
            // Names from ConfigMaps: escaped and cut (`Untrusted`), three per line.
            lookup.contested = refused
                .into_iter()
                .map(|(adapter, refused, kept)| {
                    format!(
                        "{} (kept by {}, refused for {})",
                        Untrusted(adapter),
                        Untrusted(kept),
                        Untrusted(refused)
                    )
                })
                .collect();
        }
        // A base model keeps its own name when it claimed it first: an adapter claim on it
        // would send every request for that model to another model's pool.
        let mut shadowed: Vec<String> = Vec::new();
        for (adapter, claim) in kept {
            if shadows(adapter, &claim) {
                shadowed.push(adapter.to_owned());
            } else {
                lookup
                    .adapters
                    .insert(adapter.to_owned(), claim.base.to_owned());
            }
        }
        shadowed.sort();
        lookup.shadowed_count = shadowed.len();
        shadowed.truncate(MAX_SHADOWED_REPORTED);
        lookup.shadowed = shadowed;
        for base in lookup.base_models.keys() {
            // A base model whose name an earlier adapter keeps is not listed as one.
            if !lookup.adapters.contains_key(base) {
                lookup.by_base.insert(base.clone(), BTreeSet::new());
            }
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
        // Once per change of the conflicts, not on every rebuild while one stands.
        let previous = self.lookup.load();
        if (lookup.contested_count, &lookup.contested)
            != (previous.contested_count, &previous.contested)
        {
            if lookup.contested() > 0 {
                tracing::warn!(
                    count = lookup.contested(),
                    first = %lookup.contested.join("; "),
                    "mapping: adapters claimed for two base models stay with their first claimant; the later claims are ignored"
                );
            } else {
                tracing::info!("mapping: no adapter claimed for two base models any more");
            }
        }
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

    /// Adds or replaces one source (a ConfigMap event); `Err` leaves the mapping as it was for
    /// that source. The adapters it newly claims are dated now: one another source claimed
    /// first stays with that source.
    pub fn apply(&self, key: &str, entry: Entry) -> Result<(), MappingError> {
        let mut sources = self.sources.lock();
        if !sources.entries.contains_key(key) && sources.entries.len() >= MAX_SOURCES {
            return Err(MappingError::TooLarge("more than 10,000 mapping sources"));
        }
        if sources.entries.get(key).is_some_and(|s| s.entry == entry) {
            return Ok(());
        }
        let others: usize = sources
            .entries
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(_, s)| s.entry.adapters.len())
            .sum();
        if others + entry.adapters.len() > MAX_TOTAL_ADAPTERS {
            return Err(MappingError::TooLarge(
                "more than 100,000 adapters over all sources",
            ));
        }
        let now = sources.now();
        let previous = sources.entries.remove(key);
        let source = Source::claiming(previous, entry, now);
        sources.entries.insert(key.to_owned(), source);
        self.publish(&sources);
        Ok(())
    }

    /// The source under `key` as it is now.
    pub fn current(&self, key: &str) -> Option<Entry> {
        self.sources
            .lock()
            .entries
            .get(key)
            .map(|s| s.entry.clone())
    }

    /// Removes one source (unknown keys are ignored).
    pub fn delete(&self, key: &str) {
        let mut sources = self.sources.lock();
        if sources.entries.remove(key).is_some() {
            self.publish(&sources);
        }
    }

    /// Replaces every source with a complete listing of the ConfigMaps (the watch's first
    /// listing or a relist) and marks the mapping synced. What this process accepted before
    /// keeps its claims' dates and goes first, in the order it was first accepted; sources new
    /// to it follow in the listing's order (the caller's stable order: the watch lists the
    /// oldest `creationTimestamp` first, then namespace/name). Sources past [`MAX_SOURCES`] or
    /// [`MAX_TOTAL_ADAPTERS`] in that order are dropped and counted in the result: a relist
    /// that changes nothing changes nobody's place, where the API's order (namespace, then
    /// name) let ten full ConfigMaps in namespace `a` push every source after them out. A
    /// source already in whose listed version does not fit keeps its previous one (as
    /// [`Self::apply`] refuses the change), counted too.
    pub fn relist(&self, listing: impl IntoIterator<Item = (String, Entry)>) -> usize {
        let mut sources = self.sources.lock();
        let mut old = std::mem::take(&mut sources.entries);
        let mut known = Vec::new();
        let mut new = Vec::new();
        for (key, entry) in listing {
            match old.get(&key) {
                Some(s) => known.push((s.accepted, key, entry)),
                None => new.push((key, entry)),
            }
        }
        known.sort_by_key(|(accepted, _, _)| *accepted);
        // Room held for the versions the sources already in have, until each is placed: one
        // that grew cannot push out one after it that did not (apply had refused the growth).
        let mut held: usize = known
            .iter()
            .filter_map(|(_, k, _)| old.get(k))
            .map(|s| s.entry.adapters.len())
            .sum();
        let mut dropped = 0;
        let mut adapters = 0usize;
        for (key, entry) in known.into_iter().map(|(_, k, e)| (k, e)).chain(new) {
            if sources.entries.contains_key(&key) {
                // Listed twice (no API server does): the first stays.
                dropped += 1;
                continue;
            }
            let previous = old.remove(&key);
            if let Some(p) = &previous {
                held -= p.entry.adapters.len();
            }
            let room = sources.entries.len() < MAX_SOURCES;
            let fits = |e: &Entry| room && adapters + held + e.adapters.len() <= MAX_TOTAL_ADAPTERS;
            let source = if fits(&entry) {
                let now = sources.now();
                Source::claiming(previous, entry, now)
            } else {
                dropped += 1;
                match previous {
                    Some(p) if fits(&p.entry) => p,
                    _ => continue,
                }
            };
            adapters += source.entry.adapters.len();
            sources.entries.insert(key, source);
        }
        self.publish(&sources);
        drop(sources);
        self.synced.send_replace(true);
        dropped
    }

    /// Replaces every source with one document read whole (the mapping file; a fixed mapping)
    /// and marks the mapping synced. The result depends on the document alone: of two entries
    /// claiming one adapter the later keeps it, as upstream applies its entries in order (one
    /// author wrote them all: no tenant to guard against). Entries past [`MAX_SOURCES`] or
    /// [`MAX_TOTAL_ADAPTERS`], in the document's order, are dropped and counted in the result.
    pub fn reset(&self, listing: impl IntoIterator<Item = (String, Entry)>) -> usize {
        let listing: Vec<(String, Entry)> = listing.into_iter().collect();
        let mut sources = self.sources.lock();
        sources.entries.clear();
        // Dates counting down through the document: a later entry has the earlier claim.
        let first = sources.next;
        let n = u64::try_from(listing.len()).unwrap_or(u64::MAX);
        sources.next = first.saturating_add(n).saturating_add(1);
        let mut dropped = 0;
        let mut adapters = 0usize;
        for (i, (key, entry)) in (0u64..).zip(listing) {
            if sources.entries.len() >= MAX_SOURCES
                || adapters + entry.adapters.len() > MAX_TOTAL_ADAPTERS
                || sources.entries.contains_key(&key)
            {
                dropped += 1;
                continue;
            }
            adapters += entry.adapters.len();
            let date = first.saturating_add(n - i);
            sources.entries.insert(
                key,
                Source {
                    claims: vec![date; entry.adapters.len()],
                    entry,
                    accepted: date,
                    // Before every adapter: in one author's file a base model keeps its name,
                    // which an adapter named like it would take its requests from.
                    base_claimed: 0,
                },
            );
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
        // The first claim on an adapter keeps it; deleting a later claimant changes nothing.
        m.apply("ns/other", Entry::new(Some("qwen"), ["food"]).unwrap())
            .unwrap();
        assert_eq!(m.lookup().base_model("food"), Some("llama"));
        m.delete("ns/other");
        assert_eq!(m.lookup().base_model("food"), Some("llama"));
        m.delete("ns/llama");
        assert_eq!(m.lookup().base_model("food"), None);
        assert_eq!(m.lookup().base_model("llama"), None);
        assert_eq!(m.lookup().base_model("qwen"), Some("qwen"));
    }

    /// Review B3 (a): the last claim on an adapter won, so any tenant able to create a
    /// labelled ConfigMap took another team's adapter, and its prompts, to its own pool. The
    /// first claimant keeps it, through edits, relists in any order and edits of older
    /// sources; the refused claims are counted; the next claimant gets it when the first
    /// stops claiming it.
    #[test]
    fn the_first_claimant_keeps_a_contested_adapter() {
        let e = |base: &str, adapters: &[&str]| Entry::new(Some(base), adapters.iter().copied());
        let m = Mapping::new();
        m.apply("team/llama", e("llama", &["food-review"]).unwrap())
            .unwrap();
        // A tenant in a namespace listed first claims it for its own base model.
        m.apply("a-tenant/evil", e("evil", &["food-review"]).unwrap())
            .unwrap();
        let l = m.lookup();
        assert_eq!(l.base_model("food-review"), Some("llama"));
        assert_eq!((l.adapters(), l.contested()), (1, 1));
        assert_eq!(
            l.contested,
            ["food-review (kept by team/llama, refused for a-tenant/evil)"]
        );
        // Its edits (a new claim date for what it adds only) do not help it.
        m.apply("a-tenant/evil", e("evil", &["food-review", "own"]).unwrap())
            .unwrap();
        assert_eq!(m.lookup().base_model("food-review"), Some("llama"));
        assert_eq!(m.lookup().base_model("own"), Some("evil"));
        // Nor a relist in the API's order (its namespace first).
        let listing = || {
            [
                ("a-tenant/evil", e("evil", &["food-review", "own"])),
                ("team/llama", e("llama", &["food-review"])),
            ]
            .map(|(k, e)| (k.to_owned(), e.unwrap()))
        };
        assert_eq!(m.relist(listing()), 0);
        assert_eq!(m.lookup().base_model("food-review"), Some("llama"));
        // An older source's edit does not take a newer one's adapter either: an edit never
        // moves an adapter from the source serving it.
        m.apply("team/llama", e("llama", &["food-review", "own"]).unwrap())
            .unwrap();
        let l = m.lookup();
        assert_eq!(l.base_model("own"), Some("evil"));
        assert_eq!(l.contested(), 2);
        // A second source for the same base model is no conflict.
        m.apply("team/llama-2", e("llama", &["food-review"]).unwrap())
            .unwrap();
        assert_eq!(m.lookup().contested(), 2);
        // The first claimant stops claiming: the next claimant in date order gets it.
        m.apply("team/llama", e("llama", &[]).unwrap()).unwrap();
        let l = m.lookup();
        assert_eq!(l.base_model("food-review"), Some("evil"));
        assert_eq!(l.contested(), 1, "llama-2's claim is refused now");
        m.delete("a-tenant/evil");
        let l = m.lookup();
        assert_eq!(l.base_model("food-review"), Some("llama"));
        assert_eq!(l.base_model("own"), None);
        assert_eq!(l.contested(), 0);
    }

    /// Review B3 (b): a relist filled the total cap in the API's order (namespace, then name),
    /// so ten full ConfigMaps in namespace `a…` pushed every source after them out, where
    /// applying them one by one had refused them. Sources already in keep their places.
    #[test]
    fn a_relist_keeps_the_sources_already_in_ahead_of_new_ones() {
        let per = MAX_ADAPTERS_PER_SOURCE;
        let fit = MAX_TOTAL_ADAPTERS / per;
        let source = |ns: &str, i: usize| {
            let names: Vec<String> = (0..per).map(|j| format!("{ns}{i}-{j}")).collect();
            let e = Entry::new(
                Some(&format!("{ns}-base")),
                names.iter().map(String::as_str),
            );
            (format!("{ns}/{i}"), e.unwrap())
        };
        let m = Mapping::new();
        for i in 0..fit {
            let (k, e) = source("z", i);
            m.apply(&k, e).unwrap();
        }
        let (k, e) = source("a", 0);
        assert!(m.apply(&k, e).is_err(), "refused one by one");
        let listing = (0..fit)
            .map(|i| source("a", i))
            .chain((0..fit).map(|i| source("z", i)));
        assert_eq!(m.relist(listing), fit);
        let l = m.lookup();
        assert_eq!(l.base_model("z0-0"), Some("z-base"));
        assert_eq!(
            l.base_model(&format!("z{}-{}", fit - 1, per - 1)),
            Some("z-base")
        );
        assert_eq!(l.base_model("a0-0"), None);
        assert_eq!(l.adapters(), MAX_TOTAL_ADAPTERS);
        // A source already in whose new version no longer fits keeps the one it had.
        let (k, mut grown) = source("z", 0);
        grown.adapters.insert("z0-extra".to_owned());
        let listing = std::iter::once((k, grown)).chain((1..fit).map(|i| source("z", i)));
        assert_eq!(m.relist(listing), 1);
        assert_eq!(m.lookup().base_model("z0-0"), Some("z-base"));
        assert_eq!(m.lookup().base_model("z0-extra"), None);
    }

    /// A mapping file is one author's document, read whole: a later entry's claim wins (as
    /// upstream applies them), whatever was read before.
    #[test]
    fn in_a_mapping_file_the_later_entry_keeps_an_adapter() {
        let file = |first: &str, second: &str| {
            [("file/0", first), ("file/1", second)]
                .map(|(k, b)| (k.to_owned(), Entry::new(Some(b), ["x"]).unwrap()))
        };
        let m = Mapping::new();
        m.reset(file("m", "n"));
        assert_eq!(m.lookup().base_model("x"), Some("n"));
        assert_eq!(m.lookup().contested(), 1);
        m.reset(file("n", "m"));
        assert_eq!(m.lookup().base_model("x"), Some("m"));
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

    /// Review 17: a base model named like another source's adapter took that adapter's
    /// requests (the base model always kept the name). The earlier claim keeps it now: a new
    /// ConfigMap cannot move an adapter away from the model serving it, and its own adapters
    /// still resolve to its base model's name.
    #[test]
    fn a_base_model_named_like_an_earlier_adapter_does_not_take_its_requests() {
        let m = Mapping::new();
        m.apply("team-a/llama", Entry::new(Some("llama"), ["food"]).unwrap())
            .unwrap();
        m.apply("team-b/food", Entry::new(Some("food"), ["sql"]).unwrap())
            .unwrap();
        let l = m.lookup();
        assert_eq!(
            l.base_model("food"),
            Some("llama"),
            "still team A's adapter"
        );
        assert_eq!(l.base_model("sql"), Some("food"));
        assert_eq!((l.shadowed(), l.contested()), (0, 1));
        let listed: Vec<&str> = l.by_base().map(|(b, _)| b).collect();
        assert_eq!(listed, ["llama"], "not listed as a base model too");
        // Once team A's claim goes, the name is the base model's.
        m.delete("team-a/llama");
        assert_eq!(m.lookup().base_model("food"), Some("food"));
        // A base model that keeps its name across an update keeps its date: an adapter claimed
        // in between does not take it.
        m.apply("team-c/qwen", Entry::new(Some("qwen"), ["food"]).unwrap())
            .unwrap();
        m.apply(
            "team-b/food",
            Entry::new(Some("food"), ["sql", "web"]).unwrap(),
        )
        .unwrap();
        let l = m.lookup();
        assert_eq!(l.base_model("food"), Some("food"));
        assert_eq!(l.base_model("web"), Some("food"));
        assert_eq!((l.shadowed(), l.contested()), (1, 0));
        // A second source naming that base model later is no contest: the base model keeps
        // the name.
        m.apply("team-d/food", Entry::new(Some("food"), []).unwrap())
            .unwrap();
        assert_eq!(m.lookup().contested(), 0);
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
