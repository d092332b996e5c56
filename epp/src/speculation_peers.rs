//! Speculative entries shared with peer EPPs (`precise-prefix-cache-scorer`'s
//! `speculativePublishEndpoint` and `speculativePeers`; the message is
//! [`endpoint_picker::kv_index::peers`]).
//!
//! [`publish`] binds a PUB socket and sends what the request path queued in the producer's
//! [`PeerOutbox`]; [`subscribe`] dials one peer and makes each of its messages speculative
//! entries in this EPP's index, for the endpoint of the pool at the message's address (an
//! address this EPP does not know is ignored). Both run under the supervisor; both sockets face
//! the network through the KV-event transport's frame guard, which also redials a lost peer.
//! A peer is trusted no further than its caps: a message is decoded with
//! [`decode`]'s bounds, and at most [`MAX_PEER_MESSAGES_PER_SECOND`] of one peer's messages
//! are applied per second (the rest are counted and dropped).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use endpoint_picker::datastore::Datastore;
use endpoint_picker::kv_index::SharedKvIndex;
use endpoint_picker::kv_index::peers::{PeerOutbox, decode, encode};
use kv_events::transport::{FramePub, FrameSub};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kv_events::{KvEventMetrics, PeerOutcome};

/// One peer's messages applied per second, at most: far above what one EPP routes.
pub const MAX_PEER_MESSAGES_PER_SECOND: u32 = 20_000;
/// First wait before dialing a peer again after its socket failed (doubling to 5 s).
const RETRY: Duration = Duration::from_millis(250);

fn count(metrics: &KvEventMetrics, outcome: &'static str, n: u64) {
    if n > 0 {
        metrics
            .peer_messages
            .get_or_create(&PeerOutcome { outcome })
            .inc_by(n);
    }
}

/// Publishes the outbox's messages at `endpoint` until `token` fires. A failed bind ends the
/// task (the supervisor starts it again after its backoff).
pub async fn publish(
    endpoint: String,
    outbox: Arc<PeerOutbox>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    let mut rx = outbox.attach();
    let mut socket = match FramePub::bind(&endpoint).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%endpoint, %error, "speculative peers: cannot bind the publisher");
            return;
        }
    };
    tracing::info!(
        endpoint = socket.endpoint(),
        "speculative peers: publishing"
    );
    // What the request path dropped so far (taken, so that a restart does not count it twice).
    count(
        &metrics,
        "queue_full",
        outbox.dropped.swap(0, Ordering::Relaxed),
    );
    loop {
        let msg = tokio::select! {
            () = token.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        count(
            &metrics,
            "queue_full",
            outbox.dropped.swap(0, Ordering::Relaxed),
        );
        match socket.send(encode(&msg)).await {
            Ok(()) => count(&metrics, "sent", 1),
            Err(error) => {
                count(&metrics, "send_error", 1);
                tracing::debug!(%error, "speculative peers: send failed");
            }
        }
    }
}

/// [`subscribe`] to every peer, until `token` fires.
pub async fn subscribe_all(
    endpoints: Vec<String>,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    let mut peers = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        peers.spawn(subscribe(
            endpoint,
            datastore.clone(),
            index.clone(),
            metrics.clone(),
            token.clone(),
        ));
    }
    while peers.join_next().await.is_some() {}
}

/// Applies peer `endpoint`'s messages to `index` until `token` fires.
pub async fn subscribe(
    endpoint: String,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    let mut retry = RETRY;
    loop {
        let opened = tokio::select! {
            () = token.cancelled() => return,
            s = FrameSub::connect(&endpoint) => s,
        };
        match opened {
            Ok(mut sub) => {
                tracing::info!(%endpoint, "speculative peers: subscribed");
                retry = RETRY;
                let mut window = (Instant::now(), 0u32);
                loop {
                    let frame = tokio::select! {
                        () = token.cancelled() => return,
                        f = sub.recv() => f,
                    };
                    match frame {
                        Ok(Some(frame)) => {
                            let now = Instant::now();
                            if now.duration_since(window.0) >= Duration::from_secs(1) {
                                window = (now, 0);
                            }
                            window.1 += 1;
                            if window.1 > MAX_PEER_MESSAGES_PER_SECOND {
                                count(&metrics, "rate", 1);
                                continue;
                            }
                            apply(&frame, &datastore, &index, &metrics, now);
                        }
                        Ok(None) => count(&metrics, "decode", 1),
                        Err(error) => {
                            tracing::warn!(%endpoint, %error, "speculative peers: peer lost");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%endpoint, %error, "speculative peers: cannot dial");
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

/// One peer message into the index: speculative entries for the endpoint it names.
pub fn apply(
    frame: &[u8],
    datastore: &Datastore,
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    now: Instant,
) {
    let msg = match decode(frame) {
        Ok(m) => m,
        Err(error) => {
            count(metrics, "decode", 1);
            tracing::debug!(%error, "speculative peers: message refused");
            return;
        }
    };
    let Some(id) = datastore.snapshot().by_address(&msg.endpoint).map(|e| e.id) else {
        count(metrics, "unknown_endpoint", 1);
        return;
    };
    index.speculate(id, &msg.keys, now);
    count(metrics, "applied", 1);
}

#[cfg(test)]
mod tests;
