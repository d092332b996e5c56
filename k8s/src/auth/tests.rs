//! The metrics-endpoint authorizer against a mocked API server, on paused time: each test
//! plays the TokenReview and SubjectAccessReview endpoints request by request.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::*;
use crate::fixtures::NS;
use crate::mock::{self, ApiServer, json_body, respond_json};

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus-k8s";

fn start(config: AuthorizerConfig) -> (MetricsAuthorizer, ApiServer) {
    let (client, server) = mock::client(NS);
    (MetricsAuthorizer::with_config(client, config), server)
}

fn prometheus() -> Value {
    json!({
        "username": PROMETHEUS,
        "uid": "0b5c-uid",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:monitoring",
                   "system:authenticated"],
        "extra": {"authentication.kubernetes.io/pod-name": ["prometheus-k8s-0"]},
    })
}

/// Asks in a task of its own, so that the test can play the API server meanwhile.
fn ask(auth: &MetricsAuthorizer, token: &str, path: &str, verb: &str) -> JoinHandle<Decision> {
    let (auth, token, path, verb) = (
        auth.clone(),
        token.to_owned(),
        path.to_owned(),
        verb.to_owned(),
    );
    tokio::spawn(async move { auth.authorize(&token, &path, &verb).await })
}

/// Asks and expects an answer without the API server being asked.
async fn ask_cached(auth: &MetricsAuthorizer, token: &str) -> Decision {
    tokio::time::timeout(
        Duration::from_millis(1),
        auth.authorize(token, "/metrics", "GET"),
    )
    .await
    .expect("answered from the caches, without a review")
}

async fn done(task: JoinHandle<Decision>) -> Decision {
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("no decision in time")
        .unwrap()
}

/// Expects a TokenReview and answers it: authenticated as `user`, or not. Returns the request.
async fn token_review(server: &mut ApiServer, user: Option<Value>) -> Value {
    let (req, send) = server.expect(Method::POST, TOKEN_REVIEWS).await;
    let asked = json_body(req).await;
    let mut answer = asked.clone();
    answer["status"] = match user {
        Some(user) => json!({"authenticated": true, "user": user}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    respond_json(send, StatusCode::CREATED, &answer);
    asked
}

/// Expects a SubjectAccessReview and answers it. Returns the request.
async fn access_review(server: &mut ApiServer, allowed: bool) -> Value {
    let (req, send) = server.expect(Method::POST, ACCESS_REVIEWS).await;
    let asked = json_body(req).await;
    let mut answer = asked.clone();
    answer["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding"})
    } else {
        json!({"allowed": false, "reason": "no RBAC policy matched"})
    };
    respond_json(send, StatusCode::CREATED, &answer);
    asked
}

/// Expects a request of `path` and fails it with `code`.
async fn fail(server: &mut ApiServer, path: &str, code: u16, reason: &str) {
    let (_, send) = server.expect(Method::POST, path).await;
    let status = StatusCode::from_u16(code).unwrap();
    respond_json(send, status, &mock::status(code, reason));
}

