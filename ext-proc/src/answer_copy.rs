//! What the EPP keeps of a whole (non-streamed) answer to read its `usage` when it ends.
//!
//! The answer itself passes on as it comes; this copy is read once, at the end, on the
//! stream's async task. An answer up to [`WHOLE_ANSWER_BYTES`] is kept whole and read with a
//! full JSON parse. A longer one (the logprobs of a long prompt, a long completion) keeps only
//! its last [`WHOLE_ANSWER_BYTES`]: its usage is read from that tail when the top-level `usage`
//! member is in it, as it is in vLLM's and SGLang's chat and completion answers, where it
//! follows `choices` (`openai::usage_from_json_tail`), and is unknown otherwise. So reading
//! an answer costs at most about one parse of 1 MiB (about a millisecond) however long the
//! answer is; a parse of the 16 MiB a stream used to keep took 19 ms of a runtime thread, and
//! a client could ask for such answers. A stream holds at most twice the window.

use std::sync::Arc;

use crate::body_budget::{BodyBudget, BodyCharge, OverBudget};
use crate::openai::{self, Usage};

/// The longest answer read whole, and the tail kept of a longer one.
pub const WHOLE_ANSWER_BYTES: usize = 1 << 20;

/// The copy of one answer; see the module documentation.
#[derive(Debug, Default)]
pub struct AnswerCopy {
    /// The answer, or its last bytes once `truncated`; at most twice [`WHOLE_ANSWER_BYTES`].
    bytes: Vec<u8>,
    /// The answer's front was dropped: `bytes` is a tail.
    truncated: bool,
    /// `bytes`' longest length, charged to the shared budget.
    charge: BodyCharge,
    /// The shared budget could not hold the copy: nothing is kept any more.
    dropped: bool,
}

impl AnswerCopy {
    /// Adds the answer's next `chunk`. `Err` the first time `budget` (what every stream's
    /// copy holds together) cannot hold the copy: the copy is then dropped for good and its
    /// answer's usage is unknown.
    pub fn push(&mut self, chunk: &[u8], budget: &Arc<BodyBudget>) -> Result<(), OverBudget> {
        if self.dropped {
            return Ok(());
        }
        let len = self.bytes.len() + chunk.len();
        let truncate = len > 2 * WHOLE_ANSWER_BYTES;
        // The charge is the most the copy has held; it never grows past twice the window.
        let held = if truncate { WHOLE_ANSWER_BYTES } else { len };
        let more = held.saturating_sub(self.charge.bytes());
        if more > 0
            && let Err(over) = self.charge.grow(budget, more)
        {
            self.drop_copy();
            return Err(over);
        }
        if !truncate {
            self.bytes.extend_from_slice(chunk);
            return Ok(());
        }
        // Keep the last window of the copy and the chunk: at most one byte moved for each one
        // received.
        self.truncated = true;
        if chunk.len() >= WHOLE_ANSWER_BYTES {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&chunk[chunk.len() - WHOLE_ANSWER_BYTES..]);
        } else {
            let kept = WHOLE_ANSWER_BYTES - chunk.len();
            let from = self.bytes.len() - kept;
            self.bytes.copy_within(from.., 0);
            self.bytes.truncate(kept);
            self.bytes.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Whether the shared budget made the copy be dropped.
    pub fn dropped(&self) -> bool {
        self.dropped
    }

    /// The answer's usage, read from the copy, which is then given back.
    pub fn take_usage(&mut self) -> Option<Usage> {
        let bytes = std::mem::take(&mut self.bytes);
        self.charge.release();
        if self.dropped {
            None
        } else if self.truncated {
            openai::usage_from_json_tail(&bytes)
        } else {
            openai::usage_from_json(&bytes)
        }
    }

    fn drop_copy(&mut self) {
        self.dropped = true;
        self.bytes = Vec::new();
        self.charge.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(usage_at_end: bool, filler: usize) -> Vec<u8> {
        let usage = r#""usage":{"prompt_tokens":7,"completion_tokens":3}"#;
        let text = "a".repeat(filler);
        if usage_at_end {
            format!(r#"{{"choices":[{{"text":"{text}"}}],{usage}}}"#).into_bytes()
        } else {
            format!(r#"{{{usage},"choices":[{{"text":"{text}"}}]}}"#).into_bytes()
        }
    }

    fn read(answer: &[u8], chunk: usize, budget: &Arc<BodyBudget>) -> (Option<u64>, usize) {
        let mut copy = AnswerCopy::default();
        let mut most = 0;
        for c in answer.chunks(chunk) {
            copy.push(c, budget).unwrap();
            most = most.max(budget.held());
            assert!(copy.bytes.len() <= 2 * WHOLE_ANSWER_BYTES);
        }
        let usage = copy.take_usage().map(|u| u.completion_tokens);
        assert_eq!(budget.held(), 0, "given back");
        (usage, most)
    }

    #[test]
    fn a_short_answer_is_read_whole_a_long_one_from_its_tail() {
        let budget = Arc::new(BodyBudget::new(64 << 20));
        // Whole: the usage is read wherever it is.
        assert_eq!(read(&answer(false, 1000), 100, &budget).0, Some(3));
        assert_eq!(read(&answer(true, 1000), 100, &budget).0, Some(3));
        // Past the window: read at the end, unknown at the front; chunks small and large.
        for chunk in [1000, 64 << 10, 3 << 20] {
            let (usage, most) = read(&answer(true, 5 << 20), chunk, &budget);
            assert_eq!(usage, Some(3), "chunk {chunk}");
            assert!(most <= 2 * WHOLE_ANSWER_BYTES, "held {most}");
            assert_eq!(read(&answer(false, 5 << 20), chunk, &budget).0, None);
        }
        // The tail is the answer's last bytes, whatever the chunks.
        let long = answer(true, 3 << 20);
        let mut copy = AnswerCopy::default();
        for c in long.chunks(333_333) {
            copy.push(c, &budget).unwrap();
        }
        assert!(copy.truncated);
        assert!(long.ends_with(&copy.bytes));
        // An answer in one message longer than twice the window: its tail is charged too.
        let budget = Arc::new(BodyBudget::new(64 << 20));
        let mut copy = AnswerCopy::default();
        copy.push(&long, &budget).unwrap();
        assert_eq!(budget.held(), WHOLE_ANSWER_BYTES);
        assert_eq!(copy.take_usage().map(|u| u.completion_tokens), Some(3));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_copy_the_budget_cannot_hold_is_dropped_for_good() {
        let budget = Arc::new(BodyBudget::new(1000));
        let mut copy = AnswerCopy::default();
        assert!(copy.push(&[b'x'; 600], &budget).is_ok());
        assert!(copy.push(&[b'x'; 600], &budget).is_err());
        assert!(copy.dropped());
        assert_eq!(budget.held(), 0);
        // Reported once; what follows is neither kept nor charged.
        assert!(
            copy.push(br#"{"usage":{"prompt_tokens":1}}"#, &budget)
                .is_ok()
        );
        assert_eq!((copy.take_usage(), budget.held()), (None, 0));
    }
}
