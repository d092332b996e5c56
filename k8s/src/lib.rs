//! Switchyard's Kubernetes mode.
//!
//! * [`api`] — the `InferencePool`, `InferenceObjective` and `InferenceModelRewrite` types (and
//!   the CRDs generated from them by the `crdgen` binary).
//! * [`index`] — a plain synchronous index of the pool, its pods, objectives and rewrites. It
//!   computes the `PoolSpec` and `Policies` the decision core consumes and publishes them to
//!   the datastore and director; all of its logic is tested without a client.
//! * [`watch`] — thin kube-runtime watchers (with backoff) feeding the index, one task each.
//! * [`lease`] — leader election on a `coordination.k8s.io/v1` Lease, exposed as a
//!   `watch::Receiver<bool>` that the health server folds into readiness.
//! * [`auth`] — `--metrics-endpoint-auth`: bearer tokens of `/metrics` and `/debug/pool`
//!   checked by TokenReview and SubjectAccessReview, with bounded caches.
//!
//! Nothing here runs on the request path: the scheduler only ever reads the datastore's
//! snapshot.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod index;
pub mod lease;
pub mod watch;

#[cfg(test)]
mod fixtures;
#[cfg(any(test, feature = "test-util"))]
pub mod mock;

pub use kube::Client;

/// Longest wait for the next bytes of one API answer. kube sets none, so a list or a watch
/// started on a pooled connection whose server vanished without a reset waited until the
/// kernel gave up on the connection (about 15 minutes), or for ever behind a proxy that
/// acknowledged the request and stalled. Above [`watch::WATCH_TIMEOUT_SECS`] plus slack, so
/// a quiet watch is ended by its server, not cut here.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// A client from the environment: the in-cluster service account, else `$KUBECONFIG` or
/// `~/.kube/config`; reads time out after [`READ_TIMEOUT`].
pub async fn client() -> Result<Client> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| Error::Config(kube::Error::InferConfig(e)))?;
    config.read_timeout = Some(READ_TIMEOUT);
    // Counted from each request's send, not from when its pooled connection went idle (up to
    // 90 s, which would leave a lease renewal or a relist on such a connection seconds).
    config.reset_reader_on_write = true;
    Client::try_from(config).map_err(Error::Config)
}

/// Errors of the Kubernetes layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// No client could be configured (neither in-cluster nor a kubeconfig).
    #[error("kubernetes client configuration: {0}")]
    Config(#[source] kube::Error),
    /// A flag value is unusable.
    #[error("{0}")]
    Invalid(String),
    /// A TokenReview or SubjectAccessReview was refused or failed (retries included).
    #[error("{review} failed: {source}")]
    Review {
        /// `TokenReview` or `SubjectAccessReview`.
        review: &'static str,
        /// The last attempt's error.
        #[source]
        source: kube::Error,
    },
    /// A TokenReview or SubjectAccessReview had no answer within its time limit.
    #[error("{review}: no answer within {after:?}")]
    ReviewTimeout {
        /// `TokenReview` or `SubjectAccessReview`.
        review: &'static str,
        /// The time limit, retries included.
        after: std::time::Duration,
        /// The error of the last failed attempt, if any attempt failed before time ran out.
        #[source]
        last: Option<kube::Error>,
    },
    /// So many reviews were already under way that this one was not started.
    #[error("{in_flight} authentication reviews already under way")]
    ReviewsBusy {
        /// Reviews under way.
        in_flight: usize,
    },
    /// Reviews of tokens not authenticated before were over their rate, so this one was not
    /// started.
    #[error("authentication reviews of new tokens over {per_second} a second")]
    ReviewsThrottled {
        /// The rate allowed.
        per_second: u32,
    },
    /// A review's task ended without an answer (it panicked).
    #[error("authentication review task: {0}")]
    ReviewTask(#[source] tokio::task::JoinError),
}

impl Error {
    /// Whether the EPP shed the review itself (too many under way, or over their rate): the
    /// client should try later.
    pub fn is_shed(&self) -> bool {
        matches!(
            self,
            Self::ReviewsBusy { .. } | Self::ReviewsThrottled { .. }
        )
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    /// In-cluster clients speak TLS: building one must find exactly one rustls crypto provider
    /// (ring, as the rest of the workspace), or it would panic at start-up in a pod.
    #[tokio::test]
    async fn an_https_client_builds() {
        let mut config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        config.accept_invalid_certs = true;
        assert!(kube::Client::try_from(config).is_ok());
    }
}
