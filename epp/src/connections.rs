//! Bounds on the ext_proc port's connections (the EPP's and bbr's).
//!
//! A gateway opens a few connections per worker and keeps them. Anything else that reaches the
//! port could open connections without end: a plaintext connection that never sends the
//! HTTP/2 preface was held for ever (hyper starts its keep-alive pings only once its own
//! handshake is done), and every TLS handshake started ran for up to 10 s. Once the process's
//! file descriptors ran out, `accept` failed for the gateway too, and a FailClose gateway
//! answered every request with an error. The health and admin ports were bounded before; this
//! port now is too:
//! - at most [`MAX_CONNECTIONS`] at once, TLS handshakes in progress included; past it a new
//!   connection is closed as it is accepted (logged, at most [`REFUSAL_LOG_PER_SECOND`] lines
//!   a second);
//! - a connection must send the HTTP/2 preface within [`PREFACE_TIMEOUT`] of being accepted
//!   (after its TLS handshake, over TLS), or it is closed.
//!
//! No per-address cap: a gateway is few addresses with many streams.

use std::future::Future;
use std::io;
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
/// How long a connection may take to send the HTTP/2 preface.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines a second about connections closed at the cap.
pub const REFUSAL_LOG_PER_SECOND: u64 = 5;
/// The HTTP/2 client preface's length (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_LEN: usize = 24;

static REFUSAL_LOG: LogBudget = LogBudget::new(REFUSAL_LOG_PER_SECOND);

/// The port's connection slots.
#[derive(Debug, Clone)]
pub struct Slots(Arc<Semaphore>);

/// One connection's slot, given back when the connection is dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// `max` slots.
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// A slot for a connection just accepted, or `None` (logged) when all are taken.
    pub fn take(&self) -> Option<Slot> {
        match self.0.clone().try_acquire_owned() {
            Ok(permit) => Some(Slot { _permit: permit }),
            Err(_) => {
                match REFUSAL_LOG.allow() {
                    Some(not_logged) => tracing::warn!(
                        max = MAX_CONNECTIONS,
                        not_logged,
                        "ext_proc connection closed: the port's connections are all taken"
                    ),
                    None => tracing::debug!("ext_proc connection closed at the cap"),
                }
                None
            }
        }
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

impl Default for Slots {
    fn default() -> Self {
        Self::new(MAX_CONNECTIONS)
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
{
    use tokio_stream::StreamExt as _;
    incoming.filter_map(move |accepted| match accepted {
        Ok(io) => slots
            .take()
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
        let slots = Slots::new(2);
        let (mut client, server) = duplex(1024);
        let mut silent = Guarded::new(server, slots.take(), Some(PREFACE_TIMEOUT));
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
        let mut talking = Guarded::new(server2, slots.take(), Some(PREFACE_TIMEOUT));
        client2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert_eq!(talking.read(&mut buf).await.unwrap(), 16);
        client2.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
        assert_eq!(talking.read(&mut buf).await.unwrap(), 8);
        let quiet = tokio::time::timeout(PREFACE_TIMEOUT * 3, talking.read(&mut buf)).await;
        assert!(quiet.is_err(), "still open after the preface: {quiet:?}");
        client.shutdown().await.unwrap();
    }

    /// Past the cap a connection gets no slot; a slot given back is taken again.
    #[test]
    fn slots_run_out_and_come_back() {
        let slots = Slots::new(2);
        let a = slots.take().unwrap();
        let _b = slots.take().unwrap();
        assert!(slots.take().is_none());
        drop(a);
        assert!(slots.take().is_some());
    }
}
