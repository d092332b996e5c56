//! Authentication and authorization of the EPP's own HTTP endpoints (`/metrics`, `/debug/pool`)
//! by the Kubernetes API server, as the reference EPP does with `--metrics-endpoint-auth`
//! (controller-runtime's `filters.WithAuthenticationAndAuthorization`).
//!
//! For a request carrying `Authorization: Bearer <token>`:
//!
//! 1. **Authenticate**: create an `authentication.k8s.io/v1` TokenReview of the token. Not
//!    authenticated → [`Decision::Unauthenticated`] (401). One deliberate difference: the
//!    reference answers 401 only when no bearer token is sent, and 500 when the TokenReview
//!    rejects the token (its authenticator chain reports "invalid bearer token" as an error).
//!    A rejected credential is what 401 means, and a scraper fails the scrape either way.
//! 2. **Authorize**: create an `authorization.k8s.io/v1` SubjectAccessReview for the reviewed
//!    user (name, uid, groups, extra) with `nonResourceAttributes {path, verb}`: the request's
//!    path and its lower-cased method, so a scraper needs a ClusterRole with
//!    `nonResourceURLs: ["/metrics"], verbs: ["get"]`. Not allowed → [`Decision::Forbidden`]
//!    (403).
//! 3. The API server failing to answer either review → [`Decision::Failed`] (500, as the
//!    reference; see [`Decision::status`]).
//!
//! The EPP's service account needs `create` on `tokenreviews` and `subjectaccessreviews`
//! (`manifests/epp/rbac.yaml`).
//!
//! ## Caching, as the reference, but bounded
//!
//! controller-runtime caches token reviews for a minute (authenticated or not) and access
//! reviews for five minutes when allowed, thirty seconds when denied; errors are not cached.
//! We keep those TTLs ([`TOKEN_CACHE_TTL`], [`ALLOWED_CACHE_TTL`], [`DENIED_CACHE_TTL`]) and
//! add bounds the reference's token cache lacks, because anyone who can reach the metrics
//! port can send any number of distinct tokens:
//!
//! * tokens are keyed by an HMAC-SHA256 of the token under a key drawn at random per
//!   authorizer: the token itself is never stored, and a memory dump does not let anyone check
//!   a guessed token offline;
//! * authenticated and rejected tokens live in two separate LRU caches
//!   ([`AUTHENTICATED_TOKENS`], [`REJECTED_TOKENS`]), so a flood of bogus tokens evicts only
//!   other bogus tokens, never Prometheus' entry;
//! * identical lookups under way at once share one review (single flight), and at most
//!   [`MAX_REVIEWS_IN_FLIGHT`] distinct ones run at a time: past that the request is refused
//!   with 503 rather than passed on to the API server. A token that was authenticated before
//!   (its cached answer expired since) may still start one of [`RESERVED_FOR_KNOWN_TOKENS`]
//!   more: bogus tokens that keep every slot busy cannot lock Prometheus out when its entry
//!   comes up for review.
//!
//! Each review is retried on transient errors with the reference's webhook backoff (500 ms,
//! ×1.5, 20 % jitter, 5 attempts) within [`REVIEW_TIMEOUT`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use lru::LruCache;
use parking_lot::Mutex;
use ring::hmac;
use tokio::time::Instant;

use crate::Error;

