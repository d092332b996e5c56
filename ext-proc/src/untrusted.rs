//! Client input on its way into logs and error bodies: escaped and truncated.
//!
//! Everything a client sends is hostile. A model name holding a newline and ESC bytes would
//! otherwise write a forged line at column 0 of a console log, and a megabyte in a wrongly typed
//! field would come back whole in the 400 body and be written whole to the log. [`Untrusted`]
//! renders a value with every control character, quote and backslash escaped (Rust's
//! `escape_debug`, so the rendering is the same in every log format) and at most
//! [`MAX_LOGGED_CHARS`] characters of it, followed by how much was left out.

// One escaper for the whole workspace: it lives in `kv-events`, the lowest crate that needs it.
pub use kv_events::{MAX_LOGGED_CHARS, Untrusted};

/// `s` escaped and truncated, as an owned string (for error bodies).
pub fn sanitize(s: &str) -> String {
    Untrusted(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let forged = "m\n2026-01-01T00:00:00Z  INFO forged\x1b[31m\r\u{85}\"\\";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            "m\\n2026-01-01T00:00:00Z  INFO forged\\u{1b}[31m\\r\\u{85}\\\"\\\\"
        );
        assert_eq!(format!("{:?}", Untrusted("a\nb")), "\"a\\nb\"");
    }

    #[test]
    fn long_values_are_truncated_with_the_remainder_counted() {
        let long = "B".repeat(1 << 20);
        let shown = sanitize(&long);
        assert!(shown.len() < MAX_LOGGED_CHARS + 32, "{}", shown.len());
        assert!(shown.ends_with(&format!("…(+{} bytes)", (1 << 20) - MAX_LOGGED_CHARS)));
        assert_eq!(sanitize("short"), "short");
        let exactly = "é".repeat(MAX_LOGGED_CHARS);
        assert_eq!(sanitize(&exactly), exactly);
    }
}
