//! Seeded filler text whose length is set in *tokens* of the simulator's tokeniser.
//!
//! The simulator (`sim/src/tokenizer.rs`) cuts a run of letters into pieces of at most four
//! letters, the single space before a word glued to its first piece, and every other
//! character into one token. Words made of letters only, separated by single spaces, therefore
//! cost exactly `ceil(len / 4)` tokens each; that is what [`words`] counts, so a prompt asked for
//! as 6,000 tokens is 6,000 tokens to the engine (plus the chat template's few).

use rand::Rng;

/// Appends seeded pseudo-words to `out` until they add up to `tokens` simulator tokens.
///
/// Word lengths are 2–9 letters (≈ 1.6 tokens, ≈ 3.8 characters per token with the space),
/// a period every dozen words or so; the period counts as one token.
pub fn push_words<R: Rng>(rng: &mut R, tokens: usize, out: &mut String) {
    let mut left = tokens;
    let mut since_period = 0usize;
    while left > 0 {
        // Never overshoot: a word may cost at most what is left.
        let max_len = (left * 4).min(9);
        let len = rng.random_range(2.min(max_len)..=max_len);
        if !out.is_empty() {
            out.push(' ');
        }
        for _ in 0..len {
            out.push(char::from(b'a' + rng.random_range(0..26u8)));
        }
        left -= len.div_ceil(4);
        since_period += 1;
        if left > 1 && since_period >= 12 && rng.random_bool(0.3) {
            out.push('.');
            left -= 1;
            since_period = 0;
        }
    }
}

/// `tokens` simulator tokens of seeded pseudo-words.
pub fn words<R: Rng>(rng: &mut R, tokens: usize) -> String {
    let mut s = String::with_capacity(tokens * 4);
    push_words(rng, tokens, &mut s);
    s
}

/// Tokens of `text` under the simulator's rule, for text made by [`words`] (letters, single
/// spaces, periods) or any text: letters in runs of ≤ 4 (a preceding space glued on), digits
/// in runs of ≤ 3, other whitespace in runs of ≤ 4, anything else one token each.
pub fn count_tokens(text: &str) -> usize {
    let b = text.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        let c = b[i];
        let start = if c == b' ' && b.get(i + 1).is_some_and(u8::is_ascii_alphabetic) {
            i + 1
        } else {
            i
        };
        let c0 = b[start];
        let (class, cap): (fn(&u8) -> bool, usize) = if c0.is_ascii_alphabetic() {
            (u8::is_ascii_alphabetic, 4)
        } else if c0.is_ascii_digit() {
            (u8::is_ascii_digit, 3)
        } else if c0.is_ascii_whitespace() {
            (u8::is_ascii_whitespace, 4)
        } else {
            // One token per character (multi-byte UTF-8 included).
            let len = text[start..].chars().next().map_or(1, char::len_utf8);
            i = start + len;
            n += 1;
            continue;
        };
        let mut j = start;
        while j < b.len() && class(&b[j]) {
            j += 1;
        }
        n += (j - start).div_ceil(cap);
        i = j;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn asked_length_is_exact_under_our_count() {
        let mut rng = SmallRng::seed_from_u64(7);
        for tokens in [1, 2, 3, 17, 100, 1200, 6000] {
            let t = words(&mut rng, tokens);
            assert_eq!(count_tokens(&t), tokens, "{tokens}");
        }
    }

    #[test]
    fn count_matches_the_simulator_tokeniser() {
        let mut rng = SmallRng::seed_from_u64(3);
        for tokens in [5, 64, 1000, 6000] {
            let t = words(&mut rng, tokens);
            assert_eq!(sim::tokenizer::encode(&t).len(), count_tokens(&t));
            assert_eq!(sim::tokenizer::encode(&t).len(), tokens);
        }
    }

    #[test]
    fn about_four_characters_per_token() {
        let mut rng = SmallRng::seed_from_u64(1);
        let t = words(&mut rng, 10_000);
        let cpt = t.len() as f64 / 10_000.0;
        assert!((3.3..4.4).contains(&cpt), "{cpt}");
    }

    #[test]
    fn seeded() {
        let a = words(&mut SmallRng::seed_from_u64(9), 500);
        let b = words(&mut SmallRng::seed_from_u64(9), 500);
        let c = words(&mut SmallRng::seed_from_u64(10), 500);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
