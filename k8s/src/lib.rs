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
//!
//! Nothing here runs on the request path: the scheduler only ever reads the datastore's
//! snapshot.

pub mod api;
pub mod index;
pub mod lease;
pub mod watch;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod mock;

pub use kube::Client;

/// A client from the environment: the in-cluster service account, else `$KUBECONFIG` or
/// `~/.kube/config`.
pub async fn client() -> Result<Client> {
    Client::try_default().await.map_err(Error::Config)
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
