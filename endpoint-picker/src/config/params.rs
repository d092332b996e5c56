//! A plugin's `parameters` on their way to its factory.
//!
//! Each factory (see [`crate::scheduling::registry`]) decodes its own parameter struct with
//! [`Params::decode`] and checks the values with [`Params::invalid`]. Unknown keys are
//! warnings, not errors: GIE's EPP ignored them, and a config that loads there must load here.

use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use yaml_serde::Value;

use super::ConfigError;

/// The parameters of one plugin instance, with what its errors and warnings must name.
#[derive(Debug)]
pub struct Params<'a> {
    name: &'a str,
    type_name: &'a str,
    value: Option<&'a Value>,
    warnings: &'a mut Vec<String>,
}

/// The parameter struct of plugins that take none: every key given is reported as unknown.
#[derive(Debug, Default, Deserialize)]
struct NoParameters {}

// === impl Params ===

impl<'a> Params<'a> {
    /// The parameters `value` of the instance `name` of `type_name`; warnings go to `warnings`.
    pub fn new(
        name: &'a str,
        type_name: &'a str,
        value: Option<&'a Value>,
        warnings: &'a mut Vec<String>,
    ) -> Self {
        Self {
            name,
            type_name,
            value,
            warnings,
        }
    }

    /// The instance name, for the plugin to keep.
    pub fn name(&self) -> String {
        self.name.to_owned()
    }

    /// Deserializes the parameters into `T` (its `Default` when there are none), warning
    /// about keys `T` does not know.
    pub fn decode<T: DeserializeOwned + Default>(&mut self) -> Result<T, ConfigError> {
        let Some(value) = self.value.filter(|v| !v.is_null()) else {
            return Ok(T::default());
        };
        let mut unknown = Vec::new();
        let parsed: T =
            serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string()))
                .map_err(|source| ConfigError::Parameters {
                    name: self.name.to_owned(),
                    type_name: self.type_name.to_owned(),
                    source,
                })?;
        for p in unknown {
            self.warn(format!("unknown parameter {p:?} ignored"));
        }
        Ok(parsed)
    }

    /// Whether any parameters were given (an empty map or null counts as none).
    pub fn has_parameters(&self) -> bool {
        match self.value {
            None | Some(Value::Null) => false,
            Some(Value::Mapping(m)) => !m.is_empty(),
            Some(_) => true,
        }
    }

    /// For plugins without parameters: warns about every key given.
    pub fn none(&mut self) -> Result<(), ConfigError> {
        self.decode::<NoParameters>().map(drop)
    }

    /// Records a non-fatal remark about this instance.
    pub fn warn(&mut self, remark: impl std::fmt::Display) {
        self.warnings.push(format!(
            "plugin {:?} ({}): {remark}",
            self.name, self.type_name
        ));
    }

    /// The error for `parameter` having a value out of range.
    pub fn invalid(&self, parameter: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidParameter {
            name: self.name.to_owned(),
            type_name: self.type_name.to_owned(),
            parameter,
            reason: reason.into(),
        }
    }

    /// `v` as a count that must be > 0 when given.
    pub fn positive(
        &self,
        parameter: &'static str,
        v: Option<i64>,
    ) -> Result<Option<usize>, ConfigError> {
        match v {
            None => Ok(None),
            Some(n) if n > 0 => usize::try_from(n)
                .map(Some)
                .map_err(|_| self.invalid(parameter, format!("too large: {n}"))),
            Some(n) => Err(self.invalid(parameter, format!("must be > 0, got {n}"))),
        }
    }

    /// `v` as a count that must be ≥ 0 when given.
    pub fn non_negative(
        &self,
        parameter: &'static str,
        v: Option<i64>,
    ) -> Result<Option<u64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(n) => u64::try_from(n)
                .map(Some)
                .map_err(|_| self.invalid(parameter, "must be ≥ 0")),
        }
    }
}

/// Parses a Go-style duration (`200ms`, `2s`, `1m30s`, `1.5h`, or `0`), as Go's
/// `time.ParseDuration` reads the reference's: a number without a unit is refused but for `0`
/// (`"2"` had read as 2 s here, where the reference refuses it and a reader may take it for
/// milliseconds), as the duration flags are.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    // Empty is no duration (Go's `invalid duration ""`), not zero: `defaultRequestTTL: ""`
    // had read as "no TTL", a wait without end.
    if s.is_empty() {
        return None;
    }
    if let Ok(number) = s.parse::<f64>() {
        return (number == 0.0).then_some(Duration::ZERO);
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}
