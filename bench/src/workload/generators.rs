//! The five workload generators.

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::text::{count_tokens, words};
use super::{MODEL, Request, Workload};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// A streaming chat body (usage requested, so the client learns the token counts).
fn chat_body(model: &str, messages: &[(&str, &str)], max_tokens: u32) -> Bytes {
    let messages: Vec<_> = messages
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    Bytes::from(body.to_string())
}

/// A seed for sub-stream `i` of a workload seeded `seed` (splitmix-style mixing, so that
/// neighbouring indices give unrelated streams).
fn sub_seed(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A lognormal sample with median `median` and log-sigma `sigma` (Box–Muller).
fn lognormal(rng: &mut SmallRng, median: f64, sigma: f64) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (sigma * z).exp()
}

/// `shared-prefix`: `groups` long system prompts; each request picks a group uniformly and
/// adds a unique question (the layout of upstream's prefix-cache benchmarks). `hot-spot` is the
/// same with Zipf-skewed group popularity ([`SharedPrefix::with_zipf`]).
pub struct SharedPrefix {
    rng: SmallRng,
    /// Cumulative group weights when popularity is skewed (uniform when empty).
    cumulative: Vec<f64>,
    seed: u64,
    systems: Vec<Option<String>>,
    system_tokens: usize,
    question_tokens: usize,
    output_tokens: u32,
}

impl SharedPrefix {
    /// A workload of `groups` groups.
    pub fn new(
        seed: u64,
        groups: usize,
        system_tokens: usize,
        question_tokens: usize,
        output_tokens: u32,
    ) -> Self {
        SharedPrefix {
            rng: SmallRng::seed_from_u64(seed),
            cumulative: Vec::new(),
            seed,
            systems: vec![None; groups.max(1)],
            system_tokens,
            question_tokens,
            output_tokens,
        }
    }

    /// Group `k` (0-based) drawn with probability ∝ 1 / (k + 1)^s instead of uniformly.
    pub fn with_zipf(mut self, s: f64) -> Self {
        let mut acc = 0.0;
        self.cumulative = (0..self.systems.len())
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect();
        self
    }

    fn pick(&mut self) -> usize {
        match self.cumulative.last() {
            None => self.rng.random_range(0..self.systems.len()),
            Some(&total) => {
                let x = self.rng.random::<f64>() * total;
                self.cumulative
                    .partition_point(|&c| c <= x)
                    .min(self.systems.len() - 1)
            }
        }
    }

    /// The system prompt of group `g` (generated on first use from its own seed, so it does
    /// not depend on the order groups are first drawn in).
    fn system(&mut self, g: usize) -> &str {
        let (seed, tokens) = (self.seed, self.system_tokens);
        self.systems[g].get_or_insert_with(|| {
            words(
                &mut SmallRng::seed_from_u64(sub_seed(seed, g as u64 + 1)),
                tokens,
            )
        })
    }
}

impl Workload for SharedPrefix {
    fn next_request(&mut self) -> Request {
        let g = self.pick();
        let question = words(&mut self.rng, self.question_tokens);
        let (out, sys_tokens) = (self.output_tokens, self.system_tokens);
        let system = self.system(g);
        Request {
            body: chat_body(MODEL, &[("system", system), ("user", &question)], out),
            path: CHAT,
            key: format!("group-{g}"),
            max_tokens: out,
            prompt_tokens: (sys_tokens + self.question_tokens) as u32,
        }
    }
}

/// One open conversation of [`MultiTurn`].
struct Conversation {
    user: u64,
    rng: SmallRng,
    system: String,
    /// (role, content) after the system prompt.
    history: Vec<(&'static str, String)>,
    round: usize,
}

/// `multi-turn`: `users` conversations open at once, visited in a fixed shuffled order; each
/// visit sends the whole history plus a new user message, then appends a synthetic assistant
/// reply to the history. After `rounds` rounds the user leaves and a new one takes the slot.
///
/// Replies are synthetic (generated here, not the engine's output) so that the sequence is a
/// pure function of the seed; the engine's cached prefix of round *r* still covers everything
/// up to the previous user message of round *r + 1*.
pub struct MultiTurn {
    seed: u64,
    slots: Vec<Conversation>,
    order: Vec<usize>,
    cursor: usize,
    next_user: u64,
    rounds: usize,
    system_tokens: usize,
    turn_tokens: usize,
    reply_tokens: usize,
    output_tokens: u32,
}

impl MultiTurn {
    /// A workload of `users` concurrent conversations.
    pub fn new(
        seed: u64,
        users: usize,
        rounds: usize,
        system_tokens: usize,
        turn_tokens: usize,
        reply_tokens: usize,
        output_tokens: u32,
    ) -> Self {
        let users = users.max(1);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..users).collect();
        // Fisher–Yates with the seeded RNG.
        for i in (1..users).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut w = MultiTurn {
            seed,
            slots: Vec::with_capacity(users),
            order,
            cursor: 0,
            next_user: 0,
            rounds: rounds.max(1),
            system_tokens,
            turn_tokens,
            reply_tokens,
            output_tokens,
        };
        for _ in 0..users {
            let c = w.new_conversation();
            w.slots.push(c);
        }
        w
    }