/// How long a TokenReview's answer is reused, authenticated or not: controller-runtime's
/// `CacheTTL` (1 min, for success and failure alike). A revoked token is refused within this.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);
/// How long an allowing SubjectAccessReview is reused: controller-runtime's `AllowCacheTTL`.
pub const ALLOWED_CACHE_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a denying SubjectAccessReview is reused: controller-runtime's `DenyCacheTTL`,
/// short so that a scraper granted access starts being let in quickly.
pub const DENIED_CACHE_TTL: Duration = Duration::from_secs(30);
/// The time limit of one review, retries included: controller-runtime's
/// `TokenAccessReviewTimeout` (it sets none for access reviews; we use the same). Prometheus'
/// default scrape timeout is also 10 s, so waiting longer would serve nobody.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// Authenticated tokens remembered. Only holders of credentials the API server accepts can
/// fill this, and scrapers are few: 1,024 leaves room for token rotation and many replicas.
pub const AUTHENTICATED_TOKENS: NonZeroUsize = nonzero(1024);
/// Rejected tokens remembered (a misconfigured scraper retrying with a stale token is answered
/// without asking the API server again). Anyone can fill this one, hence a separate cache; each
/// entry is a 32-byte key and a short reason.
pub const REJECTED_TOKENS: NonZeroUsize = nonzero(4096);
/// Access decisions remembered, keyed by subject, path and verb (the reference keeps 8,192;
/// only authenticated subjects reach this cache, and they are few).
pub const DECISIONS: NonZeroUsize = nonzero(1024);
/// Distinct reviews under way at once. Beyond this a request that the caches cannot answer is
/// refused (503) instead of adding load to the API server: a client sending many bogus tokens
/// at once cannot turn the EPP into an amplifier, while cached scrapers are still answered.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 64;
/// Reviews beyond [`MAX_REVIEWS_IN_FLIGHT`] that only tokens authenticated before may start.
pub const RESERVED_FOR_KNOWN_TOKENS: usize = 8;
/// Reviews a second that tokens never authenticated before may start, on average, and how
/// many at once after a quiet spell ([`NEW_TOKEN_REVIEW_BURST`]); past it a request the caches
/// cannot answer is refused (503). The in-flight cap bounds reviews at once, not a rate: an
/// unauthenticated client reconnecting with fresh tokens could otherwise have the EPP send
/// the API server thousands of TokenReviews a second under its own ServiceAccount, in the
/// flow its lease renewals share. The reference's client is held to client-go's 20 a second.
pub const NEW_TOKEN_REVIEWS_PER_SECOND: u32 = 20;
/// See [`NEW_TOKEN_REVIEWS_PER_SECOND`].
pub const NEW_TOKEN_REVIEW_BURST: u32 = 40;
/// Longer bearer tokens are refused without review. Real ones (service-account JWTs, OIDC ID
/// tokens) are a few KiB; this only stops us relaying junk to the API server.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// The reference's webhook retry backoff (k8s.io/apiserver's `DefaultAuthWebhookRetryBackoff`,
/// copied into controller-runtime's filters): 500 ms, ×1.5, +0–20 % jitter, 5 attempts.
const RETRY_ATTEMPTS: u32 = 5;
const RETRY_INITIAL_DELAY: Duration = Duration::from_millis(500);
const RETRY_FACTOR: f64 = 1.5;
const RETRY_JITTER: f64 = 0.2;

/// Groups and users of the Kubernetes authenticator that matter here.
const ALL_AUTHENTICATED: &str = "system:authenticated";
const ALL_UNAUTHENTICATED: &str = "system:unauthenticated";
const ANONYMOUS: &str = "system:anonymous";

const fn nonzero(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        // Only ever evaluated in constants: a zero is a compile error, not a runtime panic.
        None => panic!("cache capacity must not be zero"),
    }
}

/// Cache lifetimes and bounds of a [`MetricsAuthorizer`]. The [`Default`] is the reference's
/// TTLs and this module's bounds (the constants above); tests shrink them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizerConfig {
    /// See [`TOKEN_CACHE_TTL`].
    pub token_ttl: Duration,
    /// See [`ALLOWED_CACHE_TTL`].
    pub allowed_ttl: Duration,
    /// See [`DENIED_CACHE_TTL`].
    pub denied_ttl: Duration,
    /// See [`REVIEW_TIMEOUT`].
    pub review_timeout: Duration,
    /// See [`AUTHENTICATED_TOKENS`].
    pub authenticated_tokens: NonZeroUsize,
    /// See [`REJECTED_TOKENS`].
    pub rejected_tokens: NonZeroUsize,
    /// See [`DECISIONS`].
    pub decisions: NonZeroUsize,
    /// See [`MAX_REVIEWS_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// See [`NEW_TOKEN_REVIEWS_PER_SECOND`].
    pub new_token_reviews_per_second: u32,
    /// See [`NEW_TOKEN_REVIEW_BURST`].
    pub new_token_review_burst: u32,
}

