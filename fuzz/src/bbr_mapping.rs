//! Harness for the body-based router's mapping sources (`bbr::mapping`): the mapping file of
//! file mode (`parse_file`, YAML or JSON) and a managed ConfigMap's data
//! (`Entry::from_config_map_data`, its `adapters` a YAML list in a string).
//!
//! Shared by the `bbr_mapping` fuzz target and `bbr/tests/fuzz_regressions.rs`.
//!
//! Input: byte 0 is the mode, the rest UTF-8 text. Bit 0 clear: the text is a mapping file.
//! Bit 0 set: ConfigMap data, `baseModel` the text up to the first NUL and `adapters` the rest;
//! bit 1 leaves `baseModel` out, bit 2 `adapters`.
//!
//! Invariants: no panic; an accepted source has a base model and adapters that are valid model
//! names (non-empty, trimmed, what `validate_model_name` accepts), at most
//! `MAX_ADAPTERS_PER_SOURCE` adapters; a file has at most `MAX_SOURCES` entries with distinct
//! keys; the mapping built from it (`Mapping::reset`) takes every entry, resolves each base
//! model to itself and each adapter to the base of the last entry claiming it (a base model
//! keeps its own name).

use std::collections::{BTreeMap, HashSet};

use bbr::mapping::{
    ADAPTERS_KEY, BASE_MODEL_KEY, Entry, MAX_ADAPTERS_PER_SOURCE, MAX_SOURCES, Mapping, parse_file,
};
use ext_proc::openai::validate_model_name;

fn valid(name: &str) {
    assert!(!name.is_empty());
    assert_eq!(name.trim(), name, "an untrimmed name");
    assert!(validate_model_name(name).is_ok(), "{name:?}");
}

fn check_entry(e: &Entry) {
    valid(&e.base_model);
    assert!(e.adapters.len() <= MAX_ADAPTERS_PER_SOURCE);
    e.adapters.iter().for_each(|a| valid(a));
}

fn file(text: &str) {
    let Ok(entries) = parse_file(text) else {
        return;
    };
    assert!(entries.len() <= MAX_SOURCES);
    let keys: HashSet<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), entries.len(), "two entries with one key");
    for (key, e) in &entries {
        assert!(key.starts_with("file/"), "{key}");
        check_entry(e);
    }
    let mapping = Mapping::new();
    assert_eq!(mapping.reset(entries.clone()), 0, "an entry dropped");
    let lookup = mapping.lookup();
    let bases: HashSet<&str> = entries.iter().map(|(_, e)| e.base_model.as_str()).collect();
    assert_eq!(lookup.base_models(), bases.len());
    for base in &bases {
        assert!(lookup.is_base_model(base));
        assert_eq!(lookup.base_model(base), Some(*base));
    }
    for (_, e) in &entries {
        for a in &e.adapters {
            let expected = if bases.contains(a.as_str()) {
                a.as_str()
            } else {
                let (_, last) = entries
                    .iter()
                    .rev()
                    .find(|(_, o)| o.adapters.contains(a))
                    .expect("the entry itself");
                last.base_model.as_str()
            };
            assert_eq!(lookup.base_model(a), Some(expected), "{a}");
            assert!(lookup.is_known(a));
        }
    }
}

fn config_map(mode: u8, text: &str) {
    let (base, adapters) = text.split_once('\0').unwrap_or((text, ""));
    let mut data = BTreeMap::new();
    if mode & 2 == 0 {
        data.insert(BASE_MODEL_KEY.to_owned(), base.to_owned());
    }
    if mode & 4 == 0 {
        data.insert(ADAPTERS_KEY.to_owned(), adapters.to_owned());
    }
    if let Ok(e) = Entry::from_config_map_data(&data) {
        assert!(mode & 2 == 0, "an entry without a baseModel");
        check_entry(&e);
        assert_eq!(e.base_model, base.trim());
        if mode & 4 != 0 {
            assert!(e.adapters.is_empty());
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode & 1 == 0 {
        file(text);
    } else {
        config_map(mode, text);
    }
}
