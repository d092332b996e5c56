//! Reading a whole (non-streamed) JSON answer's `usage` as the answer passes, without keeping
//! the answer.
//!
//! The answer goes on to the client chunk by chunk; [`JsonUsageScanner`] follows the JSON's
//! nesting through each chunk and keeps only the value of the top-level object's `usage`
//! member, at most [`MAX_USAGE_VALUE_BYTES`], parsed once the answer has ended. So reading an
//! answer's usage costs one pass over its bytes (strings are skipped with `memchr`) and a few
//! hundred bytes of memory, however long the answer is and wherever the member is in it:
//! vLLM's chat answers put `prompt_logprobs` after `usage`, its Responses API puts the
//! messages after it, TRT-LLM puts `prompt_token_ids` after it.
//!
//! What this replaced kept up to 16 MiB of an answer and parsed it whole at the end, 16.6 ms
//! of a runtime thread for a logprobs-like 16 MiB answer that a client can ask for; then the
//! last MiB of a long answer, which missed a `usage` written before a long member.
//!
//! Only the top-level member counts: a `usage` nested in another member (under `metadata`,
//! which a client may fill) is at another depth, and no text an answer carries can open or
//! close a level, since quotes inside JSON strings are escaped. The scanner checks the
//! nesting and that the answer is one object and nothing after it, not the rest of JSON's
//! grammar: the answer is the engine's, and an engine that wanted to report another usage
//! would write it in valid JSON.

use std::sync::Arc;

use crate::body_budget::{BodyBudget, BodyCharge, OverBudget};
use crate::openai::{self, Usage};

/// The longest `usage` value kept. A real one is 50–300 bytes (the Responses API's, with its
/// token details, is the longest); a longer one leaves the usage unknown.
pub const MAX_USAGE_VALUE_BYTES: usize = 4 << 10;

/// The bytes that matter between strings inside a member's value: a string's start and the
/// brackets.
static NESTED_STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    let mut i = 0;
    while i < 256 {
        stops[i] = matches!(i as u8, b'"' | b'{' | b'}' | b'[' | b']');
        i += 1;
    }
    stops
};

/// Where in `rest` (inside a string) the string ends or an escape begins. Strings in answers
/// are mostly short (logprobs' tokens, member names): a plain loop finds their end before
/// `memchr` would have set up; a long one (the answer's text) goes to `memchr` after that.
fn string_end(rest: &[u8]) -> Option<usize> {
    const SHORT: usize = 16;
    let head = &rest[..rest.len().min(SHORT)];
    if let Some(at) = head.iter().position(|&b| b == b'"' || b == b'\\') {
        return Some(at);
    }
    memchr::memchr2(b'"', b'\\', &rest[head.len()..]).map(|at| at + head.len())
}

/// Where the scanner is in the answer's text.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Lexeme {
    /// Between strings.
    #[default]
    Structure,
    /// Inside a string.
    String,
    /// Inside a string, just after a backslash: the next byte is escaped.
    Escape,
}

/// Follows one whole answer's JSON for its top-level `usage`; see the module documentation.
#[derive(Debug, Default)]
pub struct JsonUsageScanner {
    lexeme: Lexeme,
    /// How many objects and arrays are open; 1 inside the top-level object.
    depth: u32,
    /// The top-level object has begun.
    began: bool,
    /// The top-level object has ended.
    ended: bool,
    /// In the top-level object, where a member's name comes next (after `{` or `,`).
    name_next: bool,
    /// Inside a top-level member's name: how many of its bytes spelled the start of `usage`,
    /// or `None` once they differ.
    name: Option<Option<usize>>,
    /// The last top-level name read was `usage`: its value follows the `:`.
    usage_named: bool,
    /// The `usage` value is being kept, chunk after chunk.
    capturing: bool,
    /// The `usage` value, as it came.
    value: Vec<u8>,
    /// A top-level `usage` member was seen; a second one makes the usage unknown.
    usage_seen: bool,
    /// The usage cannot be known: the answer is not one JSON object, or its value is too long.
    unknown: bool,
    /// `value`'s bytes, charged to the shared response budget.
    charge: BodyCharge,
    /// The shared budget could not hold the value: nothing is kept any more.
    dropped: bool,
}

