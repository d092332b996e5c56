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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// `s` escaped and truncated, as an owned string (for error bodies).
pub fn sanitize(s: &str) -> String {
    Untrusted(s).to_string()
}

/// A per-second allowance of log lines a client can cause: one line a refused request is
/// useful, thousands a second under overload or a flood of bad bodies are a log bill and hide
/// everything else. Past the allowance lines go to DEBUG; the next line allowed says how many
/// were not logged. The counters are what to alert on.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u64,
    second: AtomicU64,
    used: AtomicU64,
    held_back: AtomicU64,
}

impl LogBudget {
    /// At most `per_second` lines a second.
    pub const fn new(per_second: u64) -> Self {
        Self {
            per_second,
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last allowed one)` if a line may be logged now at its
    /// level, `None` if it must go to DEBUG.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let current = self.second.load(Ordering::Relaxed);
        if current != second
            && self
                .second
                .compare_exchange(current, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
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
    fn a_log_budget_allows_so_many_lines_a_second_and_counts_the_rest() {
        let budget = LogBudget::new(2);
        assert_eq!(
            [
                budget.allow_at(10),
                budget.allow_at(10),
                budget.allow_at(10),
                budget.allow_at(10)
            ],
            [Some(0), Some(0), None, None]
        );
        // The next second's first line says two were held back.
        assert_eq!(
            [
                budget.allow_at(11),
                budget.allow_at(11),
                budget.allow_at(11)
            ],
            [Some(2), Some(0), None]
        );
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
