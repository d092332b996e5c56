//! The topic of a KV-event message: `kv@<pod-id>@<model>`.
//!
//! vLLM publishes on whatever `topic` its `--kv-events-config` says (empty by default); llm-d
//! requires `kv@<pod-id>@<model>` so that one subscriber (central mode) can tell the engines
//! apart, and subscribes to the prefix `kv@`. `<pod-id>` is the EPP's key of the endpoint:
//! `<ip>:<port>` in llm-d's 2026 router and inference simulator, the pod IP in its v0.3 era.

use std::fmt;

/// Bytes in a topic, at most (a pod id and a model name with room to spare).
pub const MAX_TOPIC_BYTES: usize = 512;

/// The prefix every llm-d topic starts with (its subscribers' default filter).
pub const TOPIC_PREFIX: &str = "kv@";

/// A parsed topic, borrowing from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The publishing endpoint's id (`<ip>:<port>` or a pod IP).
    pub pod_id: &'a str,
    /// The model the engine serves.
    pub model: &'a str,
}

/// Why a topic frame is not `kv@<pod-id>@<model>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Longer than [`MAX_TOPIC_BYTES`].
    #[error("the topic is {0} bytes, more than {MAX_TOPIC_BYTES}")]
    TooLong(usize),
    /// Not UTF-8, or holds control characters.
    #[error("the topic is not printable UTF-8")]
    NotText,
    /// Not three `@`-separated parts, the first `kv`, none empty.
    #[error("the topic is not kv@<pod-id>@<model>")]
    Malformed,
}

// === impl Topic ===

impl<'a> Topic<'a> {
    /// Parses a topic frame: split on `@` into exactly three parts (as llm-d does), the first
    /// `kv`, the others non-empty.
    pub fn parse(raw: &'a [u8]) -> Result<Self, TopicError> {
        if raw.len() > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong(raw.len()));
        }
        let text = std::str::from_utf8(raw).map_err(|_| TopicError::NotText)?;
        if text.chars().any(char::is_control) {
            return Err(TopicError::NotText);
        }
        let mut parts = text.split('@');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("kv"), Some(pod_id), Some(model), None)
                if !pod_id.is_empty() && !model.is_empty() =>
            {
                Ok(Topic { pod_id, model })
            }
            _ => Err(TopicError::Malformed),
        }
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kv@{}@{}", self.pod_id, self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_parts() {
        let t = Topic::parse(b"kv@10.0.0.7:8000@meta-llama/Llama-3.1-8B").unwrap();
        assert_eq!(t.pod_id, "10.0.0.7:8000");
        assert_eq!(t.model, "meta-llama/Llama-3.1-8B");
        assert_eq!(t.to_string(), "kv@10.0.0.7:8000@meta-llama/Llama-3.1-8B");
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            &b""[..],
            b"kv",
            b"kv@pod",
            b"kv@pod@",
            b"kv@@model",
            b"kv@a@b@c",
            b"KV@a@b",
            b"kv-events",
            b"kv@a\n@b",
            b"kv@\xff@b",
        ] {
            assert!(
                Topic::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("kv@{}@m", "p".repeat(MAX_TOPIC_BYTES));
        assert_eq!(
            Topic::parse(long.as_bytes()),
            Err(TopicError::TooLong(long.len()))
        );
    }
}