impl JsonUsageScanner {
    /// Reads the answer's next `chunk`. `Err` the first time `budget` (what every stream holds
    /// of its answer together) cannot hold the `usage` value kept so far: the answer's usage
    /// is then unknown.
    pub fn push(&mut self, chunk: &[u8], budget: &Arc<BodyBudget>) -> Result<(), OverBudget> {
        if self.unknown || self.dropped {
            return Ok(());
        }
        let mut i = 0;
        // Where in `chunk` the kept value starts, while it is being kept.
        let mut kept_from = self.capturing.then_some(0);
        while i < chunk.len() {
            match self.lexeme {
                Lexeme::Escape => {
                    self.lexeme = Lexeme::String;
                    self.spell_name(&chunk[i..=i]);
                    i += 1;
                }
                Lexeme::String => {
                    let rest = &chunk[i..];
                    let Some(at) = string_end(rest) else {
                        self.spell_name(rest);
                        i = chunk.len();
                        continue;
                    };
                    self.spell_name(&rest[..at]);
                    i += at + 1;
                    if rest[at] == b'\\' {
                        self.lexeme = Lexeme::Escape;
                        // An escape in a name is never part of `usage` as the engine writes it.
                        self.spell_name(b"\\");
                    } else {
                        self.lexeme = Lexeme::Structure;
                        if let Some(spelled) = self.name.take() {
                            self.usage_named = spelled == Some(b"usage".len());
                        }
                    }
                }
                Lexeme::Structure => {
                    // Inside a member's value only strings and brackets matter: the rest
                    // (numbers, literals, commas, colons, whitespace) is skipped in one loop.
                    if self.depth >= 2 {
                        i = self.skip_nested(chunk, i);
                        if i == chunk.len() || self.depth < 2 {
                            continue;
                        }
                    }
                    let byte = chunk[i];
                    i += 1;
                    match byte {
                        b' ' | b'\t' | b'\n' | b'\r' => {}
                        _ if self.depth == 0 => {
                            // Before the top-level object, only its `{`; after it, nothing.
                            if byte != b'{' || self.began {
                                self.give_up();
                                return Ok(());
                            }
                            self.began = true;
                            self.depth = 1;
                            self.name_next = true;
                        }
                        b'"' => {
                            self.lexeme = Lexeme::String;
                            if self.depth == 1 && std::mem::take(&mut self.name_next) {
                                self.name = Some(Some(0));
                            }
                        }
                        b'{' | b'[' => match self.depth.checked_add(1) {
                            Some(depth) => self.depth = depth,
                            None => {
                                self.give_up();
                                return Ok(());
                            }
                        },
                        b'}' | b']' => {
                            if self.depth == 1 {
                                self.keep(chunk, kept_from.take(), i - 1, budget)?;
                                self.capturing = false;
                                self.ended = true;
                            }
                            self.depth -= 1;
                        }
                        b',' if self.depth == 1 => {
                            self.keep(chunk, kept_from.take(), i - 1, budget)?;
                            self.capturing = false;
                            self.name_next = true;
                        }
                        b':' if self.depth == 1 && std::mem::take(&mut self.usage_named) => {
                            if self.usage_seen {
                                // A second top-level `usage`: which one counts is ambiguous.
                                self.give_up();
                                return Ok(());
                            }
                            self.usage_seen = true;
                            self.capturing = true;
                            kept_from = Some(i);
                        }
                        _ => {}
                    }
                }
            }
        }
        self.keep(chunk, kept_from, chunk.len(), budget)
    }

    /// Whether the shared budget made the scanner stop keeping the value.
    pub fn dropped(&self) -> bool {
        self.dropped
    }

    /// The answer's usage, once it has ended: `None` when the answer was not one JSON object
    /// with exactly one top-level `usage`, or that value is not a usage. The value's charge is
    /// given back.
    pub fn take_usage(&mut self) -> Option<Usage> {
        let value = std::mem::take(&mut self.value);
        self.charge.release();
        if !self.ended || !self.usage_seen || self.unknown || self.dropped {
            return None;
        }
        openai::usage_from_member_value(&value)
    }