/// A token authenticated as Prometheus and allowed: both reviews, answered.
async fn admit(auth: &MetricsAuthorizer, server: &mut ApiServer, token: &str) {
    let task = ask(auth, token, "/metrics", "GET");
    token_review(server, Some(prometheus())).await;
    access_review(server, true).await;
    assert!(done(task).await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn an_authorized_token_is_allowed_and_the_reviews_have_the_reference_shape() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");

    let asked = token_review(&mut server, Some(prometheus())).await;
    assert_eq!(asked["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(asked["kind"], "TokenReview");
    assert_eq!(
        asked["spec"],
        json!({"token": "prom-token"}),
        "no audiences"
    );

    let asked = access_review(&mut server, true).await;
    assert_eq!(asked["apiVersion"], "authorization.k8s.io/v1");
    assert_eq!(asked["kind"], "SubjectAccessReview");
    let user = prometheus();
    assert_eq!(
        asked["spec"],
        json!({
            "user": PROMETHEUS,
            "uid": "0b5c-uid",
            "groups": user["groups"],
            "extra": user["extra"],
            // The request's path, and its method lower-cased: what RBAC's nonResourceURLs match.
            "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
        })
    );

    let decision = done(task).await;
    let Decision::Allowed { subject } = &decision else {
        panic!("{decision:?}");
    };
    assert_eq!(subject.username, PROMETHEUS);
    assert_eq!(decision.status(), StatusCode::OK);
    assert_eq!(decision.message(), "");
    assert_eq!(auth.sizes(), (1, 0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn no_token_is_refused_401_without_asking() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    for token in ["", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
        let decision = auth.authorize(token, "/metrics", "GET").await;
        assert!(
            matches!(decision, Decision::Unauthenticated { .. }),
            "{decision:?}"
        );
        assert_eq!(decision.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(decision.message(), "Unauthorized");
    }
    server.expect_no_request().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_the_api_server_does_not_authenticate_is_refused_401_and_remembered_a_minute() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "stale-token", "/metrics", "GET");
    token_review(&mut server, None).await;
    let decision = done(task).await;
    let Decision::Unauthenticated { reason } = &decision else {
        panic!("{decision:?}");
    };
    assert_eq!(reason, "invalid bearer token");
    assert_eq!(decision.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        auth.sizes(),
        (0, 1, 0, 0),
        "no access review for a stranger"
    );

    // A scraper retrying with the same stale token is answered from the cache...
    tokio::time::advance(TOKEN_CACHE_TTL - Duration::from_secs(1)).await;
    let decision = ask_cached(&auth, "stale-token").await;
    assert_eq!(decision.status(), StatusCode::UNAUTHORIZED);

    // ...until the TTL runs out: the token may have become valid (a new Secret, say).
    tokio::time::advance(Duration::from_secs(2)).await;
    let task = ask(&auth, "stale-token", "/metrics", "GET");
    token_review(&mut server, Some(prometheus())).await;
    access_review(&mut server, true).await;
    assert!(done(task).await.is_allowed());
    assert_eq!(auth.sizes(), (1, 0, 1, 0), "the rejection is forgotten");
}

#[tokio::test(start_paused = true)]
async fn an_authenticated_token_the_access_review_denies_is_refused_403() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/debug/pool", "GET");
    token_review(&mut server, Some(prometheus())).await;
    let asked = access_review(&mut server, false).await;
    assert_eq!(
        asked["spec"]["nonResourceAttributes"],
        json!({"path": "/debug/pool", "verb": "get"})
    );
    let decision = done(task).await;
    let Decision::Forbidden { subject, reason } = &decision else {
        panic!("{decision:?}");
    };
    assert_eq!(subject.username, PROMETHEUS);
    assert_eq!(reason, "no RBAC policy matched");
    assert_eq!(decision.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        decision.message(),
        format!("Authorization denied for user {PROMETHEUS}")
    );
}

#[tokio::test(start_paused = true)]
async fn an_explicit_deny_wins_and_an_empty_status_denies() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    token_review(&mut server, Some(prometheus())).await;
    let (req, send) = server.expect(Method::POST, ACCESS_REVIEWS).await;
    let mut answer = json_body(req).await;
    answer["status"] = json!({"allowed": true, "denied": true});
    respond_json(send, StatusCode::CREATED, &answer);
    assert_eq!(done(task).await.status(), StatusCode::FORBIDDEN);

    let task = ask(&auth, "prom-token", "/debug/pool", "GET");
    let (req, send) = server.expect(Method::POST, ACCESS_REVIEWS).await;
    let answer = json_body(req).await; // echoed without a status
    respond_json(send, StatusCode::CREATED, &answer);
    let decision = done(task).await;
    let Decision::Forbidden { reason, .. } = &decision else {
        panic!("{decision:?}");
    };
    assert_eq!(reason, "no rule allows it");
}

#[tokio::test(start_paused = true)]
async fn answers_are_reused_for_their_ttl_and_asked_again_after() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    admit(&auth, &mut server, "prom-token").await;

    // Within the token TTL neither review is made again.
    tokio::time::advance(TOKEN_CACHE_TTL - Duration::from_secs(1)).await;
    assert!(ask_cached(&auth, "prom-token").await.is_allowed());
    server.expect_no_request().await;

    // Past it the token is reviewed again (it may have been revoked); the access decision,
    // good for five minutes, is not.
    tokio::time::advance(Duration::from_secs(2)).await;
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    token_review(&mut server, Some(prometheus())).await;
    assert!(done(task).await.is_allowed());
    server.expect_no_request().await;

    // Past the allowed TTL both are asked again.
    tokio::time::advance(ALLOWED_CACHE_TTL).await;
    admit(&auth, &mut server, "prom-token").await;
}

#[tokio::test(start_paused = true)]
async fn a_denial_is_reused_for_thirty_seconds_only() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    token_review(&mut server, Some(prometheus())).await;
    access_review(&mut server, false).await;
    assert_eq!(done(task).await.status(), StatusCode::FORBIDDEN);

    tokio::time::advance(DENIED_CACHE_TTL - Duration::from_secs(1)).await;
    assert_eq!(
        ask_cached(&auth, "prom-token").await.status(),
        StatusCode::FORBIDDEN
    );

    // The ClusterRoleBinding was added meanwhile: let in at the next access review, and the
    // token (cached a minute) is not reviewed again.
    tokio::time::advance(Duration::from_secs(2)).await;
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    access_review(&mut server, true).await;
    assert!(done(task).await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn the_access_decision_is_per_subject_path_and_verb() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    admit(&auth, &mut server, "prom-token").await;

    // Another token of the same subject (a rotated projected token): one TokenReview, and the
    // access decision already made for the subject holds.
    let task = ask(&auth, "rotated-token", "/metrics", "get");
    token_review(&mut server, Some(prometheus())).await;
    assert!(done(task).await.is_allowed());

    // Another path, or another verb, is another question.
    let task = ask(&auth, "prom-token", "/debug/pool", "GET");
    access_review(&mut server, false).await;
    assert_eq!(done(task).await.status(), StatusCode::FORBIDDEN);
    let task = ask(&auth, "prom-token", "/metrics", "POST");
    let asked = access_review(&mut server, false).await;
    assert_eq!(asked["spec"]["nonResourceAttributes"]["verb"], "post");
    assert_eq!(done(task).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(auth.sizes(), (2, 0, 3, 0));
}

#[tokio::test(start_paused = true)]
async fn system_authenticated_is_added_to_the_groups_as_the_reference_does() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "oidc-token", "/metrics", "GET");
    token_review(
        &mut server,
        Some(json!({"username": "alice", "groups": ["sre"]})),
    )
    .await;
    let asked = access_review(&mut server, true).await;
    assert_eq!(
        asked["spec"],
        json!({
            "user": "alice",
            "groups": ["sre", "system:authenticated"],
            "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
        }),
        "empty uid and extra are left out"
    );
    assert!(done(task).await.is_allowed());

    // Not for the anonymous user, nor twice.
    let user = UserInfo {
        username: Some("system:anonymous".into()),
        groups: Some(vec!["system:unauthenticated".into()]),
        ..UserInfo::default()
    };
    assert_eq!(
        Subject::reviewed(user).groups,
        vec!["system:unauthenticated"]
    );
    let user = UserInfo {
        username: Some("bob".into()),
        ..UserInfo::default()
    };
    assert_eq!(Subject::reviewed(user).groups, vec!["system:authenticated"]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_review_fails_500_and_is_not_cached() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    // The EPP's own RBAC lacks `create` on tokenreviews: no retry, it would not help.
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    fail(&mut server, TOKEN_REVIEWS, 403, "Forbidden").await;
    let decision = done(task).await;
    let Decision::Failed {
        subject: None,
        error,
    } = &decision
    else {
        panic!("{decision:?}");
    };
    assert!(
        matches!(&**error, Error::Review { review: "TokenReview", source: kube::Error::Api(s) } if s.code == 403),
        "{error:?}"
    );
    assert!(
        std::error::Error::source(&**error).is_some(),
        "keeps its source"
    );
    assert_eq!(decision.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(decision.message(), "Authentication failed");
    server.expect_no_request().await;
    assert_eq!(auth.sizes(), (0, 0, 0, 0), "errors are not cached");

    // The next scrape asks again.
    admit(&auth, &mut server, "prom-token").await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_access_review_fails_500_naming_the_user_and_keeps_the_token_review() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    token_review(&mut server, Some(prometheus())).await;
    fail(&mut server, ACCESS_REVIEWS, 403, "Forbidden").await;
    let decision = done(task).await;
    assert!(
        matches!(
            &decision,
            Decision::Failed {
                subject: Some(_),
                ..
            }
        ),
        "{decision:?}"
    );
    assert_eq!(decision.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        decision.message(),
        format!("Authorization for user {PROMETHEUS} failed")
    );

    // The token review stands; only the access review is made again.
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    access_review(&mut server, true).await;
    assert!(done(task).await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_the_reference_backoff() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    let started = tokio::time::Instant::now();
    fail(&mut server, TOKEN_REVIEWS, 500, "InternalError").await;
    // 500 ms, +0-20 % jitter.
    let (_, send) = server.expect(Method::POST, TOKEN_REVIEWS).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited <= Duration::from_millis(600),
        "{waited:?}"
    );
    // A broken connection (the service errs) is transient too; then 750 ms (+20 %).
    send.send_error("connection reset by peer");
    let again = tokio::time::Instant::now();
    token_review(&mut server, Some(prometheus())).await;
    let waited = again.elapsed();
    assert!(
        waited >= Duration::from_millis(750) && waited <= Duration::from_millis(900),
        "{waited:?}"
    );
    access_review(&mut server, true).await;
    assert!(done(task).await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn retries_stop_after_five_attempts() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    for _ in 0..5 {
        fail(&mut server, TOKEN_REVIEWS, 503, "ServiceUnavailable").await;
    }
    let decision = done(task).await;
    let Decision::Failed { error, .. } = &decision else {
        panic!("{decision:?}");
    };
    assert!(
        matches!(&**error, Error::Review { source: kube::Error::Api(s), .. } if s.code == 503),
        "{error:?}"
    );
    assert_eq!(decision.status(), StatusCode::INTERNAL_SERVER_ERROR);
    server.expect_no_request().await;
}

#[tokio::test(start_paused = true)]
async fn an_api_server_that_does_not_answer_fails_the_review_at_the_timeout() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    let started = tokio::time::Instant::now();
    let (_, held) = server.expect(Method::POST, TOKEN_REVIEWS).await;
    let decision = done(task).await;
    assert_eq!(started.elapsed(), REVIEW_TIMEOUT);
    let Decision::Failed { error, .. } = &decision else {
        panic!("{decision:?}");
    };
    assert!(
        matches!(
            &**error,
            Error::ReviewTimeout {
                review: "TokenReview",
                last: None,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(decision.status(), StatusCode::INTERNAL_SERVER_ERROR);
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_requests_share_one_review() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let tasks: Vec<_> = (0..5)
        .map(|_| ask(&auth, "prom-token", "/metrics", "GET"))
        .collect();
    token_review(&mut server, Some(prometheus())).await;
    access_review(&mut server, true).await;
    for task in tasks {
        assert!(done(task).await.is_allowed());
    }
    server.expect_no_request().await;
    assert_eq!(auth.sizes().3, 0, "nothing left in flight");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_does_not_cancel_the_review() {
    let (auth, mut server) = start(AuthorizerConfig::default());
    let task = ask(&auth, "prom-token", "/metrics", "GET");
    let (req, send) = server.expect(Method::POST, TOKEN_REVIEWS).await;
    task.abort();
    let mut answer = json_body(req).await;
    answer["status"] = json!({"authenticated": true, "user": prometheus()});
    respond_json(send, StatusCode::CREATED, &answer);
    access_review(&mut server, true).await;
    // The review finished in its own task and left its answer for the next scrape.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(auth.sizes(), (1, 0, 1, 0));
    assert!(ask_cached(&auth, "prom-token").await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn reviews_in_flight_are_capped_and_the_excess_refused_503() {
    let config = AuthorizerConfig {
        max_in_flight: 2,
        ..AuthorizerConfig::default()
    };
    let (auth, mut server) = start(config);
    let first = ask(&auth, "bogus-1", "/metrics", "GET");
    let second = ask(&auth, "bogus-2", "/metrics", "GET");
    let (r1, s1) = server.expect(Method::POST, TOKEN_REVIEWS).await;
    let (r2, s2) = server.expect(Method::POST, TOKEN_REVIEWS).await;

    let decision = auth.authorize("bogus-3", "/metrics", "GET").await;
    assert!(
        matches!(&decision, Decision::Failed { error, .. } if matches!(**error, Error::ReviewsBusy { in_flight: 2 })),
        "{decision:?}"
    );
    assert_eq!(decision.status(), StatusCode::SERVICE_UNAVAILABLE);
    server.expect_no_request().await;

    for (req, send) in [(r1, s1), (r2, s2)] {
        let mut answer = json_body(req).await;
        answer["status"] = json!({"authenticated": false});
        respond_json(send, StatusCode::CREATED, &answer);
    }
    for task in [first, second] {
        let decision = done(task).await;
        let Decision::Unauthenticated { reason } = &decision else {
            panic!("{decision:?}");
        };
        assert_eq!(reason, "token not authenticated");
    }
    assert_eq!(auth.sizes().3, 0);
}

/// Bogus tokens hold every review slot when Prometheus' cached answer expires: its token,
/// authenticated before, still gets a review of its own.
#[tokio::test(start_paused = true)]
async fn a_flood_of_bogus_reviews_cannot_lock_out_a_known_scraper() {
    let config = AuthorizerConfig {
        max_in_flight: 1,
        ..AuthorizerConfig::default()
    };
    let ttl = config.token_ttl.max(config.allowed_ttl);
    let (auth, mut server) = start(config);
    admit(&auth, &mut server, "prom-token").await;
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    // The one slot is taken by a bogus token's review; another stranger is refused …
    let bogus = ask(&auth, "bogus-1", "/metrics", "GET");
    let (r1, s1) = server.expect(Method::POST, TOKEN_REVIEWS).await;
    let refused = auth.authorize("bogus-2", "/metrics", "GET").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    // … but the scraper's token is reviewed again, and allowed.
    admit(&auth, &mut server, "prom-token").await;
    let mut answer = json_body(r1).await;
    answer["status"] = json!({"authenticated": false});
    respond_json(s1, StatusCode::CREATED, &answer);
    assert!(!done(bogus).await.is_allowed());
}

/// Review: the in-flight cap bounded reviews at once, not a rate, so a client reconnecting
/// with fresh tokens had the EPP send TokenReviews as fast as the API server answered. New
/// tokens now start at most a bucket's worth; the rest are refused (503) without a review,
/// while a token authenticated before is still reviewed, and the bucket refills with time.
#[tokio::test(start_paused = true)]
async fn reviews_of_new_tokens_are_held_to_a_rate() {
    let config = AuthorizerConfig {
        new_token_reviews_per_second: 2,
        new_token_review_burst: 3,
        ..AuthorizerConfig::default()
    };
    let ttl = config.token_ttl.max(config.allowed_ttl);
    let (auth, mut server) = start(config);
    admit(&auth, &mut server, "prom-token").await;
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    // A full bucket: three strangers are reviewed …
    for i in 0..3 {
        let task = ask(&auth, &format!("bogus-{i}"), "/metrics", "GET");
        token_review(&mut server, None).await;
        assert_eq!(done(task).await.status(), StatusCode::UNAUTHORIZED);
    }
    // … the fourth is refused without one …
    let refused = auth.authorize("bogus-3", "/metrics", "GET").await;
    assert!(
        matches!(&refused, Decision::Failed { error, .. } if matches!(**error, Error::ReviewsThrottled { per_second: 2 })),
        "{refused:?}"
    );
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    server.expect_no_request().await;
    // … the scraper's token, known, is reviewed again …
    admit(&auth, &mut server, "prom-token").await;
    // … and half a second later (two a second) a stranger is reviewed again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let task = ask(&auth, "bogus-4", "/metrics", "GET");
    token_review(&mut server, None).await;
    assert_eq!(done(task).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(start_paused = true)]
async fn the_caches_stay_bounded_and_a_flood_of_bogus_tokens_cannot_evict_the_scraper() {
    let config = AuthorizerConfig {
        authenticated_tokens: NonZeroUsize::new(2).unwrap(),
        rejected_tokens: NonZeroUsize::new(4).unwrap(),
        // The flood here is of the caches, not the review rate.
        new_token_review_burst: 100,
        ..AuthorizerConfig::default()
    };
    let (auth, mut server) = start(config);
    admit(&auth, &mut server, "prom-token").await;

    for i in 0..50 {
        let task = ask(&auth, &format!("bogus-{i}"), "/metrics", "GET");
        token_review(&mut server, None).await;
        assert_eq!(done(task).await.status(), StatusCode::UNAUTHORIZED);
        assert!(auth.sizes().1 <= 4);
    }
    assert_eq!(auth.sizes(), (1, 4, 1, 0));
    assert!(ask_cached(&auth, "prom-token").await.is_allowed());

    // Authenticated tokens are bounded too (least recently used out first).
    for i in 0..3 {
        let task = ask(&auth, &format!("rotated-{i}"), "/metrics", "GET");
        token_review(&mut server, Some(prometheus())).await;
        assert!(done(task).await.is_allowed());
    }
    assert_eq!(auth.sizes(), (2, 4, 1, 0));
}

#[tokio::test]
async fn tokens_are_kept_as_keyed_hashes() {
    let (client, _server) = mock::client(NS);
    let (a, b) = (
        MetricsAuthorizer::new(client.clone()),
        MetricsAuthorizer::new(client),
    );
    let key = a.inner.token_key("secret-token");
    assert_eq!(key, a.inner.token_key("secret-token"));
    assert_ne!(key, a.inner.token_key("secret-tokem"));
    assert_ne!(
        key,
        b.inner.token_key("secret-token"),
        "a key per authorizer"
    );
    assert!(!format!("{a:?}").contains("secret"));
}

#[test]
fn bearer_tokens_are_read_as_the_reference_reads_them() {
    for (header, token) in [
        (None, None),
        (Some("Bearer abc"), Some("abc")),
        (Some("bearer abc"), Some("abc")),
        (Some("BEARER abc"), Some("abc")),
        (Some("  Bearer abc \t"), Some("abc")),
        (Some("Bearer abc def"), Some("abc")),
        (Some("Bearer  abc"), None),
        (Some("Bearer"), None),
        (Some("Bearer "), None),
        (Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l"), None),
        (Some(""), None),
    ] {
        assert_eq!(bearer_token(header), token, "{header:?}");
    }
}
