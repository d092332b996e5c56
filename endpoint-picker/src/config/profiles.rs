//! Scheduling profiles shipped with Switchyard, the reference's default among them. Each is an
//! ordinary `EndpointPickerConfig` file under `endpoint-picker/profiles/`, to be passed with
//! `--config-file`; they are compiled in here so that tests and benchmarks use the same text.

/// `profiles/reference-default.yaml`: the reference EPP's default (queue ×2, KV ×2, prefix ×3).
pub const REFERENCE_DEFAULT: &str = include_str!("../../profiles/reference-default.yaml");

/// `profiles/balanced-prefix.yaml`: prefix affinity with EPP-counted load and even placement
/// of new prefixes (see the file for the reasoning).
pub const BALANCED_PREFIX: &str = include_str!("../../profiles/balanced-prefix.yaml");

/// `profiles/cost-model.yaml`: the cost model alone (predicted TTFT plus a share of decode
/// time, per candidate) with the latency-SLO filter.
pub const COST_MODEL: &str = include_str!("../../profiles/cost-model.yaml");

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
        let c = crate::config::load(COST_MODEL, 1).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let producers = c.scheduler.producer_types();
        assert_eq!(
            producers,
            ["approx-prefix-cache-producer", "ttft-cost-producer"],
            "the prefix match first: the cost model reads it"
        );
    }

    #[test]
    fn the_cost_scorer_alone_gets_both_producers() {
        let c = crate::config::load(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: ttft-cost-scorer\n",
            1,
        )
        .unwrap();
        let producers = c.scheduler.producer_types();
        assert_eq!(
            producers,
            ["approx-prefix-cache-producer", "ttft-cost-producer"]
        );
    }
}