impl Default for AuthorizerConfig {
    fn default() -> Self {
        Self {
            token_ttl: TOKEN_CACHE_TTL,
            allowed_ttl: ALLOWED_CACHE_TTL,
            denied_ttl: DENIED_CACHE_TTL,
            review_timeout: REVIEW_TIMEOUT,
            authenticated_tokens: AUTHENTICATED_TOKENS,
            rejected_tokens: REJECTED_TOKENS,
            decisions: DECISIONS,
            max_in_flight: MAX_REVIEWS_IN_FLIGHT,
            new_token_reviews_per_second: NEW_TOKEN_REVIEWS_PER_SECOND,
            new_token_review_burst: NEW_TOKEN_REVIEW_BURST,
        }
    }
}

/// Who a TokenReview said the token belongs to: what the SubjectAccessReview is asked about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Subject {
    /// The user name, e.g. `system:serviceaccount:monitoring:prometheus-k8s`.
    pub username: String,
    /// The user's UID (empty when the authenticator gives none).
    pub uid: String,
    /// The user's groups, `system:authenticated` included.
    pub groups: Vec<String>,
    /// Extra attributes of the authenticator (e.g. the pod a service-account token is bound to).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Subject {
    /// The reviewed user, with `system:authenticated` added to its groups as the reference's
    /// authenticator chain does (`AuthenticatedGroupAdder`), so that RBAC bindings to that group
    /// work the same with either EPP.
    fn reviewed(user: UserInfo) -> Self {
        let username = user.username.unwrap_or_default();
        let mut groups = user.groups.unwrap_or_default();
        let marked = groups
            .iter()
            .any(|g| g == ALL_AUTHENTICATED || g == ALL_UNAUTHENTICATED);
        if username != ANONYMOUS && !marked {
            groups.push(ALL_AUTHENTICATED.to_owned());
        }
        Self {
            username,
            uid: user.uid.unwrap_or_default(),
            groups,
            extra: user.extra.unwrap_or_default(),
        }
    }
}

/// The outcome of [`MetricsAuthorizer::authorize`].
#[derive(Debug, Clone)]
pub enum Decision {
    /// The subject may do this: serve the request.
    Allowed {
        /// Who asked.
        subject: Arc<Subject>,
    },
    /// No usable bearer token, or the TokenReview did not authenticate it (401).
    Unauthenticated {
        /// Why, for the log (the client is only told "Unauthorized").
        reason: String,
    },
    /// Authenticated, but the SubjectAccessReview did not allow the path and verb (403).
    Forbidden {
        /// Who asked.
        subject: Arc<Subject>,
        /// The API server's reason, for the log.
        reason: String,
    },
    /// No decision could be had (500; 503 when refused for load, see [`Decision::status`]).
    Failed {
        /// Who asked, when the failure was in the access review.
        subject: Option<Arc<Subject>>,
        /// What failed.
        error: Arc<Error>,
    },
}

impl Decision {
    /// Whether the request may be served.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }

    /// The HTTP status to answer: 200 when allowed, else 401, 403, or 500 when the API server
    /// could not answer — 500 because the reference answers that, and because the commonest
    /// cause is the EPP's own RBAC lacking `create` on the reviews, a fault of configuration
    /// that a 503 ("try later") would misreport. 503 only when we shed the review ourselves
    /// ([`MAX_REVIEWS_IN_FLIGHT`], [`NEW_TOKEN_REVIEWS_PER_SECOND`]): there, trying later is
    /// the right advice.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Allowed { .. } => StatusCode::OK,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::Failed { error, .. } if error.is_shed() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body of a refusal, worded as the reference's (reasons and errors are for the log,
    /// not the client). Empty when allowed.
    pub fn message(&self) -> String {
        match self {
            Self::Allowed { .. } => String::new(),
            Self::Unauthenticated { .. } => "Unauthorized".to_owned(),
            Self::Forbidden { subject, .. } => {
                format!("Authorization denied for user {}", subject.username)
            }
            Self::Failed { error, .. } if error.is_shed() => {
                "Too many authentication reviews in flight".to_owned()
            }
            Self::Failed {
                subject: Some(subject),
                ..
            } => format!("Authorization for user {} failed", subject.username),
            Self::Failed { subject: None, .. } => "Authentication failed".to_owned(),
        }
    }

    fn unauthenticated(reason: &str) -> Self {
        Self::Unauthenticated {
            reason: reason.to_owned(),
        }
    }

