//! A small, allocation-light parser for the Prometheus text exposition format (0.0.4).
//!
//! Model servers expose hundreds of series; the extractor wants a handful. So a [`Sample`] keeps
//! its label block as raw text and only decodes it when asked ([`Sample::label`],
//! [`Sample::labels`]). Comment lines (`# HELP`, `# TYPE`, …) and blank lines are skipped.

use std::borrow::Cow;

/// A parse failure, with the 1-based line where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number in the exposition.
    pub line: usize,
    /// What was wrong.
    pub reason: &'static str,
}

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// The metric name, e.g. `vllm:num_requests_waiting`.
    pub name: &'a str,
    /// The text between `{` and `}`, undecoded (empty when there are no labels).
    pub raw_labels: &'a str,
    /// The sample value (`NaN`, `+Inf`, `-Inf` are accepted).
    pub value: f64,
    /// The optional timestamp in milliseconds.
    pub timestamp_ms: Option<i64>,
}

/// Iterates over the samples of an exposition, yielding an error for each malformed line.
pub fn samples(text: &str) -> Samples<'_> {
    Samples {
        lines: text.lines().enumerate(),
        wanted: None,
    }
}

/// Like [`samples`], but only the lines of metrics `wanted` accepts are parsed: the others are
/// skipped once their name is read (no value, label or timestamp parsing), so an exposition of
/// hundreds of series costs little more than the few a mapping reads. Malformed lines of
/// skipped metrics are not reported.
pub fn samples_named<'a>(text: &'a str, wanted: &'a dyn Fn(&str) -> bool) -> Samples<'a> {
    Samples {
        lines: text.lines().enumerate(),
        wanted: Some(wanted),
    }
}

/// Parses a whole exposition, failing on the first malformed line.
pub fn parse(text: &str) -> Result<Vec<Sample<'_>>, ParseError> {
    let mut out = Vec::new();
    for sample in samples(text) {
        let sample = sample?;
        // Validate the label block eagerly here, so `parse` is a full syntax check.
        for label in sample.labels() {
            label?;
        }
        out.push(sample);
    }
    Ok(out)
}

/// Iterator returned by [`samples`] and [`samples_named`].
#[derive(Clone)]
pub struct Samples<'a> {
    lines: std::iter::Enumerate<std::str::Lines<'a>>,
    wanted: Option<&'a dyn Fn(&str) -> bool>,
}

impl std::fmt::Debug for Samples<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Samples")
            .field("filtered", &self.wanted.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> Iterator for Samples<'a> {
    type Item = Result<Sample<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        for (idx, line) in self.lines.by_ref() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(wanted) = self.wanted {
                // A byte scan (SIMD) for the name's end: most lines are skipped right here.
                let name_end =
                    memchr::memchr3(b'{', b' ', b'\t', line.as_bytes()).unwrap_or(line.len());
                // The three bytes are ASCII, so `name_end` is a char boundary.
                if !line.get(..name_end).is_some_and(wanted) {
                    continue;
                }
            }
            return Some(parse_line(line, idx + 1));
        }
        None
    }
}

fn parse_line(line: &str, line_no: usize) -> Result<Sample<'_>, ParseError> {
    let err = |reason| ParseError {
        line: line_no,
        reason,
    };
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(err("invalid metric name"));
    }
    let mut rest = &line[name_end..];
    let mut raw_labels = "";
    if let Some(after_brace) = rest.strip_prefix('{') {
        let close =
            find_label_block_end(after_brace).ok_or_else(|| err("unterminated label set"))?;
        raw_labels = &after_brace[..close];
        rest = &after_brace[close + 1..];
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| err("missing value"))
        .and_then(|v| parse_value(v).ok_or_else(|| err("invalid value")))?;
    let timestamp_ms = match fields.next() {
        None => None,
        Some(ts) => Some(ts.parse::<i64>().map_err(|_| err("invalid timestamp"))?),
    };
    if fields.next().is_some() {
        return Err(err("trailing garbage"));
    }
    Ok(Sample {
        name,
        raw_labels,
        value,
        timestamp_ms,
    })
}

