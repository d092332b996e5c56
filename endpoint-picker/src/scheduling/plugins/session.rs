//! `session-affinity-scorer`, with llm-d's names and parameters: requests of one session go
//! back to the replica that served the session, where its context is cached.
//!
//! Two algorithms (`algorithm`):
//! - `encoded_endpoint_header` (the default, stateless): the session header carries the
//!   base64 of `namespace/pod` of the replica that served the previous request; the scorer
//!   gives that replica 1 and the others 0, and writes the header on every response so that
//!   the client can echo it.
//! - `session_id_header` (stateful): the header (or, without it, an agent identity header:
//!   `x-claude-code-session-id`, `x-session-affinity`, `session-id`, `session_id`) carries an
//!   opaque session id; the scorer binds it to the replica that served it. An unbound session
//!   goes to the replica bound by the fewest sessions; a session whose replica is missing from
//!   the candidates for `missThreshold` requests in a row moves. Bindings unused for
//!   `evictionTtlSeconds` are dropped, and at most [`MAX_SESSIONS`] are kept (the least
//!   recently used go first): session ids come from clients.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use lru::LruCache;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::config::params::Params;
use crate::datastore::Endpoint;
use crate::request::InferenceRequest;
use crate::scheduling::plugins::response::{ResponsePlugin, Served};
use crate::scheduling::{Candidate, CycleState, Plugin, Scorer};

/// Longest `evictionTtlSeconds` / `evictionSweepSeconds`: a year.
const MAX_SESSION_SECONDS: f64 = 365.0 * 24.0 * 3600.0;
/// The default session header (llm-d's).
pub const DEFAULT_HEADER: &str = "x-session-token";
/// The session header of `strategy: session_id`.
pub const SESSION_ID_STRATEGY_HEADER: &str = "x-session-id";
/// Agent identity headers read as a session id when the session header is absent
/// (`session_id_header` only), in this order.
pub const AGENT_IDENTITY_HEADERS: [&str; 4] = [
    "x-claude-code-session-id",
    "x-session-affinity",
    "session-id",
    "session_id",
];
/// Most session bindings kept (`session_id_header`).
pub const MAX_SESSIONS: usize = 100_000;
/// Longest session id or token read; a longer one is no session.
const MAX_SESSION_BYTES: usize = 256;

/// Which algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// The client echoes the serving replica back, base64-encoded.
    EncodedEndpointHeader,
    /// The EPP binds opaque session ids to replicas.
    SessionIdHeader,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionYaml {
    algorithm: Option<String>,
    /// The 2026 reference's spelling: `strategy: session_id` is `session_id_header` with the
    /// header `x-session-id` and a 300 s TTL unless `headerName` / `evictionTtlSeconds` say.
    strategy: Option<String>,
    header_name: Option<String>,
    profile_name: Option<String>,
    eviction_ttl_seconds: Option<f64>,
    eviction_sweep_seconds: Option<f64>,
    miss_threshold: Option<i64>,
}

#[derive(Debug)]
struct Binding {
    endpoint: String,
    last_seen: Instant,
    misses: u32,
}

/// `session-affinity-scorer`.
#[derive(Debug)]
pub struct SessionAffinityScorer {
    /// Instance name.
    pub name: String,
    algorithm: Algorithm,
    header: String,
    ttl: Duration,
    miss_threshold: u32,
    sessions: Mutex<Sessions>,
}

#[derive(Debug)]
struct Sessions {
    bindings: LruCache<String, Binding>,
    /// Sessions bound per endpoint key (`namespace/pod-rank`).
    per_endpoint: HashMap<String, usize>,
    /// Rotates the least-loaded tie-break, so new sessions spread.
    cursor: usize,
}