    fn new_conversation(&mut self) -> Conversation {
        let user = self.next_user;
        self.next_user += 1;
        let mut rng = SmallRng::seed_from_u64(sub_seed(self.seed, user + 1));
        let system = words(&mut rng, self.system_tokens);
        Conversation {
            user,
            rng,
            system,
            history: Vec::new(),
            round: 0,
        }
    }
}

impl Workload for MultiTurn {
    fn next_request(&mut self) -> Request {
        let slot = self.order[self.cursor];
        self.cursor = (self.cursor + 1) % self.order.len();
        if self.slots[slot].round >= self.rounds {
            self.slots[slot] = self.new_conversation();
        }
        let (turn, reply) = (self.turn_tokens, self.reply_tokens);
        let c = &mut self.slots[slot];
        let question = words(&mut c.rng, turn);
        c.history.push(("user", question));
        let mut messages: Vec<(&str, &str)> = vec![("system", &c.system)];
        messages.extend(c.history.iter().map(|(r, t)| (*r, t.as_str())));
        let body = chat_body(MODEL, &messages, self.output_tokens);
        let prompt_tokens = self.system_tokens + c.history.len() / 2 * (turn + reply) + turn;
        c.round += 1;
        let answer = words(&mut c.rng, reply);
        c.history.push(("assistant", answer));
        Request {
            body,
            path: CHAT,
            key: format!("user-{}", c.user),
            max_tokens: self.output_tokens,
            prompt_tokens: prompt_tokens as u32,
        }
    }
}

/// `mixed`: unique prompts with lognormal prompt and output lengths, like chat traffic.
pub struct Mixed {
    rng: SmallRng,
    prompt_median: f64,
    prompt_sigma: f64,
    output_median: f64,
    output_sigma: f64,
    n: u64,
}

impl Mixed {
    /// Prompt tokens are clamped to [8, 16,000], output tokens to [4, 2,048].
    pub fn new(
        seed: u64,
        prompt_median: f64,
        prompt_sigma: f64,
        output_median: f64,
        output_sigma: f64,
    ) -> Self {
        Mixed {
            rng: SmallRng::seed_from_u64(seed),
            prompt_median,
            prompt_sigma,
            output_median,
            output_sigma,
            n: 0,
        }
    }

    fn next_for(&mut self, model: &str, key: String) -> Request {
        let p = lognormal(&mut self.rng, self.prompt_median, self.prompt_sigma)
            .round()
            .clamp(8.0, 16_000.0) as usize;
        let o = lognormal(&mut self.rng, self.output_median, self.output_sigma)
            .round()
            .clamp(4.0, 2048.0) as u32;
        let prompt = words(&mut self.rng, p);
        self.n += 1;
        Request {
            body: chat_body(model, &[("user", &prompt)], o),
            path: CHAT,
            key,
            max_tokens: o,
            prompt_tokens: p as u32,
        }
    }
}

impl Workload for Mixed {
    fn next_request(&mut self) -> Request {
        let key = format!("req-{}", self.n);
        self.next_for(MODEL, key)
    }
}

/// `lora`: [`Mixed`] traffic addressed to `lora-0` … `lora-{N-1}`, adapter *k* (0-based)
/// drawn with probability ∝ 1 / (k + 1)^s.
pub struct Lora {
    rng: SmallRng,
    cumulative: Vec<f64>,
    inner: Mixed,
}

impl Lora {
    /// `adapters` adapters with Zipf exponent `s`.
    pub fn new(seed: u64, adapters: usize, s: f64, inner: Mixed) -> Self {
        let mut acc = 0.0;
        let cumulative = (0..adapters.max(1))
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect();
        Lora {
            rng: SmallRng::seed_from_u64(seed),
            cumulative,
            inner,
        }
    }