    fn of(subject: Arc<Subject>, access: Access) -> Self {
        match access {
            Access::Allowed => Self::Allowed { subject },
            Access::Denied(reason) => Self::Forbidden { subject, reason },
        }
    }
}

/// The token of an `Authorization` header value, as the reference's bearer-token
/// authenticator reads it: surrounding whitespace trimmed, a case-insensitive `Bearer` scheme,
/// one space, a non-empty token (anything after a further space is ignored). `None` for no
/// header or another scheme, which [`MetricsAuthorizer::authorize`] answers with 401 (pass `""`).
pub fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    let mut parts = authorization?.trim().splitn(3, ' ');
    let scheme = parts.next()?;
    let token = parts.next()?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Decides whether a bearer token may read one of the EPP's HTTP endpoints, by TokenReview
/// and SubjectAccessReview, with bounded caches (see the [module](self) docs). Cheap to clone:
/// clones share the caches.
#[derive(Clone)]
pub struct MetricsAuthorizer {
    inner: Arc<Inner>,
}

impl fmt::Debug for MetricsAuthorizer {
    // Counts only: nothing about tokens or subjects belongs in a debug print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.lock();
        f.debug_struct("MetricsAuthorizer")
            .field("config", &self.inner.config)
            .field("authenticated_tokens", &state.authenticated.len())
            .field("rejected_tokens", &state.rejected.len())
            .field("decisions", &state.decisions.len())
            .field("in_flight", &state.in_flight.len())
            .finish()
    }
}

impl MetricsAuthorizer {
    /// An authorizer asking the API server behind `client`, with the default
    /// [`AuthorizerConfig`].
    pub fn new(client: Client) -> Self {
        Self::with_config(client, AuthorizerConfig::default())
    }

    /// An authorizer with explicit cache lifetimes and bounds.
    pub fn with_config(client: Client, config: AuthorizerConfig) -> Self {
        // A fresh random key per authorizer: cache keys mean nothing outside this process.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &rand::random::<[u8; 32]>());
        let state = State {
            authenticated: LruCache::new(config.authenticated_tokens),
            known: LruCache::new(config.authenticated_tokens),
            rejected: LruCache::new(config.rejected_tokens),
            decisions: LruCache::new(config.decisions),
            in_flight: HashMap::new(),
            new_token_reviews: ReviewBucket {
                left: f64::from(config.new_token_review_burst),
                at: Instant::now(),
            },
        };
        Self {
            inner: Arc::new(Inner {
                tokens: Api::all(client.clone()),
                access: Api::all(client),
                key,
                config,
                state: Mutex::new(state),
            }),
        }
    }

    /// Whether the holder of `token` may `verb` `path`.
    ///
    /// * `token`: the bearer token (see [`bearer_token`]); empty means none was sent (401,
    ///   no review).
    /// * `path`: the request's path without the query (`/metrics`, `/debug/pool`), as the
    ///   reference passes `req.URL.Path`; RBAC matches it against `nonResourceURLs`.
    /// * `verb`: the HTTP method; lower-cased here (`GET` → `get`), as the reference does.
    ///
    /// Answers from the caches when it can, without an await point that waits on anything;
    /// otherwise joins or starts the review. The review runs in its own task, so a client that
    /// goes away mid-review neither cancels it for others nor loses its result for the cache.
    pub async fn authorize(&self, token: &str, path: &str, verb: &str) -> Decision {
        if token.is_empty() {
            return Decision::unauthenticated("no bearer token");
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Decision::unauthenticated("bearer token too long");
        }
        let flight = FlightKey {
            token: self.inner.token_key(token),
            path: path.to_owned(),
            verb: verb.to_ascii_lowercase(),
        };
        let pending = {
            let mut state = self.inner.state.lock();
            if let Some(decision) = state.cached(&flight, Instant::now()) {
                return decision;
            }
            if let Some(pending) = state.in_flight.get(&flight) {
                pending.clone()
            } else if state.in_flight.len()
                >= self.inner.config.max_in_flight
                    + if state.known.contains(&flight.token) {
                        RESERVED_FOR_KNOWN_TOKENS
                    } else {
                        0
                    }
            {
                tracing::debug!(
                    in_flight = state.in_flight.len(),
                    "metrics endpoint auth: too many reviews under way, refusing"
                );
                return Decision::Failed {
                    subject: None,
                    error: Arc::new(Error::ReviewsBusy {
                        in_flight: state.in_flight.len(),
                    }),
                };
            } else if !state.known.contains(&flight.token)
                && !state
                    .new_token_reviews
                    .take(&self.inner.config, Instant::now())
            {
                tracing::debug!("metrics endpoint auth: reviews of new tokens over their rate");
                return Decision::Failed {
                    subject: None,
                    error: Arc::new(Error::ReviewsThrottled {
                        per_second: self.inner.config.new_token_reviews_per_second,
                    }),
                };
            } else {
                // Spawned while the lock is held, so the task cannot finish (and remove its
                // entry) before the entry is in the map.
                let pending = Inner::start(&self.inner, flight.clone(), token.to_owned());
                state.in_flight.insert(flight, pending.clone());
                pending
            }
        };
        pending.await
    }