    /// Skips what lies inside a member's value from `i` (between strings, at depth 2 or more)
    /// in one loop: strings without escapes and brackets, until the value's depth drops below
    /// 2 (returning after that bracket), a string with an escape or that goes on past the
    /// chunk (returning at its quote), or the chunk's end. The state is left as the byte-wise
    /// path would leave it.
    fn skip_nested(&mut self, chunk: &[u8], mut i: usize) -> usize {
        while i < chunk.len() {
            let Some(at) = chunk[i..]
                .iter()
                .position(|&b| NESTED_STOPS[usize::from(b)])
            else {
                return chunk.len();
            };
            i += at;
            match chunk[i] {
                b'"' => match string_end(&chunk[i + 1..]) {
                    Some(end) if chunk[i + 1 + end] == b'"' => i += end + 2,
                    // An escape, or a string that goes on past the chunk: byte-wise.
                    _ => return i,
                },
                b'{' | b'[' => {
                    if self.depth == u32::MAX {
                        return i;
                    }
                    self.depth += 1;
                    i += 1;
                }
                _ => {
                    self.depth -= 1;
                    i += 1;
                    if self.depth < 2 {
                        return i;
                    }
                }
            }
        }
        i
    }

    /// Adds to the name being read, if any, the next bytes of its text.
    fn spell_name(&mut self, text: &[u8]) {
        if let Some(Some(spelled)) = self.name {
            let target = b"usage".get(spelled..).unwrap_or_default();
            self.name = Some(target.starts_with(text).then_some(spelled + text.len()));
        }
    }

    /// The usage cannot be known: the value is no longer kept.
    fn give_up(&mut self) {
        self.unknown = true;
        self.forget_value();
    }

    /// Stops keeping the value and gives its bytes back: the usage will not be read.
    fn forget_value(&mut self) {
        self.capturing = false;
        self.value = Vec::new();
        self.charge.release();
    }

