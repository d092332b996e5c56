//! Feature gates (`featureGates`): `name`, `name=true` or `name=false`.
//!
//! As in the reference, a gate nobody registered fails the load. The known gates are those of
//! llm-d-router (`flowControl`, `haPopulateNonLeaderDatastore`) and of the GIE v1.2–v1.5
//! releases whose configs load here (`dataLayer`, `prepareDataPlugins`,
//! `enableLegacyMetrics`). Each is one whose two values are both implemented (`flowControl`),
//! one whose two values behave alike here (setting it is a warning saying so) or one of which
//! only the reference's default is implemented (asking for the other value fails the load,
//! naming what is missing).

use super::ConfigError;

/// The gate that turns on flow control.
pub const FLOW_CONTROL: &str = "flowControl";

/// The gates in force for one config: the defaults, overridden by `featureGates`.
#[derive(Debug, Clone)]
pub struct FeatureGates {
    values: Vec<(&'static str, bool)>,
}

/// A gate some reference EPP registers.
#[derive(Debug)]
struct Gate {
    name: &'static str,
    /// The reference's value when the config leaves the gate out.
    default: bool,
    here: Here,
}

/// What a gate does here.
#[derive(Debug)]
enum Here {
    /// Both values are implemented, as in the reference.
    Both,
    /// Only the default is implemented; the other value fails the load, for this reason.
    DefaultOnly(&'static str),
    /// Both values behave alike here, for this reason.
    NoEffect(&'static str),
}

const GATES: &[Gate] = &[
    Gate {
        name: FLOW_CONTROL,
        default: false,
        here: Here::Both,
    },
    Gate {
        name: "haPopulateNonLeaderDatastore",
        default: true,
        here: Here::DefaultOnly(
            "standby replicas always watch the pool and keep their datastore populated",
        ),
    },
    Gate {
        name: "dataLayer",
        default: true,
        here: Here::NoEffect(
            "engine metrics are always collected through the data layer (GIE v1.5 made this \
             gate a no-op)",
        ),
    },
    Gate {
        name: "prepareDataPlugins",
        default: true,
        here: Here::NoEffect(
            "data producers always run before the scorers, and GIE v1.3-v1.4 computed the same \
             prefix match either way",
        ),
    },
    Gate {
        name: "enableLegacyMetrics",
        default: false,
        here: Here::NoEffect(
            "engine metrics are always scraped through the data layer, which reads the same \
             engine metrics as GIE's legacy path",
        ),
    },
];

// === impl FeatureGates ===

impl FeatureGates {
    /// Checks `featureGates` against the known gates; remarks go to `warnings`.
    pub fn parse(entries: &[String], warnings: &mut Vec<String>) -> Result<Self, ConfigError> {
        let mut values: Vec<(&'static str, bool)> =
            GATES.iter().map(|g| (g.name, g.default)).collect();
        for entry in entries {
            // The reference's reading: the name is what precedes the first `=`, the value
            // what follows it, trimmed and case-insensitive.
            let (name, value) = match entry.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (entry.as_str(), None),
            };
            let Some(gate) = GATES.iter().find(|g| g.name == name) else {
                let known: Vec<&str> = GATES.iter().map(|g| g.name).collect();
                return Err(ConfigError::FeatureGate {
                    gate: name.to_owned(),
                    reason: format!("unknown; known gates: {}", known.join(", ")),
                });
            };
            // `flowControl=true=false` is no boolean (the whole rest is the value).
            let value = match value {
                None => true,
                Some(v) => parse_bool(v).ok_or_else(|| ConfigError::FeatureGate {
                    gate: name.to_owned(),
                    reason: format!("{v:?} is not a boolean"),
                })?,
            };
            match gate.here {
                Here::DefaultOnly(missing) if value != gate.default => {
                    return Err(ConfigError::FeatureGate {
                        gate: format!("{name}={value}"),
                        reason: missing.to_owned(),
                    });
                }
                Here::DefaultOnly(_) | Here::Both => {}
                Here::NoEffect(why) => {
                    warnings.push(format!("feature gate {name:?} has no effect here: {why}"));
                }
            }
            for (n, v) in &mut values {
                if *n == gate.name {
                    *v = value;
                }
            }
        }
        Ok(Self { values })
    }

    /// Whether `gate` is on.
    pub fn enabled(&self, gate: &str) -> bool {
        self.values.iter().any(|&(n, v)| n == gate && v)
    }
}

/// Go's `strconv.ParseBool` over the trimmed, lower-cased text, as the reference reads it.
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Some(true),
        "0" | "f" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> Result<(FeatureGates, Vec<String>), String> {
        let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        let mut warnings = Vec::new();
        FeatureGates::parse(&entries, &mut warnings)
            .map(|g| (g, warnings))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_references() {
        let (gates, warnings) = parse(&[]).unwrap();
        assert!(!gates.enabled(FLOW_CONTROL));
        assert!(gates.enabled("haPopulateNonLeaderDatastore"));
        assert!(!gates.enabled("noSuchGate"));
        assert!(warnings.is_empty());
    }

    #[test]
    fn unknown_gates_and_bad_values_fail() {
        let e = parse(&["warpDrive"]).unwrap_err();
        assert!(
            e.contains("\"warpDrive\"") && e.contains("flowControl"),
            "{e}"
        );
        let e = parse(&["dataLayer=maybe"]).unwrap_err();
        assert!(e.contains("\"maybe\" is not a boolean"), "{e}");
    }

    #[test]
    fn only_implemented_values_load() {
        for on in ["flowControl", "flowControl=true", "flowControl= True "] {
            let (gates, warnings) = parse(&[on]).unwrap();
            assert!(gates.enabled(FLOW_CONTROL) && warnings.is_empty(), "{on}");
        }
        let e = parse(&["flowControl=qwerty"]).unwrap_err();
        assert!(e.contains("\"qwerty\" is not a boolean"), "{e}");
        let (gates, warnings) =
            parse(&["flowControl=false", "haPopulateNonLeaderDatastore=1"]).unwrap();
        assert!(!gates.enabled(FLOW_CONTROL));
        assert!(warnings.is_empty());
        assert!(
            parse(&["haPopulateNonLeaderDatastore=false"])
                .unwrap_err()
                .contains("standby")
        );
    }

    #[test]
    fn gates_without_effect_say_so() {
        let (gates, warnings) = parse(&["dataLayer", "enableLegacyMetrics=f"]).unwrap();
        assert!(gates.enabled("dataLayer"));
        assert!(!gates.enabled("enableLegacyMetrics"));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("dataLayer"));
    }
}
