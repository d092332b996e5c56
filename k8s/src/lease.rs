//! Leader election on a `coordination.k8s.io/v1` Lease, in the manner of client-go's
//! `leaderelection` (which the reference EPP uses through controller-runtime).
//!
//! Every replica runs discovery and keeps a warm index; only the leader reports ready, so the
//! EPP Service routes to exactly one replica (active-passive, as the reference). The outcome
//! is a [`watch::Receiver<bool>`] that the health server folds into readiness.
//!
//! * **Acquire**: every [`LeaseConfig::retry_period`] a candidate reads the Lease. It takes it
//!   when the Lease does not exist (create), has no holder, or has not changed for a whole
//!   [`LeaseConfig::lease_duration`] *as observed locally* — expiry is judged on our own clock
//!   from when we last saw the record change, never by comparing our clock with the holder's
//!   `renewTime`, so clock skew between nodes cannot cause two leaders.
//! * **Renew**: the leader rewrites `renewTime` every retry period.
//! * **Optimistic concurrency**: every write is a replace carrying the `resourceVersion` that was
//!   read; a `409 Conflict` means someone else wrote first, and we lost that round.
//! * **Loss**: seeing another holder ends leadership at once, and for good: the task ends,
//!   and the EPP drains and stops (the reference's exits), so that the gateways' connections,
//!   which readiness does not move, reconnect to the new leader. Failing to renew for
//!   [`LeaseConfig::renew_deadline`] ends leadership too (before the lease can expire for the
//!   others, because the deadline is shorter than the duration) but only drops readiness: the
//!   API server may just be out of reach, and the lease can come back.
//! * **Release**: on shutdown the leader clears the holder so that a standby takes over without
//!   waiting for expiry (`LeaderElectionReleaseOnCancel`).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Lease timings and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Lease name (see [`lease_name`]).
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal (controller-runtime default 15 s).
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up (default 10 s).
    pub renew_deadline: Duration,
    /// Interval between attempts (default 2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The controller-runtime defaults: 15 s / 10 s / 2 s.
    pub fn new(name: String, identity: String) -> Self {
        Self {
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The reference EPP's lease name for a pool.
pub fn lease_name(pool_namespace: &str, pool_name: &str) -> String {
    format!("epp-{pool_namespace}-{pool_name}.gateway-api-inference-extension.sigs.k8s.io")
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// We hold the lease (acquired or renewed).
    Held,
    /// Someone else holds a live lease.
    HeldByAnother,
    /// Someone else won a write race (a 409): this round is lost.
    Lost,
    /// The API server could not be reached or refused; leadership is unchanged until the
    /// renew deadline says otherwise.
    Failed,
}

/// One candidate's state.
struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last record seen (its resourceVersion) and when we first saw it.
    observed: Option<(String, Instant)>,
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Elector {
    fn duration_secs(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    async fn try_acquire_or_renew(&mut self) -> Attempt {
        let name = self.config.name.clone();
        let current = match self.api.get(&name).await {
            Ok(lease) => lease,
            Err(e) if is_not_found(&e) => return self.create().await,
            Err(error) => {
                tracing::warn!(%error, lease = %name, "reading the lease failed");
                return Attempt::Failed;
            }
        };
        let now = Instant::now();
        let rv = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                self.observed = Some((rv, now));
                now
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.config.identity;
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.config.lease_duration);
        let expired = now.saturating_duration_since(observed_at) >= duration;
        if !ours && !holder.is_empty() && !expired {
            return Attempt::HeldByAnother;
        }
        let stamp = now_micro();
        let spec = LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.duration_secs()),
            renew_time: Some(stamp.clone()),
            acquire_time: if ours { spec.acquire_time } else { Some(stamp) },
            lease_transitions: if ours {
                spec.lease_transitions
            } else {
                Some(spec.lease_transitions.unwrap_or(0).saturating_add(1))
            },
            ..spec
        };
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(spec),
        };
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                if !ours {
                    tracing::info!(lease = %name, previous = %holder, "acquired the lease");
                }
                self.observed = written
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Attempt::Held
            }
            Err(e) if is_conflict(&e) => Attempt::Lost,
            Err(error) => {
                tracing::warn!(%error, lease = %name, "writing the lease failed");
                Attempt::Failed
            }
        }
    }

    async fn create(&mut self) -> Attempt {
        let stamp = now_micro();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(self.duration_secs()),
                acquire_time: Some(stamp.clone()),
                renew_time: Some(stamp),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(written) => {
                tracing::info!(lease = %self.config.name, "created and acquired the lease");
                self.observed = written
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Attempt::Held
            }
            Err(e) if is_conflict(&e) => Attempt::Lost,
            Err(error) => {
                tracing::warn!(%error, lease = %self.config.name, "creating the lease failed");
                Attempt::Failed
            }
        }
    }

    /// Gives the lease up so that a standby need not wait for it to expire.
    async fn release(&mut self) {
        let name = self.config.name.clone();
        let Ok(current) = self.api.get(&name).await else {
            return;
        };
        let mut spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(spec),
        };
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %name, "released the lease"),
            Err(error) => tracing::warn!(%error, lease = %name, "releasing the lease failed"),
        }
    }
}