impl SessionAffinityScorer {
    /// Builds from `algorithm`, `headerName`, `profileName` (only the primary profile is
    /// supported: empty), `evictionTtlSeconds` (600), `evictionSweepSeconds` (accepted:
    /// eviction happens as bindings are touched) and `missThreshold` (3).
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: SessionYaml = p.decode()?;
        let session_id_strategy = match y.strategy.as_deref() {
            None => false,
            Some("session_id") => true,
            Some(other) => {
                return Err(p.invalid("strategy", format!("{other:?}: expected session_id")));
            }
        };
        if session_id_strategy
            && y.algorithm
                .as_deref()
                .is_some_and(|a| a != "session_id_header")
        {
            return Err(p.invalid(
                "strategy",
                "strategy session_id contradicts the algorithm given",
            ));
        }
        let algorithm = match y.algorithm.as_deref() {
            None if session_id_strategy => Algorithm::SessionIdHeader,
            None | Some("encoded_endpoint_header") => Algorithm::EncodedEndpointHeader,
            Some("session_id_header") => Algorithm::SessionIdHeader,
            Some(other) => {
                return Err(p.invalid(
                    "algorithm",
                    format!("{other:?}: expected encoded_endpoint_header or session_id_header"),
                ));
            }
        };
        if y.profile_name.as_deref().is_some_and(|n| !n.is_empty()) {
            return Err(p.invalid(
                "profileName",
                "only the primary profile's endpoint can be pinned here (P/D profiles are not implemented)",
            ));
        }
        // Capped at a year: a larger number once panicked the load (a `Duration` overflow).
        let seconds = |p: &Params<'_>, name, v: Option<f64>, default: f64| match v {
            None => Ok(default),
            Some(s) if s.is_finite() && s > 0.0 && s <= MAX_SESSION_SECONDS => Ok(s),
            Some(_) => Err(p.invalid(
                name,
                "must be a number of seconds > 0 and at most a year (31536000)",
            )),
        };
        let default_ttl = if session_id_strategy { 300.0 } else { 600.0 };
        let ttl = seconds(p, "evictionTtlSeconds", y.eviction_ttl_seconds, default_ttl)?;
        if y.eviction_sweep_seconds.is_some() {
            seconds(p, "evictionSweepSeconds", y.eviction_sweep_seconds, 30.0)?;
            p.warn("evictionSweepSeconds has no effect here: bindings expire as they are touched");
        }
        let miss_threshold = p.positive("missThreshold", y.miss_threshold)?.unwrap_or(3);
        let header = y.header_name.filter(|h| !h.trim().is_empty()).map_or_else(
            || {
                if session_id_strategy {
                    SESSION_ID_STRATEGY_HEADER
                } else {
                    DEFAULT_HEADER
                }
                .to_owned()
            },
            |h| h.trim().to_ascii_lowercase(),
        );
        Ok(Self::new(
            p.name(),
            algorithm,
            header,
            Duration::from_secs_f64(ttl),
            miss_threshold.min(u32::MAX as usize) as u32,
        ))
    }

    /// A scorer with explicit settings.
    pub fn new(
        name: String,
        algorithm: Algorithm,
        header: String,
        ttl: Duration,
        miss_threshold: u32,
    ) -> Self {
        Self {
            name,
            algorithm,
            header,
            ttl,
            miss_threshold,
            sessions: Mutex::new(Sessions {
                bindings: LruCache::unbounded(),
                per_endpoint: HashMap::new(),
                cursor: 0,
            }),
        }
    }

    /// The session id of a request under `session_id_header`.
    fn session_id<'r>(&self, request: &'r InferenceRequest) -> Option<&'r str> {
        std::iter::once(self.header.as_str())
            .chain(AGENT_IDENTITY_HEADERS)
            .find_map(|h| request.header(h))
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= MAX_SESSION_BYTES)
    }
}

/// An endpoint's key in bindings and tokens: `namespace/name` (the scheduling endpoint's
/// name, so that each data-parallel rank is its own target).
fn key(endpoint: &Endpoint) -> String {
    format!("{}/{}", endpoint.spec.namespace, endpoint.spec.name)
}

fn decode_token(token: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

impl Sessions {
    fn unbind(&mut self, binding: &Binding) {
        if let Some(n) = self.per_endpoint.get_mut(&binding.endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_endpoint.remove(&binding.endpoint);
            }
        }
    }

    /// Drops bindings unused for `ttl` (the least recently used first) and the surplus.
    fn evict(&mut self, now: Instant, ttl: Duration) {
        while let Some((_, b)) = self.bindings.peek_lru() {
            let stale = now.saturating_duration_since(b.last_seen) > ttl;
            if !stale && self.bindings.len() <= MAX_SESSIONS {
                break;
            }
            if let Some((_, b)) = self.bindings.pop_lru() {
                self.unbind(&b);
            }
        }
    }
}

