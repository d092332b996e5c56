//! gRPC health on the health port, with the reference's service names.
//!
//! `liveness` is SERVING while the process answers. `readiness`, `""`,
//! `inference-extension` and `envoy.service.ext_proc.v3.ExternalProcessor` are SERVING once the
//! pool has synced (and, with leader election, only on the leader).
//!
//! The port's connections are bounded ([`bounded_incoming`]), as the admin port's are.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::{PeerCounts, PeerSlot};

/// Services that follow readiness.
pub const READY_SERVICES: [&str; 4] = [
    "",
    "readiness",
    "inference-extension",
    "envoy.service.ext_proc.v3.ExternalProcessor",
];

/// Sets the readiness-following services.
pub async fn set_ready(reporter: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for s in READY_SERVICES {
        reporter.set_service_status(s, status).await;
    }
}

/// Marks liveness SERVING and readiness NOT_SERVING.
pub async fn init(reporter: &HealthReporter) {
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    set_ready(reporter, false).await;
}

/// Connections the health port serves at once. The port is open to the cluster network (the
/// kubelet probes it): without a cap, anyone who reaches it could hold connections, and the
/// file descriptors the ext_proc listener and the scrapers need, for free. Past it the
/// kubelet's probe waits in the backlog and times out, so the cap is what an attacker must
/// fill to have the pod restarted: with [`MAX_HEALTH_CONNECTIONS_PER_IP`], 32 addresses, each
/// connection talking at least every [`HEALTH_CONNECTION_QUIET`].
pub const MAX_HEALTH_CONNECTIONS: usize = 256;
/// Connections the health port serves from one IP at once (the kubelet probes from its node).
pub const MAX_HEALTH_CONNECTIONS_PER_IP: usize = 8;
/// Age at which a health connection is asked to close (HTTP/2 GOAWAY, calls in flight finish):
/// a probe is one call; a `Watch` stream, or Envoy's gRPC health checker, opens a new one.
pub const HEALTH_CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);
/// What a connection asked to close gets to do so before it is cut.
pub const HEALTH_CONNECTION_GRACE: Duration = Duration::from_secs(10);
/// A connection that sends nothing for this long is cut (one that never sends its HTTP/2
/// preface, or holds its slot idle): a probe speaks at once, and the server pings every
/// connection idle for half of it (HTTP/2 PING), so that a client's stack answers for it: a
/// `Watch` stream or a health checker keeping its connection between checks stays.
pub const HEALTH_CONNECTION_QUIET: Duration = Duration::from_secs(10);

/// The health port's bounds (the defaults are the constants above; tests use smaller ones).
#[derive(Debug, Clone, Copy)]
pub struct HealthLimits {
    /// Connections at once.
    pub connections: usize,
    /// Connections from one IP at once.
    pub per_ip: usize,
    /// Age at which a connection is asked to close (GOAWAY).
    pub max_age: Duration,
    /// Then the time it has before it is cut.
    pub grace: Duration,
    /// How long it may send nothing before it is cut.
    pub quiet: Duration,
}

impl Default for HealthLimits {
    fn default() -> Self {
        Self {
            connections: MAX_HEALTH_CONNECTIONS,
            per_ip: MAX_HEALTH_CONNECTIONS_PER_IP,
            max_age: HEALTH_CONNECTION_MAX_AGE,
            grace: HEALTH_CONNECTION_GRACE,
            quiet: HEALTH_CONNECTION_QUIET,
        }
    }
}

/// Serves gRPC health on `listener` within [`HealthLimits::default`] (connections bounded by
/// [`bounded_incoming`], each asked to close at its maximum age) until `stop` fires. The EPP's
/// and bbr's health ports.
pub async fn serve<T: tonic_health::pb::health_server::Health>(
    listener: TcpListener,
    service: tonic_health::pb::health_server::HealthServer<T>,
    stop: tokio_util::sync::CancellationToken,
) {
    serve_within(listener, service, stop, HealthLimits::default()).await;
}