    fn pick(&mut self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = self.rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1)
    }
}

impl Workload for Lora {
    fn next_request(&mut self) -> Request {
        let k = self.pick();
        let name = format!("lora-{k}");
        self.inner.next_for(&name, name.clone())
    }
}

/// `lora` with shifting popularity (`scenario lora`): [`Mixed`] traffic over `lora-0` …
/// `lora-{N-1}` where a share `hot_share` of the requests goes to one hot adapter and the rest
/// spreads uniformly over all of them; the hot adapter changes every `per_epoch` requests (at a
/// Poisson rate λ, every `per_epoch / λ` seconds on average), stepping by `stride` so that
/// consecutive hot adapters are not neighbours.
pub struct ShiftingLora {
    rng: SmallRng,
    adapters: usize,
    per_epoch: u64,
    hot_share: f64,
    stride: usize,
    inner: Mixed,
    n: u64,
}

impl ShiftingLora {
    /// `adapters` adapters (at least 1), a new hot one every `per_epoch` requests.
    pub fn new(
        seed: u64,
        adapters: usize,
        per_epoch: u64,
        hot_share: f64,
        stride: usize,
        inner: Mixed,
    ) -> Self {
        ShiftingLora {
            rng: SmallRng::seed_from_u64(seed),
            adapters: adapters.max(1),
            per_epoch: per_epoch.max(1),
            hot_share: hot_share.clamp(0.0, 1.0),
            stride: stride.max(1),
            inner,
            n: 0,
        }
    }

    /// The hot adapter of request number `n`.
    pub fn hot(&self, n: u64) -> usize {
        ((n / self.per_epoch) as usize * self.stride) % self.adapters
    }
}

impl Workload for ShiftingLora {
    fn next_request(&mut self) -> Request {
        let k = if self.rng.random::<f64>() < self.hot_share {
            self.hot(self.n)
        } else {
            self.rng.random_range(0..self.adapters)
        };
        self.n += 1;
        let name = format!("lora-{k}");
        self.inner.next_for(&name, name.clone())
    }
}

/// `long-prompt`: streaming completions whose body is `bytes` long, unique per request (the
/// prompt starts with the request number, so no two share even a first block).
pub struct LongPrompt {
    base: String,
    bytes: usize,
    output_tokens: u32,
    n: u64,
}

impl LongPrompt {
    /// Bodies of `bytes` bytes (at least the JSON envelope).
    pub fn new(seed: u64, bytes: usize, output_tokens: u32) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        // Words are ≈ 3.8 bytes per token; a little extra, then cut to size per request.
        let base = words(&mut rng, bytes / 3 + 16);
        LongPrompt {
            base,
            bytes,
            output_tokens,
            n: 0,
        }
    }
}