impl Plugin for SessionAffinityScorer {
    fn type_name(&self) -> &'static str {
        "session-affinity-scorer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Scorer for SessionAffinityScorer {
    fn score(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        candidates: &[Candidate],
        scores: &mut [f64],
    ) {
        scores.iter_mut().for_each(|s| *s = 0.0);
        let keys: Vec<String> = candidates.iter().map(|c| key(&c.endpoint)).collect();
        let target = match self.algorithm {
            Algorithm::EncodedEndpointHeader => request
                .header(&self.header)
                .filter(|t| t.len() <= MAX_SESSION_BYTES)
                .and_then(decode_token)
                .and_then(|k| keys.iter().position(|c| *c == k)),
            // A request without a session has no preference: the least-bound spread below is
            // for sessions that are about to be bound, and `pre_request` binds none here.
            Algorithm::SessionIdHeader if self.session_id(request).is_none() => None,
            Algorithm::SessionIdHeader => {
                let mut sessions = self.sessions.lock();
                sessions.evict(state.now, self.ttl);
                let bound = self
                    .session_id(request)
                    .and_then(|id| sessions.bindings.peek(id))
                    .map(|b| (keys.iter().position(|c| *c == b.endpoint), b.misses));
                match bound {
                    Some((Some(i), _)) => Some(i),
                    // Bound elsewhere and not yet past the threshold: no preference, so the
                    // session does not move for one missing candidate list.
                    Some((None, misses)) if misses + 1 < self.miss_threshold => None,
                    _ if candidates.is_empty() => None,
                    _ => {
                        // Unbound, or its replica gone for good: the least bound replica.
                        let least = keys
                            .iter()
                            .map(|k| sessions.per_endpoint.get(k).copied().unwrap_or(0))
                            .min()
                            .unwrap_or(0);
                        let tied: Vec<usize> = (0..keys.len())
                            .filter(|&i| {
                                sessions.per_endpoint.get(&keys[i]).copied().unwrap_or(0) == least
                            })
                            .collect();
                        sessions.cursor = sessions.cursor.wrapping_add(1);
                        Some(tied[sessions.cursor % tied.len()])
                    }
                }
            }
        };
        if let Some(i) = target {
            scores[i] = 1.0;
        }
    }

    fn learns(&self) -> bool {
        self.algorithm == Algorithm::SessionIdHeader
    }

    fn pre_request(&self, request: &InferenceRequest, state: &CycleState, targets: &[Candidate]) {
        let (Some(id), Some(primary)) = (self.session_id(request), targets.first()) else {
            return;
        };
        let endpoint = key(&primary.endpoint);
        let mut sessions = self.sessions.lock();
        match sessions.bindings.get_mut(id) {
            Some(b) if b.endpoint == endpoint => {
                b.last_seen = state.now;
                b.misses = 0;
                return;
            }
            Some(b) if b.misses + 1 < self.miss_threshold => {
                // Served elsewhere while its replica was missing: keep the binding, count it.
                b.misses += 1;
                b.last_seen = state.now;
                return;
            }
            _ => {}
        }
        if let Some(old) = sessions.bindings.pop(id) {
            sessions.unbind(&old);
        }
        *sessions.per_endpoint.entry(endpoint.clone()).or_default() += 1;
        sessions.bindings.put(
            id.to_owned(),
            Binding {
                endpoint,
                last_seen: state.now,
                misses: 0,
            },
        );
        sessions.evict(state.now, self.ttl);
    }

    fn response_plugin(&self) -> Option<&dyn ResponsePlugin> {
        (self.algorithm == Algorithm::EncodedEndpointHeader).then_some(self as &dyn ResponsePlugin)
    }
}