/// [`serve`] within `limits`.
pub async fn serve_within<T: tonic_health::pb::health_server::Health>(
    listener: TcpListener,
    service: tonic_health::pb::health_server::HealthServer<T>,
    stop: tokio_util::sync::CancellationToken,
    limits: HealthLimits,
) {
    let served = tonic::transport::Server::builder()
        .max_connection_age(limits.max_age)
        .max_connection_age_grace(limits.grace)
        // A connection idle for half the quiet limit is pinged: the client's PING ACK is a
        // read, so a client that is there keeps its connection however rarely it calls.
        .http2_keepalive_interval(Some(limits.quiet / 2))
        .http2_keepalive_timeout(Some(limits.quiet / 2))
        .add_service(service)
        .serve_with_incoming_shutdown(bounded_incoming(listener, limits), stop.cancelled())
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "health server failed");
    }
}

/// The health port's connections: at most `limits.connections` at once (the rest wait in the
/// listen backlog), `limits.per_ip` from one IP (past it a connection is closed at once), each
/// cut at `limits.max_age + limits.grace` (the server asks it to close at `max_age`), or once
/// it has sent nothing for `limits.quiet`.
pub fn bounded_incoming(
    listener: TcpListener,
    limits: HealthLimits,
) -> impl Stream<Item = io::Result<AgedConnection>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(limits.connections));
    let peers = PeerCounts::default();
    futures::stream::unfold(
        (listener, permits, peers),
        move |(listener, permits, peers)| async move {
            loop {
                // The permit first: at the cap, connections wait in the backlog, not in memory.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return None;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: the next try after a pause.
                        tracing::warn!(%error, "health server: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(slot) = PeerSlot::take(&peers, peer.ip(), limits.per_ip) else {
                    // Closed at once; its global slot goes back with `permit`.
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let connection = AgedConnection {
                    stream,
                    ends: Box::pin(tokio::time::sleep(limits.max_age + limits.grace)),
                    quiet_for: limits.quiet,
                    quiet: Box::pin(tokio::time::sleep(limits.quiet)),
                    _permit: permit,
                    _slot: slot,
                };
                return Some((Ok(connection), (listener, permits, peers)));
            }
        },
    )
}

/// A health connection holding its slots, that fails its reads and writes once it is older
/// than its age and grace, and its reads once it has been quiet too long (the server then
/// drops it).
#[derive(Debug)]
pub struct AgedConnection {
    stream: TcpStream,
    ends: Pin<Box<Sleep>>,
    /// How long the peer may send nothing, and when that runs out (moved on by every read).
    quiet_for: Duration,
    quiet: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
    _slot: PeerSlot,
}

impl AgedConnection {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.ends
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::Error::new(io::ErrorKind::TimedOut, "health connection too old"))
    }
}

impl AsyncRead for AgedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let next = tokio::time::Instant::now() + self.quiet_for;
            self.quiet.as_mut().reset(next);
        } else if read.is_pending() && self.quiet.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "health connection quiet too long",
            )));
        }
        read
    }
}

