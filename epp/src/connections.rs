//! Bounds on the ext_proc port's connections (the EPP's and bbr's).
//!
//! A gateway opens a few connections per worker and keeps them. Anything else that reaches the
//! port could open connections without end: a plaintext connection that never sends the
//! HTTP/2 preface was held for ever (hyper starts its keep-alive pings only once its own
//! handshake is done), and every TLS handshake started ran for up to 10 s. Once the process's
//! file descriptors ran out, `accept` failed for the gateway too, and a FailClose gateway
//! answered every request with an error. The health and admin ports were bounded before; this
//! port now is too:
//! - at most [`MAX_CONNECTIONS`] at once, TLS handshakes in progress included, and at most
//!   [`MAX_CONNECTIONS_PER_ADDRESS`] from one address (a gateway holds about one a worker); past
//!   either a new connection is closed as it is accepted (logged, at most
//!   [`REFUSAL_LOG_PER_SECOND`] lines a second);
//! - a connection must send the HTTP/2 preface within [`PREFACE_TIMEOUT`] of being accepted
//!   (after its TLS handshake, over TLS), or it is closed;
//! - the server asks every connection to close after [`MAX_CONNECTION_AGE`] (HTTP/2 GOAWAY,
//!   its streams finishing first): a gateway reconnects, a connection kept idle does not hold
//!   its slot for ever.
//!
//! So one address can hold a sixteenth of the port; many addresses can still fill it, which is
//! what a NetworkPolicy admitting only the gateways is for (README "Security").

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ext_proc::untrusted::LogBudget;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// Most ext_proc connections open at once (TLS handshakes in progress included).
pub const MAX_CONNECTIONS: usize = 4096;
/// Most of them from one address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// Age after which the server asks a connection to close (gracefully).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// How long a connection may take to send the HTTP/2 preface.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines a second about connections closed at the cap.
pub const REFUSAL_LOG_PER_SECOND: u64 = 5;
/// The HTTP/2 client preface's length (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_LEN: usize = 24;

static REFUSAL_LOG: LogBudget = LogBudget::new(REFUSAL_LOG_PER_SECOND);

/// The port's connection slots, in all and by address.
#[derive(Debug, Clone)]
pub struct Slots {
    all: Arc<Semaphore>,
    per_address: usize,
    /// Connections held by each address (an entry goes with its last connection).
    by_address: Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's slot, given back when the connection is dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    address: IpAddr,
    by_address: Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_address = self.by_address.lock();
        if let Some(n) = by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

impl Slots {
    /// `max` slots, at most `per_address` of them for one address.
    pub fn new(max: usize, per_address: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(max)),
            per_address,
            by_address: Arc::default(),
        }
    }

    /// A slot for a connection just accepted from `address`, or `None` (logged) when all are
    /// taken or the address holds its share.
    pub fn take(&self, address: IpAddr) -> Option<Slot> {
        let mut by_address = self.by_address.lock();
        let held = by_address.get(&address).copied().unwrap_or(0);
        let permit = if held >= self.per_address {
            None
        } else {
            self.all.clone().try_acquire_owned().ok()
        };
        let Some(permit) = permit else {
            drop(by_address);
            match REFUSAL_LOG.allow() {
                Some(not_logged) => tracing::warn!(
                    %address,
                    held,
                    per_address = self.per_address,
                    available = self.all.available_permits(),
                    not_logged,
                    "ext_proc connection closed: the port's connections, or this address's share, \
                     are all taken"
                ),
                None => tracing::debug!(%address, "ext_proc connection closed at the cap"),
            }
            return None;
        };
        *by_address.entry(address).or_insert(0) += 1;
        Some(Slot {
            _permit: permit,
            address,
            by_address: self.by_address.clone(),
        })
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.all.available_permits()
    }
}

impl Default for Slots {
    fn default() -> Self {
        Self::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS)
    }
}