impl ResponsePlugin for SessionAffinityScorer {
    fn response_headers(&self, served: &Served<'_>) -> Vec<(String, String)> {
        match served.endpoint {
            Some(e) if self.algorithm == Algorithm::EncodedEndpointHeader => vec![(
                self.header.clone(),
                base64::engine::general_purpose::STANDARD.encode(key(e)),
            )],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{Datastore, test_util::pool};

    fn config_with(parameters: &str) -> Result<crate::config::LoadedConfig, ConfigError> {
        let yaml = [
            "apiVersion: llm-d.ai/v1alpha1",
            "kind: EndpointPickerConfig",
            "plugins:",
            "- type: session-affinity-scorer",
            &format!("  parameters: {parameters}"),
            "schedulingProfiles:",
            "- name: default",
            "  plugins:",
            "  - pluginRef: session-affinity-scorer",
        ]
        .join("\n");
        crate::config::load(&yaml, 1)
    }

    #[test]
    fn the_session_id_strategy_loads_and_contradictions_fail() {
        if let Err(e) = config_with("{strategy: session_id}") {
            panic!("{e}");
        }
        assert!(config_with("{strategy: session_id, algorithm: session_id_header}").is_ok());
        let e = config_with("{strategy: session_id, algorithm: encoded_endpoint_header}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("strategy"), "{e}");
        let e = config_with("{strategy: cookie}").unwrap_err().to_string();
        assert!(e.contains("cookie"), "{e}");
    }

    fn candidates(n: u8) -> Vec<Candidate> {
        let ds = Datastore::new();
        ds.apply(pool(n))
            .endpoints
            .iter()
            .cloned()
            .map(Candidate::new)
            .collect()
    }

    fn request(headers: &[(&str, &str)]) -> InferenceRequest {
        InferenceRequest {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn scores(
        s: &SessionAffinityScorer,
        r: &InferenceRequest,
        c: &[Candidate],
        now: Instant,
    ) -> Vec<f64> {
        let mut out = vec![f64::NAN; c.len()];
        s.score(r, &CycleState::new(now), c, &mut out);
        out
    }

    #[tokio::test(start_paused = true)]
    async fn the_encoded_endpoint_token_round_trips() {
        let c = candidates(3);
        let s = SessionAffinityScorer::new(
            "s".into(),
            Algorithm::EncodedEndpointHeader,
            DEFAULT_HEADER.into(),
            Duration::from_secs(600),
            3,
        );
        let headers = s.response_headers(&Served {
            address: None,
            endpoint: Some(&c[1].endpoint),
        });
        assert_eq!(headers[0].0, DEFAULT_HEADER);
        let r = request(&[(DEFAULT_HEADER, &headers[0].1)]);
        assert_eq!(scores(&s, &r, &c, Instant::now()), [0.0, 1.0, 0.0]);
        for junk in ["%%%", "bm9wZQ==", ""] {
            let r = request(&[(DEFAULT_HEADER, junk)]);
            assert_eq!(
                scores(&s, &r, &c, Instant::now()),
                [0.0, 0.0, 0.0],
                "{junk}"
            );
        }
        assert!(s.response_plugin().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn session_ids_bind_spread_move_and_expire() {
        let c = candidates(3);
        let s = SessionAffinityScorer::new(
            "s".into(),
            Algorithm::SessionIdHeader,
            DEFAULT_HEADER.into(),
            Duration::from_secs(600),
            2,
        );
        assert!(s.learns() && s.response_plugin().is_none());
        let now = Instant::now();
        // Three new sessions spread over the three replicas; each then sticks.
        let mut placed = Vec::new();
        for id in ["a", "b", "c"] {
            let r = request(&[("x-session-affinity", id)]);
            let sc = scores(&s, &r, &c, now);
            let i = sc.iter().position(|v| *v == 1.0).unwrap();
            s.pre_request(&r, &CycleState::new(now), &c[i..=i]);
            placed.push(i);
        }
        placed.sort();
        assert_eq!(placed, [0, 1, 2]);
        // Review: a request without a session has no preference (it was handed a rotating
        // 1.0, which outweighed the load scorers by this scorer's weight).
        for _ in 0..4 {
            assert_eq!(scores(&s, &request(&[]), &c, now), [0.0, 0.0, 0.0]);
        }
        let r = request(&[(DEFAULT_HEADER, "b")]);
        let home = scores(&s, &r, &c, now)
            .iter()
            .position(|v| *v == 1.0)
            .unwrap();
        for _ in 0..5 {
            assert_eq!(scores(&s, &r, &c, now)[home], 1.0);
        }
        // Its replica missing once: no preference, binding kept; twice: it moves.
        let others: Vec<Candidate> = c
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != home)
            .map(|(_, c)| c.clone())
            .collect();
        assert_eq!(scores(&s, &r, &others, now), [0.0, 0.0]);
        s.pre_request(&r, &CycleState::new(now), &others[..1]);
        assert_eq!(scores(&s, &r, &c, now)[home], 1.0, "still bound");
        s.pre_request(&r, &CycleState::new(now), &others[..1]);
        assert_eq!(scores(&s, &r, &c, now)[home], 0.0, "moved");
        // Unused past the TTL: gone.
        let later = now + Duration::from_secs(601);
        let a = request(&[("x-session-affinity", "a")]);
        s.score(&a, &CycleState::new(later), &c, &mut [0.0; 3]);
        assert!(s.sessions.lock().bindings.is_empty());
        assert!(s.sessions.lock().per_endpoint.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bindings_are_bounded() {
        let c = candidates(2);
        let s = SessionAffinityScorer::new(
            "s".into(),
            Algorithm::SessionIdHeader,
            DEFAULT_HEADER.into(),
            Duration::from_secs(600),
            3,
        );
        let now = Instant::now();
        for i in 0..(MAX_SESSIONS + 50) {
            let id = i.to_string();
            s.pre_request(
                &request(&[(DEFAULT_HEADER, &id)]),
                &CycleState::new(now),
                &c[..1],
            );
        }
        let sessions = s.sessions.lock();
        assert_eq!(sessions.bindings.len(), MAX_SESSIONS);
        assert_eq!(sessions.per_endpoint.values().sum::<usize>(), MAX_SESSIONS);
        let long = "x".repeat(MAX_SESSION_BYTES + 1);
        drop(sessions);
        assert!(s.session_id(&request(&[(DEFAULT_HEADER, &long)])).is_none());
    }
}
