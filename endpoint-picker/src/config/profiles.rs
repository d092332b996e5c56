//! Scheduling profiles shipped with Switchyard, beyond the reference default. Each is an
//! ordinary `EndpointPickerConfig` file under `endpoint-picker/profiles/`, to be passed with
//! `--config-file`; they are compiled in here so that tests and benchmarks use the same text.

/// `profiles/balanced-prefix.yaml`: prefix affinity with EPP-counted load and even placement
/// of new prefixes (see the file for the reasoning).
pub const BALANCED_PREFIX: &str = include_str!("../../profiles/balanced-prefix.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_load_without_warnings() {
        let c = crate::config::load(BALANCED_PREFIX, 1).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let scorers: Vec<(&str, f64)> = c.scheduler.profiles()[0]
            .scorers
            .iter()
            .map(|(s, w)| (s.type_name(), *w))
            .collect();
        assert_eq!(
            scorers,
            vec![
                ("queue-scorer", 1.0),
                ("kv-cache-utilization-scorer", 1.0),
                ("prefix-cache-scorer", 3.0),
                ("active-request-scorer", 2.0),
                ("no-hit-lru-scorer", 1.0),
            ]
        );
        assert_eq!(c.scheduler.producers().len(), 1, "prefix producer created");
    }
}