    /// Entries in the (authenticated, rejected, decision) caches and reviews under way.
    #[cfg(test)]
    pub(crate) fn sizes(&self) -> (usize, usize, usize, usize) {
        let state = self.inner.state.lock();
        (
            state.authenticated.len(),
            state.rejected.len(),
            state.decisions.len(),
            state.in_flight.len(),
        )
    }
}

/// A review under way, shared by every request waiting for the same answer.
type Pending = Shared<BoxFuture<'static, Decision>>;

struct Inner {
    tokens: Api<TokenReview>,
    access: Api<SubjectAccessReview>,
    key: hmac::Key,
    config: AuthorizerConfig,
    state: Mutex<State>,
}

/// The HMAC of a token: what the caches hold instead of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TokenKey([u8; 32]);

/// Requests that can share one review: same token, path and verb.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    token: TokenKey,
    path: String,
    verb: String,
}

/// What a SubjectAccessReview is about; its answer holds for any token of the same subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    subject: Arc<Subject>,
    path: String,
    verb: String,
}

/// A SubjectAccessReview's answer.
#[derive(Debug, Clone)]
enum Access {
    Allowed,
    Denied(String),
}

/// A TokenReview's answer.
enum Authentication {
    Authenticated(Arc<Subject>),
    Rejected(String),
}

struct Expiring<V> {
    value: V,
    expires: Instant,
}

struct State {
    authenticated: LruCache<TokenKey, Expiring<Arc<Subject>>>,
    /// Tokens authenticated before, whether or not their answer is still fresh (as many as
    /// `authenticated` holds): they keep a few review slots of their own.
    known: LruCache<TokenKey, ()>,
    rejected: LruCache<TokenKey, Expiring<String>>,
    decisions: LruCache<DecisionKey, Expiring<Access>>,
    in_flight: HashMap<FlightKey, Pending>,
    new_token_reviews: ReviewBucket,
}

/// A token bucket of reviews for tokens not authenticated before
/// ([`NEW_TOKEN_REVIEWS_PER_SECOND`]).
struct ReviewBucket {
    left: f64,
    at: Instant,
}