/// Finds the `}` that closes a label block, skipping quoted values (which may contain `}`).
fn find_label_block_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quotes => i += 1,
            b'"' => in_quotes = !in_quotes,
            b'}' if !in_quotes => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl<'a> Sample<'a> {
    /// Decodes the label pairs lazily.
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            rest: self.raw_labels,
        }
    }

    /// The value of one label, if present and well formed.
    pub fn label(&self, key: &str) -> Option<Cow<'a, str>> {
        self.labels()
            .filter_map(Result::ok)
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// Iterator over `(name, value)` label pairs of a [`Sample`].
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Labels<'a> {
    type Item = Result<(&'a str, Cow<'a, str>), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let err = |reason| Some(Err(ParseError { line: 0, reason }));
        let s = self.rest.trim_start_matches([' ', ',']);
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let Some(eq) = s.find('=') else {
            self.rest = "";
            return err("label without '='");
        };
        let key = s[..eq].trim();
        if !is_label_name(key) {
            self.rest = "";
            return err("invalid label name");
        }
        let after = s[eq + 1..].trim_start();
        let Some(body) = after.strip_prefix('"') else {
            self.rest = "";
            return err("label value not quoted");
        };
        let bytes = body.as_bytes();
        let mut i = 0;
        let mut has_escape = false;
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' {
                has_escape = true;
                i += 1;
            }
            i += 1;
        }
        if i >= bytes.len() {
            self.rest = "";
            return err("unterminated label value");
        }
        let raw = &body[..i];
        self.rest = &body[i + 1..];
        let value = if has_escape {
            Cow::Owned(unescape(raw))
        } else {
            Cow::Borrowed(raw)
        };
        Some(Ok((key, value)))
    }
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{model_name="m"} 0.25
vllm:cache_config_info{block_size="16",num_gpu_blocks="2048",model_name="m"} 1.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a, b",waiting_lora_adapters=""} 1.7e9 1700000000000
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 12
weird{msg="a \"quoted\" } brace\n"} NaN
"#;

    #[test]
    fn parses_vllm_exposition() {
        let samples = parse(VLLM).unwrap();
        assert_eq!(samples.len(), 6);
        assert_eq!(samples[0].name, "vllm:num_requests_waiting");
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[0].label("model_name").as_deref(), Some("m"));
        assert_eq!(samples[2].label("num_gpu_blocks").as_deref(), Some("2048"));
        assert_eq!(samples[3].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(
            samples[3].label("running_lora_adapters").as_deref(),
            Some("a, b")
        );
        assert_eq!(
            samples[3].label("waiting_lora_adapters").as_deref(),
            Some("")
        );
        assert_eq!(samples[4].label("le").as_deref(), Some("+Inf"));
        assert!(samples[5].value.is_nan());
        assert_eq!(
            samples[5].label("msg").as_deref(),
            Some("a \"quoted\" } brace\n")
        );
    }

    #[test]
    fn no_labels_and_integer_values() {
        let s = parse("up 1\nfoo_total 42 123\n").unwrap();
        assert_eq!(s[0].raw_labels, "");
        assert_eq!(s[0].labels().count(), 0);
        assert_eq!(s[1].value, 42.0);
    }

    #[test]
    fn rejects_malformed_lines() {
        assert_eq!(parse("9bad 1").unwrap_err().reason, "invalid metric name");
        assert_eq!(
            parse("x{a=\"1\" 1").unwrap_err().reason,
            "unterminated label set"
        );
        assert_eq!(parse("x").unwrap_err().reason, "missing value");
        assert_eq!(parse("x abc").unwrap_err().reason, "invalid value");
        assert_eq!(
            parse("x{a=1} 1").unwrap_err().reason,
            "label value not quoted"
        );
        assert_eq!(parse("x 1 2 3").unwrap_err().reason, "trailing garbage");
        let e = parse("ok 1\n\nbad{").unwrap_err();
        assert_eq!(e.line, 3);
    }

    #[test]
    fn lazy_iteration_skips_only_bad_lines() {
        let results: Vec<_> = samples("a 1\n!! 2\nb 3\n").collect();
        assert!(results[0].is_ok());
        assert!(results[1].is_err());
        assert_eq!(results[2].as_ref().unwrap().name, "b");
    }
}