/// [`spawn`] on the Leases of `namespace`.
pub fn start(
    client: kube::Client,
    namespace: &str,
    config: LeaseConfig,
    shutdown: CancellationToken,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    spawn(Api::namespaced(client, namespace), config, shutdown)
}

/// Runs leader election until `shutdown`; the receiver is `true` while this replica leads.
pub fn spawn(
    api: Api<Lease>,
    config: LeaseConfig,
    shutdown: CancellationToken,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let span = tracing::info_span!("lease", name = %config.name, identity = %config.identity);
    let task = tokio::spawn(run(api, config, tx, shutdown).instrument(span));
    (rx, task)
}

async fn run(
    api: Api<Lease>,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let retry = config.retry_period;
    let renew_deadline = config.renew_deadline;
    let mut elector = Elector {
        api,
        config,
        observed: None,
    };
    // When we last held the lease for sure (as leader).
    let mut last_renewed: Option<Instant> = None;
    // Whether this replica ever led: one that did may still route on the gateways' open
    // connections, unready or not, so another holder must stop it.
    let mut led = false;
    loop {
        let was_leader = *leader.borrow();
        // A hung API call must not keep a leader "ready" past its renew deadline: the leader's
        // attempt gets only the time left until the deadline.
        let budget = match last_renewed {
            Some(at) if was_leader => renew_deadline.saturating_sub(at.elapsed()),
            _ => renew_deadline,
        };
        // A renewal counts from when it was sent, not answered: the write may have been
        // committed (and seen by a standby, which counts the lease's duration from then) long
        // before a delayed answer arrives, and the leader must not think itself valid longer
        // than the others measure.
        let sent = Instant::now();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = tokio::time::timeout(budget, elector.try_acquire_or_renew()) => {
                a.unwrap_or(Attempt::Failed)
            }
        };
        match attempt {
            Attempt::Held => {
                led = true;
                last_renewed = Some(sent);
                if !was_leader {
                    leader.send_replace(true);
                }
            }
            Attempt::HeldByAnother if led => {
                // Another replica leads now. This one led (it may have turned unready at its
                // renew deadline already, before the other could take the lease, and still
                // serve the gateways' open connections): it stops for good. Its task ends,
                // and the EPP with it (drained), as the reference's exits, so that those
                // connections move to the new leader.
                tracing::warn!("the lease is held by another replica; stopping");
                leader.send_replace(false);
                return;
            }
            Attempt::Lost | Attempt::HeldByAnother => {
                last_renewed = None;
                if was_leader {
                    tracing::warn!("lost the lease to another replica; no longer ready");
                    leader.send_replace(false);
                }
            }
            Attempt::Failed => {
                let overdue = last_renewed.is_none_or(|at| at.elapsed() >= renew_deadline);
                if was_leader && overdue {
                    tracing::warn!(deadline = ?renew_deadline, "could not renew the lease in time; no longer ready");
                    leader.send_replace(false);
                    last_renewed = None;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(retry) => {}
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        elector.release().await;
    }
}

#[cfg(test)]
mod tests;