impl ReviewBucket {
    /// Takes one review if the bucket holds one, refilled for the time since it was last
    /// looked at.
    fn take(&mut self, config: &AuthorizerConfig, now: Instant) -> bool {
        let burst = f64::from(config.new_token_review_burst);
        let refill = now.saturating_duration_since(self.at).as_secs_f64()
            * f64::from(config.new_token_reviews_per_second);
        self.left = (self.left + refill).min(burst);
        self.at = now;
        if self.left >= 1.0 {
            self.left -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The value under `key` if it has not expired; an expired one is dropped on the way.
fn fresh<K, V>(cache: &mut LruCache<K, Expiring<V>>, key: &K, now: Instant) -> Option<V>
where
    K: std::hash::Hash + Eq,
    V: Clone,
{
    let expired = match cache.get(key) {
        Some(entry) if entry.expires > now => return Some(entry.value.clone()),
        Some(_) => true,
        None => false,
    };
    if expired {
        cache.pop(key);
    }
    None
}

impl State {
    /// The cached TokenReview answer for a token.
    fn subject(&mut self, token: &TokenKey, now: Instant) -> Option<Result<Arc<Subject>, String>> {
        if let Some(reason) = fresh(&mut self.rejected, token, now) {
            return Some(Err(reason));
        }
        fresh(&mut self.authenticated, token, now).map(Ok)
    }

    /// The whole decision, when both reviews are cached.
    fn cached(&mut self, flight: &FlightKey, now: Instant) -> Option<Decision> {
        let subject = match self.subject(&flight.token, now)? {
            Ok(subject) => subject,
            Err(reason) => return Some(Decision::Unauthenticated { reason }),
        };
        let key = DecisionKey {
            subject,
            path: flight.path.clone(),
            verb: flight.verb.clone(),
        };
        let access = fresh(&mut self.decisions, &key, now)?;
        Some(Decision::of(key.subject, access))
    }
}

/// Removes a review from the in-flight map when its task ends, however it ends (a panic
/// included), so the map only ever holds live reviews.
struct Landing {
    inner: Arc<Inner>,
    flight: FlightKey,
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.inner.state.lock().in_flight.remove(&self.flight);
    }
}

impl Inner {
    fn token_key(&self, token: &str) -> TokenKey {
        let tag = hmac::sign(&self.key, token.as_bytes());
        let mut key = [0u8; 32];
        // HMAC-SHA256 tags are 32 bytes; zip rather than copy_from_slice, which could panic.
        for (k, b) in key.iter_mut().zip(tag.as_ref()) {
            *k = *b;
        }
        TokenKey(key)
    }

    /// Starts the review of `flight` in its own task and returns its shared outcome.
    fn start(this: &Arc<Self>, flight: FlightKey, token: String) -> Pending {
        let inner = Arc::clone(this);
        let task = tokio::spawn(async move {
            let landing = Landing {
                inner: Arc::clone(&inner),
                flight,
            };
            // The caches are filled inside `review`, before `landing` drops: a request
            // arriving in between finds either the flight or the cached answer.
            inner.review(&landing.flight, token).await
        });
        async move {
            task.await.unwrap_or_else(|e| Decision::Failed {
                subject: None,
                error: Arc::new(Error::ReviewTask(e)),
            })
        }
        .boxed()
        .shared()
    }

    /// Both reviews as needed, caching their answers.
    async fn review(&self, flight: &FlightKey, token: String) -> Decision {
        let cached = self.state.lock().subject(&flight.token, Instant::now());
        let subject = match cached {
            Some(Ok(subject)) => subject,
            Some(Err(reason)) => return Decision::Unauthenticated { reason },
            None => match self.authenticate(token).await {
                Ok(Authentication::Authenticated(subject)) => {
                    let expires = Instant::now() + self.config.token_ttl;
                    let mut state = self.state.lock();
                    state.rejected.pop(&flight.token);
                    state.known.put(flight.token, ());
                    state.authenticated.put(
                        flight.token,
                        Expiring {
                            value: Arc::clone(&subject),
                            expires,
                        },
                    );
                    subject
                }
                Ok(Authentication::Rejected(reason)) => {
                    tracing::debug!(%reason, "metrics endpoint auth: token not authenticated");
                    let expires = Instant::now() + self.config.token_ttl;
                    let mut state = self.state.lock();
                    state.authenticated.pop(&flight.token);
                    state.known.pop(&flight.token);
                    state.rejected.put(
                        flight.token,
                        Expiring {
                            value: reason.clone(),
                            expires,
                        },
                    );
                    return Decision::Unauthenticated { reason };
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint auth: authentication failed");
                    return Decision::Failed {
                        subject: None,
                        error: Arc::new(error),
                    };
                }
            },
        };

        let key = DecisionKey {
            subject,
            path: flight.path.clone(),
            verb: flight.verb.clone(),
        };
        let cached = fresh(&mut self.state.lock().decisions, &key, Instant::now());
        let access = match cached {
            Some(access) => access,
            None => match self.check_access(&key).await {
                Ok(access) => {
                    let ttl = match access {
                        Access::Allowed => self.config.allowed_ttl,
                        Access::Denied(_) => self.config.denied_ttl,
                    };
                    let entry = Expiring {
                        value: access.clone(),
                        expires: Instant::now() + ttl,
                    };
                    self.state.lock().decisions.put(key.clone(), entry);
                    access
                }
                Err(error) => {
                    tracing::warn!(
                        %error, user = %key.subject.username,
                        "metrics endpoint auth: authorization failed"
                    );
                    return Decision::Failed {
                        subject: Some(key.subject),
                        error: Arc::new(error),
                    };
                }
            },
        };
        if let Access::Denied(reason) = &access {
            tracing::debug!(
                user = %key.subject.username, path = %key.path, verb = %key.verb, %reason,
                "metrics endpoint auth: access denied"
            );
        }
        Decision::of(key.subject, access)
    }

    /// One TokenReview (with retries).
    async fn authenticate(&self, token: String) -> Result<Authentication, Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                // None, as the reference configures no API audiences: the API server checks
                // the token against its own audiences.
                audiences: None,
            },
            ..TokenReview::default()
        };
        let post = PostParams::default();
        let answer = self
            .call("TokenReview", || self.tokens.create(&post, &review))
            .await?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated == Some(true) {
            let subject = Subject::reviewed(status.user.unwrap_or_default());
            Ok(Authentication::Authenticated(Arc::new(subject)))
        } else {
            let reason = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "token not authenticated".to_owned());
            Ok(Authentication::Rejected(reason))
        }
    }

    /// One SubjectAccessReview (with retries).
    async fn check_access(&self, key: &DecisionKey) -> Result<Access, Error> {
        let subject = &key.subject;
        // Empty fields are left out, as Go's `omitempty` does in the reference's request.
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(subject.username.clone()),
                uid: (!subject.uid.is_empty()).then(|| subject.uid.clone()),
                groups: (!subject.groups.is_empty()).then(|| subject.groups.clone()),
                extra: (!subject.extra.is_empty()).then(|| subject.extra.clone()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(key.path.clone()),
                    verb: Some(key.verb.clone()),
                }),
                resource_attributes: None,
            },
            ..SubjectAccessReview::default()
        };
        let post = PostParams::default();
        let answer = self
            .call("SubjectAccessReview", || self.access.create(&post, &review))
            .await?;
        let status = answer.status.unwrap_or_default();
        // An explicit deny wins even if a (misbehaving) authorizer also says allowed.
        if status.allowed && status.denied != Some(true) {
            return Ok(Access::Allowed);
        }
        let reason = [status.reason, status.evaluation_error]
            .into_iter()
            .flatten()
            .find(|r| !r.is_empty())
            .unwrap_or_else(|| "no rule allows it".to_owned());
        Ok(Access::Denied(reason))
    }

    /// Sends a review, retrying transient failures with the reference's backoff, all within
    /// the review timeout.
    async fn call<T, F, Fut>(&self, review: &'static str, mut send: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut last = None;
        let attempts = async {
            let mut delay = RETRY_INITIAL_DELAY;
            let mut attempt = 1;
            loop {
                match send().await {
                    Ok(answer) => return Ok(answer),
                    Err(error) if attempt < RETRY_ATTEMPTS && is_transient(&error) => {
                        tracing::debug!(%error, review, attempt, "metrics endpoint auth: retrying");
                        last = Some(error);
                        tokio::time::sleep(jittered(delay)).await;
                        delay = delay.mul_f64(RETRY_FACTOR);
                        attempt += 1;
                    }
                    Err(error) => return Err(error),
                }
            }
        };
        let outcome = tokio::time::timeout(self.config.review_timeout, attempts).await;
        match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(source)) => Err(Error::Review { review, source }),
            Err(_) => Err(Error::ReviewTimeout {
                review,
                after: self.config.review_timeout,
                last,
            }),
        }
    }
}

/// Failures worth another attempt, as the reference's `DefaultShouldRetry`: the connection
/// failing, and the API server saying it is overloaded or failed internally (429, 5xx) or
/// asking to be retried (`retryAfterSeconds`). A 4xx such as our own RBAC refusing the review
/// will not change on retry.
fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            matches!(status.code, 429 | 500 | 502 | 503 | 504)
                || status
                    .details
                    .as_ref()
                    .is_some_and(|d| d.retry_after_seconds > 0)
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// `delay` plus up to [`RETRY_JITTER`] of it, so that many EPP replicas do not retry in step.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(1.0 + RETRY_JITTER * rand::random::<f64>())
}

#[cfg(test)]
mod tests;