impl Workload for LongPrompt {
    fn next_request(&mut self) -> Request {
        let head = format!(
            "{{\"model\":\"{MODEL}\",\"max_tokens\":{},\"stream\":true,\
             \"stream_options\":{{\"include_usage\":true}},\"prompt\":\"",
            self.output_tokens
        );
        let tail = "\"}";
        let mut prompt = format!("r{} ", self.n);
        let room = self
            .bytes
            .saturating_sub(head.len() + tail.len() + prompt.len());
        // The base text is ASCII, so any cut is a char boundary.
        prompt.push_str(&self.base[..room.min(self.base.len())]);
        let mut body = String::with_capacity(self.bytes);
        body.push_str(&head);
        body.push_str(&prompt);
        body.push_str(tail);
        let key = format!("req-{}", self.n);
        self.n += 1;
        Request {
            body: Bytes::from(body),
            path: COMPLETIONS,
            key,
            max_tokens: self.output_tokens,
            prompt_tokens: count_tokens(&prompt) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::workload::{Kind, WorkloadArgs};

    fn take(w: &mut dyn Workload, n: usize) -> Vec<Request> {
        (0..n).map(|_| w.next_request()).collect()
    }

    fn messages(r: &Request) -> Vec<(String, String)> {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_owned(),
                    m["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn every_workload_is_seeded() {
        for kind in [
            Kind::SharedPrefix,
            Kind::MultiTurn,
            Kind::Mixed,
            Kind::Lora,
            Kind::LongPrompt,
            Kind::HotSpot,
            Kind::CachePressure,
            Kind::KvSharing,
        ] {
            let mut a = WorkloadArgs {
                workload: kind,
                ..WorkloadArgs::default()
            };
            a.groups = 10;
            a.system_tokens = 300;
            a.prompt_bytes = 4096;
            let x = take(a.build().as_mut(), 30);
            let y = take(a.build().as_mut(), 30);
            a.seed += 1;
            let z = take(a.build().as_mut(), 30);
            assert!(x.iter().zip(&y).all(|(p, q)| p.body == q.body), "{kind:?}");
            assert!(x.iter().zip(&z).any(|(p, q)| p.body != q.body), "{kind:?}");
            for r in &x {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(v["stream"], true);
                assert_eq!(v["max_tokens"], r.max_tokens);
            }
        }
    }

    #[test]
    fn shared_prefix_groups_share_exactly_their_system_prompt() {
        let mut w = SharedPrefix::new(1, 5, 400, 50, 16);
        let reqs = take(&mut w, 200);
        let mut systems: HashMap<String, String> = HashMap::new();
        let mut questions = HashSet::new();
        for r in &reqs {
            let m = messages(r);
            assert_eq!(m[0].0, "system");
            assert_eq!(count_tokens(&m[0].1), 400);
            assert_eq!(count_tokens(&m[1].1), 50);
            let prev = systems
                .entry(r.key.clone())
                .or_insert_with(|| m[0].1.clone());
            assert_eq!(prev, &m[0].1, "same group, same system prompt");
            assert!(questions.insert(m[1].1.clone()), "questions are unique");
        }
        assert_eq!(systems.len(), 5, "all groups drawn");
        let distinct: HashSet<_> = systems.values().collect();
        assert_eq!(distinct.len(), 5, "groups differ");
        // Roughly uniform over groups.
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for r in &reqs {
            *counts.entry(&r.key).or_default() += 1;
        }
        assert!(
            counts.values().all(|&c| (20..=60).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn hot_spot_popularity_is_zipf_and_groups_keep_their_prompt() {
        let mut w = SharedPrefix::new(4, 64, 50, 10, 8).with_zipf(1.5);
        let reqs = take(&mut w, 4000);
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut systems: HashMap<String, String> = HashMap::new();
        for r in &reqs {
            *counts.entry(r.key.clone()).or_default() += 1;
            let sys = messages(r)[0].1.clone();
            assert_eq!(
                systems.entry(r.key.clone()).or_insert_with(|| sys.clone()),
                &sys
            );
        }
        // P(0) = 1 / H(64, 1.5) ≈ 0.42 (≈ 1,690 of 4,000); the top 3 ≈ 65 %.
        let c = |g: usize| counts.get(&format!("group-{g}")).copied().unwrap_or(0);
        assert!((1550..1850).contains(&c(0)), "{counts:?}");
        let top3 = c(0) + c(1) + c(2);
        assert!((2450..2750).contains(&top3), "{top3}");
        assert!(c(0) > 2 * c(1) && c(1) > c(3) && counts.len() > 30);
        // The same seed without skew draws the same prompts for the same groups.
        let mut u = SharedPrefix::new(4, 64, 50, 10, 8);
        assert_eq!(u.system(0), w.system(0));
    }

    #[test]
    fn shared_prefix_group_prompt_does_not_depend_on_draw_order() {
        let mut a = SharedPrefix::new(5, 50, 100, 10, 8);
        let mut b = SharedPrefix::new(5, 50, 100, 10, 8);
        let g7a = a.system(7).to_owned();
        let _ = b.system(3);
        assert_eq!(b.system(7), g7a);
    }

    #[test]
    fn multi_turn_history_grows_and_is_a_prefix_of_the_next_round() {
        let users = 4;
        let mut w = MultiTurn::new(3, users, 3, 200, 30, 20, 16);
        let reqs = take(&mut w, users * 5);
        let mut by_user: HashMap<String, Vec<Vec<(String, String)>>> = HashMap::new();
        for r in &reqs {
            by_user.entry(r.key.clone()).or_default().push(messages(r));
        }
        // 4 slots × 3 rounds, then new users take over.
        assert_eq!(by_user.len(), users * 2);
        for convo in by_user.values() {
            assert!(convo.len() <= 3);
            for (round, pair) in convo.windows(2).enumerate() {
                let (prev, next) = (&pair[0], &pair[1]);
                assert_eq!(
                    next.len(),
                    prev.len() + 2,
                    "round {round}: +assistant +user"
                );
                assert_eq!(&next[..prev.len()], &prev[..], "history is a prefix");
                assert_eq!(next[prev.len()].0, "assistant");
            }
            // Prompt length grows by one (user + assistant) per round.
            let lens: Vec<usize> = convo
                .iter()
                .map(|m| m.iter().map(|(_, c)| count_tokens(c)).sum())
                .collect();
            for (i, l) in lens.iter().enumerate() {
                assert_eq!(*l, 200 + 30 + i * 50);
            }
        }
        assert_eq!(reqs[0].prompt_tokens, 230);
    }

    #[test]
    fn multi_turn_users_are_interleaved_not_back_to_back() {
        let mut w = MultiTurn::new(9, 8, 10, 50, 10, 10, 8);
        let keys: Vec<String> = take(&mut w, 16).into_iter().map(|r| r.key).collect();
        assert_eq!(keys[..8], keys[8..], "one round of every user per cycle");
        assert!(keys.windows(2).all(|k| k[0] != k[1]));
    }

    #[test]
    fn mixed_lengths_are_lognormal_around_the_median() {
        let mut w = Mixed::new(11, 600.0, 0.9, 128.0, 0.7);
        let reqs = take(&mut w, 2000);
        let mut p: Vec<u32> = reqs.iter().map(|r| r.prompt_tokens).collect();
        let mut o: Vec<u32> = reqs.iter().map(|r| r.max_tokens).collect();
        p.sort_unstable();
        o.sort_unstable();
        let med = |v: &[u32]| v[v.len() / 2] as f64;
        assert!((540.0..660.0).contains(&med(&p)), "{}", med(&p));
        assert!((115.0..141.0).contains(&med(&o)), "{}", med(&o));
        // Right-skewed: p90/p50 ≈ e^(1.2816 σ) = 3.17 for σ = 0.9.
        let ratio = p[p.len() * 9 / 10] as f64 / med(&p);
        assert!((2.7..3.7).contains(&ratio), "{ratio}");
        // The stated prompt length is what the body carries.
        for r in reqs.iter().take(20) {
            assert_eq!(count_tokens(&messages(r)[0].1), r.prompt_tokens as usize);
        }
    }

    #[test]
    fn shifting_lora_moves_its_hot_adapter() {
        let mut w = ShiftingLora::new(3, 16, 100, 0.5, 5, Mixed::new(3, 100.0, 0.5, 16.0, 0.3));
        assert_eq!((w.hot(0), w.hot(99), w.hot(100), w.hot(200)), (0, 0, 5, 10));
        let mut hits = [0usize; 2];
        for i in 0..200 {
            let r = w.next_request();
            let hot = format!("lora-{}", if i < 100 { 0 } else { 5 });
            hits[i / 100] += usize::from(r.key == hot);
        }
        // Half the requests plus the uniform share (1/16 of the rest) go to the hot one.
        assert!(hits.iter().all(|&h| (40..=70).contains(&h)), "{hits:?}");
    }

    #[test]
    fn lora_popularity_is_skewed() {
        let mut w = Lora::new(2, 8, 1.2, Mixed::new(3, 100.0, 0.5, 16.0, 0.3));
        let mut counts = [0usize; 8];
        for r in take(&mut w, 4000) {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let model = v["model"].as_str().unwrap();
            assert_eq!(model, r.key);
            let k: usize = model.trim_start_matches("lora-").parse().unwrap();
            counts[k] += 1;
        }
        // P(0) = 1 / H(8, 1.2) ≈ 0.43 (≈ 1,715 of 4,000); P(7) ≈ 0.035 (≈ 141).
        assert!((1550..1900).contains(&counts[0]), "{counts:?}");
        assert!(counts[0] > 2 * counts[1] && counts[1] > counts[3] && counts[3] > counts[7]);
        assert!(counts[7] > 60, "{counts:?}");
    }

    #[test]
    fn long_prompt_bodies_have_the_asked_size_and_unique_starts() {
        for bytes in [1024, 16 * 1024, 220 * 1024, 1024 * 1024] {
            let mut w = LongPrompt::new(1, bytes, 16);
            let a = w.next_request();
            let b = w.next_request();
            assert_eq!(a.body.len(), bytes);
            assert_eq!(b.body.len(), bytes);
            let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
            let p = v["prompt"].as_str().unwrap();
            assert!(p.starts_with("r0 "));
            assert_eq!(count_tokens(p), a.prompt_tokens as usize);
            let v: serde_json::Value = serde_json::from_slice(&b.body).unwrap();
            assert!(v["prompt"].as_str().unwrap().starts_with("r1 "));
        }
    }
}