/// What a connection's slot is counted by: its peer's address.
pub trait PeerAddress {
    /// The peer's IP address (the unspecified address when the socket cannot tell).
    fn peer_ip(&self) -> IpAddr;
}

impl PeerAddress for tokio::net::TcpStream {
    fn peer_ip(&self) -> IpAddr {
        self.peer_addr()
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip())
    }
}

/// A connection holding its slot, and closed if the HTTP/2 preface does not come in time.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    _slot: Option<Slot>,
    /// Until [`PREFACE_LEN`] bytes have been read.
    preface: Option<Pin<Box<Sleep>>>,
    read: usize,
}

impl<IO> Guarded<IO> {
    /// `io`, holding `slot`; with `preface`, closed unless the preface's bytes arrive within it.
    pub fn new(io: IO, slot: Option<Slot>, preface: Option<Duration>) -> Self {
        Self {
            io,
            _slot: slot,
            preface: preface.map(|d| Box::pin(tokio::time::sleep(d))),
            read: 0,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let this = &mut *self;
        if let Some(deadline) = this.preface.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) => {
                    this.read += buf.filled().len() - before;
                    if this.read >= PREFACE_LEN {
                        this.preface = None;
                    }
                }
                // Polling the timer registers the waker: the read is polled again when it
                // fires, and fails then.
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface in time",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The plaintext connections of `incoming`, each holding a slot of `slots` and due to send
/// the preface in time; a connection past the cap is closed at once.
pub fn limited<S, IO>(
    incoming: S,
    slots: Slots,
) -> impl tokio_stream::Stream<Item = Result<Guarded<IO>, io::Error>>
where
    S: tokio_stream::Stream<Item = Result<IO, io::Error>>,
    IO: PeerAddress,
{
    use tokio_stream::StreamExt as _;
    incoming.filter_map(move |accepted| match accepted {
        Ok(io) => slots
            .take(io.peer_ip())
            .map(|slot| Ok(Guarded::new(io, Some(slot), Some(PREFACE_TIMEOUT)))),
        Err(e) => Some(Err(e)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// A connection that sends nothing is closed at the preface's deadline; one that sends
    /// the preface is not, however long it then stays quiet.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_the_preface_deadline() {
        let slots = Slots::new(2, 2);
        let (mut client, server) = duplex(1024);
        let mut silent = Guarded::new(server, slots.take(A), Some(PREFACE_TIMEOUT));
        assert_eq!(slots.available(), 1);
        let mut buf = [0u8; 64];
        let started = tokio::time::Instant::now();
        let err = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), PREFACE_TIMEOUT);
        drop(silent);
        assert_eq!(slots.available(), 2, "the slot is given back");
        // The preface in two pieces, then silence: the deadline is gone.
        let (mut client2, server2) = duplex(1024);
        let mut talking = Guarded::new(server2, slots.take(A), Some(PREFACE_TIMEOUT));
        client2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert_eq!(talking.read(&mut buf).await.unwrap(), 16);
        client2.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
        assert_eq!(talking.read(&mut buf).await.unwrap(), 8);
        let quiet = tokio::time::timeout(PREFACE_TIMEOUT * 3, talking.read(&mut buf)).await;
        assert!(quiet.is_err(), "still open after the preface: {quiet:?}");
        client.shutdown().await.unwrap();
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    /// One address gets its share and no more, the others still get slots up to the cap; a
    /// slot given back is taken again.
    #[test]
    fn slots_run_out_by_address_and_in_all_and_come_back() {
        let slots = Slots::new(3, 2);
        let a1 = slots.take(A).unwrap();
        let _a2 = slots.take(A).unwrap();
        assert!(slots.take(A).is_none(), "A holds its share");
        let _b = slots.take(B).expect("another address is still served");
        assert!(slots.take(C).is_none(), "all taken");
        drop(a1);
        assert!(slots.take(A).is_some(), "A's slot came back");
        assert_eq!(slots.by_address.lock().len(), 2);
    }
}