    /// Adds `chunk[from..to]` to the kept value, within [`MAX_USAGE_VALUE_BYTES`] and the
    /// shared budget.
    fn keep(
        &mut self,
        chunk: &[u8],
        from: Option<usize>,
        to: usize,
        budget: &Arc<BodyBudget>,
    ) -> Result<(), OverBudget> {
        let Some(from) = from else {
            return Ok(());
        };
        let part = &chunk[from..to];
        if self.value.len() + part.len() > MAX_USAGE_VALUE_BYTES {
            self.give_up();
            return Ok(());
        }
        if let Err(over) = self.charge.grow(budget, part.len()) {
            self.dropped = true;
            self.forget_value();
            return Err(over);
        }
        self.value.extend_from_slice(part);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Arc<BodyBudget> {
        Arc::new(BodyBudget::new(1 << 20))
    }

    /// The answer's usage, read from `answer` cut at `cuts`; the budget is given back.
    fn scan(answer: &[u8], cuts: &[usize]) -> Option<(u64, u64)> {
        let budget = budget();
        let mut scanner = JsonUsageScanner::default();
        let mut from = 0;
        for &cut in cuts.iter().chain([&answer.len()]) {
            scanner.push(&answer[from..cut], &budget).unwrap();
            assert!(scanner.value.len() <= MAX_USAGE_VALUE_BYTES);
            from = cut;
        }
        let usage = scanner.take_usage();
        assert_eq!(budget.held(), 0, "given back");
        usage.map(|u| (u.prompt_tokens, u.completion_tokens))
    }

    #[test]
    fn the_top_level_usage_is_read_however_the_answer_is_cut() {
        // vLLM's chat answer with `prompt_logprobs` after `usage`; text that spells a usage in
        // the content, escaped quotes and backslashes, a nested `usage` before and after.
        let answer = br#"{"id":"c","metadata":{"usage":{"prompt_tokens":0}},"choices":[{"message":{"content":"say \"usage\": {\"completion_tokens\":0} \\"}}],"usage" : {"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}},"prompt_logprobs":[null,{"1":{"logprob":-1.5,"decoded_token":"usage"}}],"kv_transfer_params":{"usage":{"completion_tokens":1}}}"#;
        assert_eq!(scan(answer, &[]), Some((10, 5)));
        for first in 0..=answer.len() {
            assert_eq!(scan(answer, &[first]), Some((10, 5)), "cut at {first}");
            for second in (first..=answer.len()).step_by(7) {
                assert_eq!(
                    scan(answer, &[first, second]),
                    Some((10, 5)),
                    "cut at {first} and {second}"
                );
            }
        }
        let bytewise: Vec<usize> = (1..answer.len()).collect();
        assert_eq!(scan(answer, &bytewise), Some((10, 5)));
        // Whitespace everywhere, the Responses API's names, usage as the last member.
        let pretty = b" \n{ \"object\" : \"response\" ,\n  \"usage\"\t:\n {\"input_tokens\":3,\"output_tokens\":4}\n}\r\n";
        assert_eq!(scan(pretty, &[]), Some((3, 4)));
    }

    #[test]
    fn usage_wherever_it_is_in_a_long_answer() {
        let usage = br#""usage":{"prompt_tokens":7,"completion_tokens":3}"#;
        let text = vec![b'a'; 5 << 20];
        let front = [b"{".as_slice(), usage, br#","x":""#, &text, br#""}"#].concat();
        let end = [br#"{"x":""#.as_slice(), &text, br#"","#, usage, b"}"].concat();
        for answer in [front, end] {
            for chunk in [1000, 64 << 10, 3 << 20] {
                let cuts: Vec<usize> = (chunk..answer.len()).step_by(chunk).collect();
                assert_eq!(scan(&answer, &cuts), Some((7, 3)), "chunk {chunk}");
            }
        }
    }

    #[test]
    fn no_usage_unless_one_top_level_member_of_one_object() {
        for answer in [
            // Not there, nested only, null, not a usage.
            &br#"{"a":1}"#[..],
            br#"{"a":{"usage":{"prompt_tokens":1}}}"#,
            br#"{"a":[{"usage":{"prompt_tokens":1}}]}"#,
            br#"{"usage":null}"#,
            br#"{"usage":"ten"}"#,
            br#"{"usage":[4,62,3,676,17,{},{},null]}"#,
            // Another name: longer, shorter, escaped, a value that spells it.
            br#"{"usages":{"prompt_tokens":1}}"#,
            br#"{"usag":{"prompt_tokens":1}}"#,
            br#"{"us\u0061ge":{"prompt_tokens":1}}"#,
            br#"{"x":"usage","y":{"prompt_tokens":1}}"#,
            // Not one object: an array, bytes after it, two of them, unfinished.
            br#"["usage",{"prompt_tokens":1}]"#,
            br#"{"usage":{"prompt_tokens":1}} x"#,
            br#"{"usage":{"prompt_tokens":1}}{}"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            br#"{"usage":{"prompt_tokens":1},"x":"}"#,
            b"",
            // Two top-level members: ambiguous.
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
        ] {
            assert_eq!(
                scan(answer, &[]),
                None,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn a_usage_value_past_the_cap_is_unknown() {
        let padded = |pad: usize| {
            format!(
                r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":2{}}}}}"#,
                " ".repeat(pad)
            )
        };
        // The value without padding is 41 bytes.
        let fits = padded(MAX_USAGE_VALUE_BYTES - 41);
        assert_eq!(scan(fits.as_bytes(), &[10, 1000]), Some((1, 2)));
        let over = padded(MAX_USAGE_VALUE_BYTES - 40);
        assert_eq!(scan(over.as_bytes(), &[10, 1000]), None);
    }

    #[test]
    fn a_value_the_budget_cannot_hold_is_dropped_for_good() {
        let budget = Arc::new(BodyBudget::new(10));
        let mut scanner = JsonUsageScanner::default();
        assert!(scanner.push(br#"{"usage":{"prompt"#, &budget).is_ok());
        assert_eq!(budget.held(), br#"{"prompt"#.len());
        assert!(scanner.push(br#"_tokens":1}}"#, &budget).is_err());
        assert!(scanner.dropped());
        assert_eq!(budget.held(), 0);
        // Reported once; nothing more is kept or charged.
        assert!(scanner.push(b" ", &budget).is_ok());
        assert_eq!((scanner.take_usage(), budget.held()), (None, 0));
    }
}