impl AsyncWrite for AgedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for AgedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpSocket;

    use super::*;

    async fn client(ip: [u8; 4], to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((ip, 0))).unwrap();
        s.connect(to).await.unwrap()
    }

    /// Review: the health port had no cap on connections and no idle timeout, so anyone who
    /// reached it could hold file descriptors for good. Now: a cap in all and per IP, and a
    /// connection's life ends after `max_age`, silent or not.
    #[tokio::test]
    async fn health_connections_are_capped_and_age_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let limits = HealthLimits {
            connections: 2,
            per_ip: 1,
            max_age: Duration::from_millis(200),
            grace: Duration::from_millis(100),
            quiet: Duration::from_secs(60),
        };
        let incoming = bounded_incoming(listener, limits);
        tokio::pin!(incoming);
        let wait = Duration::from_secs(10);
        let _a = client([127, 0, 0, 1], to).await;
        let mut first = tokio::time::timeout(wait, incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // A second from the same IP is closed at once.
        let mut same_ip = client([127, 0, 0, 1], to).await;
        let _c = client([127, 0, 0, 2], to).await;
        let second = tokio::time::timeout(wait, incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            second.stream.peer_addr().unwrap().ip(),
            std::net::IpAddr::from([127, 0, 0, 2])
        );
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(wait, same_ip.read(&mut byte))
            .await
            .unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // At the cap, the next waits in the backlog until a slot frees.
        let _d = client([127, 0, 0, 3], to).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), incoming.next())
                .await
                .is_err()
        );
        drop(second);
        let third = tokio::time::timeout(wait, incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            third.stream.peer_addr().unwrap().ip(),
            std::net::IpAddr::from([127, 0, 0, 3])
        );
        // A silent connection fails its reads once too old (the server then drops it).
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(wait, first.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(first.write_all(b"x").await.is_err());
    }

    /// Review: 8 addresses holding 8 silent connections each filled the 64 slots until their
    /// 70 s age, so the kubelet's probes waited in the backlog and the pod was restarted. A
    /// connection is now cut once it has sent nothing for `quiet`, whether it never spoke or
    /// spoke and went quiet; what it sends reaches the server.
    #[tokio::test]
    async fn a_quiet_health_connection_is_cut() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let limits = HealthLimits {
            connections: 4,
            per_ip: 4,
            max_age: Duration::from_secs(600),
            grace: Duration::from_secs(600),
            quiet: Duration::from_millis(200),
        };
        let incoming = bounded_incoming(listener, limits);
        tokio::pin!(incoming);
        let wait = Duration::from_secs(10);
        let mut accept = async || {
            tokio::time::timeout(wait, incoming.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
        };
        let quiet = |e: io::Error| {
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(e.to_string().contains("quiet"), "{e}");
        };
        let _silent = client([127, 0, 0, 1], to).await;
        let mut never_spoke = accept().await;
        let mut buf = [0u8; 8];
        quiet(
            tokio::time::timeout(wait, never_spoke.read(&mut buf))
                .await
                .unwrap()
                .unwrap_err(),
        );
        let mut talking = client([127, 0, 0, 1], to).await;
        let mut spoke = accept().await;
        talking.write_all(b"hi").await.unwrap();
        let n = tokio::time::timeout(wait, spoke.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"hi");
        quiet(
            tokio::time::timeout(wait, spoke.read(&mut buf))
                .await
                .unwrap()
                .unwrap_err(),
        );
    }

    /// Review: a `Watch` stream sends nothing after its request, and the quiet limit cut it.
    /// The server pings idle connections, the client's stack answers, and the stream lives
    /// on well past the quiet limit: it still hears a change of status.
    #[tokio::test]
    async fn a_watch_stream_outlives_the_quiet_limit() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus as Status;
        use tonic_health::pb::health_client::HealthClient;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("w", ServingStatus::Serving)
            .await;
        let stop = tokio_util::sync::CancellationToken::new();
        let quiet = Duration::from_millis(300);
        let limits = HealthLimits {
            quiet,
            ..HealthLimits::default()
        };
        let server = tokio::spawn(serve_within(listener, service, stop.clone(), limits));
        let channel = tonic::transport::Channel::from_shared(format!("http://{to}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "w".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, Status::Serving as i32);
        // Several quiet limits with nothing sent by the client (time passing is the point of
        // this wait, not a synchronisation).
        tokio::time::sleep(quiet * 4).await;
        reporter
            .set_service_status("w", ServingStatus::NotServing)
            .await;
        let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("the stream answers")
            .expect("the stream was not cut")
            .unwrap();
        assert_eq!(next.status, Status::NotServing as i32);
        drop(watch);
        stop.cancel();
        server.await.unwrap();
    }
}
