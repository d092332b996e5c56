//! YAML without aliases.
//!
//! `yaml_serde` (libyaml's loader) expands an alias by deserializing its anchor's node again,
//! copying every string in it: a document of under a megabyte that names one 512 KiB string and
//! then refers to it 170,000 times turns into some 85 GB before any cap on what it contains can
//! run (the "billion laughs" of Kubernetes' CVE-2019-11253, which go-yaml refuses since). The
//! repetition limit libyaml's loader has (100 jumps per event) bounds the jumps, not what they
//! copy. Nothing the project reads needs anchors, and some of what it reads comes from
//! namespace tenants (bbr's labelled ConfigMaps), so every document is scanned for aliases
//! first, with a parser that only produces events (`granit-parser`, safe Rust), and refused if
//! it has one.

use granit_parser::{Event, Parser};

/// Why a document was refused before it was deserialized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasScanError {
    /// An alias (`*name`): refused whatever it refers to.
    #[error("YAML aliases are not accepted (an alias at line {line}, column {column})")]
    Alias {
        /// 1-based.
        line: usize,
        /// 1-based.
        column: usize,
    },
    /// The scanner could not read the document (what the deserializer would have refused too,
    /// or YAML it reads differently; either way it is not read).
    #[error("YAML syntax error: {0}")]
    Syntax(String),
}

/// Refuses a document with an alias in it; cost: one pass of events, nothing kept.
pub fn refuse_aliases(text: &str) -> Result<(), AliasScanError> {
    let mut parser = Parser::new_from_str(text);
    while let Some(event) = parser.next_event() {
        match event {
            Ok((Event::Alias(_), span)) => {
                return Err(AliasScanError::Alias {
                    line: span.start.line(),
                    column: span.start.col() + 1,
                });
            }
            Ok((Event::StreamEnd, _)) => break,
            Ok(_) => {}
            Err(e) => return Err(AliasScanError::Syntax(e.to_string())),
        }
    }
    Ok(())
}

/// [`refuse_aliases`], then `yaml_serde::from_str`.
pub fn from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    refuse_aliases(text)?;
    Ok(yaml_serde::from_str(text)?)
}

/// A document refused or not deserialized.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// Refused before deserializing.
    #[error(transparent)]
    Refused(#[from] AliasScanError),
    /// Not deserialized.
    #[error(transparent)]
    Deserialize(#[from] yaml_serde::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alias_is_refused_wherever_it_is() {
        let bomb = format!("[&a \"{}\", {}]", "x".repeat(1024), "*a, ".repeat(1000));
        assert!(matches!(
            refuse_aliases(&bomb),
            Err(AliasScanError::Alias { line: 1, .. })
        ));
        let nested = "base: &b {model: m}\nother:\n  - *b\n";
        assert_eq!(
            refuse_aliases(nested),
            Err(AliasScanError::Alias { line: 3, column: 5 })
        );
        // Never deserialized: the error is the scan's.
        let err = from_str::<Vec<String>>(&bomb).unwrap_err();
        assert!(matches!(err, YamlError::Refused(_)), "{err}");
    }

    #[test]
    fn documents_without_aliases_read_as_before() {
        // `*` and `&` inside scalars are not aliases or anchors.
        let text = "name: \"a*b\"\nplain: x&y *not-at-start\nlist: [a, 'b*', \"&c\"]\nblock: |\n  *still text\n  &and this\n";
        refuse_aliases(text).unwrap();
        let doc: yaml_serde::Value = from_str(text).unwrap();
        assert_eq!(doc["block"].as_str(), Some("*still text\n&and this\n"));
        // An anchor that is never referred to is harmless, and accepted.
        refuse_aliases("a: &x 1\nb: 2\n").unwrap();
        // Several documents in one stream, comments, an empty document.
        refuse_aliases("# c\n---\na: 1\n---\n---\nb: [1, 2]\n...\n").unwrap();
        refuse_aliases("").unwrap();
    }

    #[test]
    fn broken_yaml_is_a_syntax_error() {
        assert!(matches!(
            refuse_aliases("a: [1, 2\nb: {"),
            Err(AliasScanError::Syntax(_))
        ));
    }
}
