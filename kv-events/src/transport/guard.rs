//! A ZMTP frame guard between zmq.rs and the network, for the subscribing side.
//!
//! zmq.rs reserves a frame's announced length before reading it and has no message-size limit
//! (no `ZMQ_MAXMSGSIZE`): ten bytes after the greeting, a frame header announcing 2^50 bytes,
//! and the process aborts on the allocation (measured against the simulator: "memory
//! allocation of 1125899906908169 bytes failed"). A subscriber's sockets therefore never face
//! the network themselves: each TCP connection runs through a relay on loopback that reads the
//! peer's ZMTP 3 stream — the 64-byte greeting, then frames (a flags byte, a 1- or 8-byte
//! length, the body) — and cuts the connection at a frame over [`MAX_FRAME_BYTES`], a message of
//! more than [`MAX_FRAMES_PER_MESSAGE`] frames, or reserved flag bits. What the local socket
//! sends goes out unchanged. zmq.rs then reconnects (SUB) or the exchange fails (replay), as
//! for any lost peer.
//!
//! A guard also knows what zmq.rs hides: which peers are connected. zmq.rs's SUB socket dials
//! again by itself, forever and silently, and its socket monitor would only see the loopback
//! connection to the guard; the guard sees the peer's own TCP connection open and close, and
//! reports it in [`Peers`] (see [`super::Subscriber::peers`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{TransportError, zmq_error};

/// Bytes in one frame from a peer, at most. A frame is a batch's payload (or a topic, a
/// sequence number, a replay request). vLLM sends one batch per engine step, and the largest
/// legitimate one is a long prefill's: each full block stored in the step is announced with its
/// tokens, at most 5 bytes each in msgpack (ids up to 2^32; 3 bytes below 65,536), and its hash,
/// 34 bytes (a 32-byte sha256 as msgpack bin; an integer hash is 9 at most): with 16-token
/// blocks 16 × 5 + 34 = 114 bytes a block, 7.1 bytes a token. A 128k-token prefill stored in
/// one step is 131,072 × 7.1 ≈ 0.9 MiB; the same step's evictions (`BlockRemoved`, 34 bytes a
/// block) and CPU-offload copies (hash-only `BlockStored`) add 0.27 MiB each: about 1.5 MiB.
/// 8 MiB leaves five times that (some 700k tokens stored in one step), and bounds what one
/// peer makes the subscriber hold per frame to an eighth of the former 64 MiB.
pub const MAX_FRAME_BYTES: u64 = 8 * 1024 * 1024;
/// Frames in one message from a peer, at most (vLLM's have 3; a replay answer 3 after the
/// envelope).
pub const MAX_FRAMES_PER_MESSAGE: usize = 8;

/// Connections one guard relays at once, at most (a central subscriber's engines; more are
/// closed on accept).
pub const MAX_CONNECTIONS: usize = 4_096;

/// IPs [`Peers`] remembers with no connection open, at most (past it, they are forgotten).
pub const MAX_REMEMBERED_PEERS: usize = 16_384;

const GREETING_BYTES: usize = 64;
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// The peers a guarded socket is connected with, by IP: how many connections each has open now.
/// An IP once seen stays listed (at 0) after its last connection closed, so that "connected
/// once and gone" differs from "never seen" (a peer behind a proxy shows under the proxy's IP,
/// and the engine's own IP is then never seen).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers {
    tracked: bool,
    open: HashMap<IpAddr, u32>,
}

impl Peers {
    /// Whether connections are tracked at all (a TCP endpoint; `ipc://` is not guarded).
    pub fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// Whether `ip` has a connection open now; `None` when connections are not tracked or `ip`
    /// never connected.
    pub fn connected(&self, ip: IpAddr) -> Option<bool> {
        if !self.tracked {
            return None;
        }
        self.open.get(&ip.to_canonical()).map(|&n| n > 0)
    }

    /// Connections open now, over every peer.
    pub fn open_connections(&self) -> u64 {
        self.open.values().map(|&n| u64::from(n)).sum()
    }

    fn opened(&mut self, ip: IpAddr) {
        if self.open.len() >= MAX_REMEMBERED_PEERS {
            self.open.retain(|_, n| *n > 0);
        }
        *self.open.entry(ip).or_insert(0) += 1;
    }

    fn closed(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Where a guard reports its peers, if anywhere.
pub(crate) type PeerReport = Option<watch::Sender<Peers>>;

/// One relayed connection, counted in [`Peers`] while it lives (dropping it, also when the
/// guard's task is aborted, counts it closed).
struct Counted {
    report: PeerReport,
    ip: IpAddr,
}

impl Counted {
    fn open(report: &PeerReport, ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        if let Some(r) = report {
            r.send_modify(|p| p.opened(ip));
        }
        Self {
            report: report.clone(),
            ip,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(r) = &self.report {
            r.send_modify(|p| p.closed(self.ip));
        }
    }
}

fn track(report: &PeerReport) {
    if let Some(r) = report {
        r.send_if_modified(|p| !std::mem::replace(&mut p.tracked, true));
    }
}

/// A running guard; dropping it stops the relays.
#[derive(Debug)]
pub(crate) struct Guard {
    /// Where the local zmq.rs socket connects (`tcp://127.0.0.1:<port>`).
    pub(crate) local_endpoint: String,
    task: JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A guard for a socket that connects: the local socket connects to the guard's loopback
/// port, and each of its connections is relayed to `remote` (`tcp://host:port`), counted in
/// `report` while the remote end is connected.
pub(crate) async fn connecting(remote: &str, report: PeerReport) -> io::Result<Guard> {
    let target = tcp_address(remote)?;
    track(&report);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local_endpoint = format!("tcp://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let mut relays = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((local, _)) = accepted else { continue };
                    if relays.len() >= MAX_CONNECTIONS {
                        continue;
                    }
                    let target = target.clone();
                    let report = report.clone();
                    relays.spawn(async move {
                        // The peer unreachable: drop the local side, which then retries.
                        if let Ok(remote) = TcpStream::connect(&target).await {
                            let _counted = remote
                                .peer_addr()
                                .ok()
                                .map(|a| Counted::open(&report, a.ip()));
                            relay(local, remote).await;
                        }
                    });
                }
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
            }
        }
    });
    Ok(Guard {
        local_endpoint,
        task,
    })
}

/// A guard for a socket that binds: the guard listens on `public` (`tcp://host:port`) and
/// relays each connection to the local socket bound at `local` (loopback), counted in `report`
/// while it lasts. Returns the guard and the public address as bound (port 0 resolved).
pub(crate) async fn binding(
    public: &str,
    local: SocketAddr,
    report: PeerReport,
) -> io::Result<(Guard, SocketAddr)> {
    let listener = TcpListener::bind(tcp_address(public)?).await?;
    track(&report);
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut relays = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((remote, peer)) = accepted else { continue };
                    if relays.len() >= MAX_CONNECTIONS {
                        tracing::warn!(limit = MAX_CONNECTIONS, "KV-event connection refused: too many");
                        continue;
                    }
                    let report = report.clone();
                    relays.spawn(async move {
                        if let Ok(local) = TcpStream::connect(local).await {
                            let _counted = Counted::open(&report, peer.ip());
                            relay(local, remote).await;
                        }
                    });
                }
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
            }
        }
    });
    Ok((
        Guard {
            local_endpoint: format!("tcp://{local}"),
            task,
        },
        bound,
    ))
}

/// Binds `socket` at `endpoint` behind a guard when it is TCP (the socket itself on an
/// ephemeral loopback port); other transports (`ipc://`, local to the host) bind directly.
/// Returns the endpoint as bound (port 0 resolved) and the guard to keep alive. The guard
/// counts its peers in `report`.
pub(crate) async fn bind<S: zeromq::Socket>(
    socket: &mut S,
    endpoint: &str,
    report: PeerReport,
) -> Result<(String, Option<Guard>), TransportError> {
    if !endpoint.starts_with("tcp://") {
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(zmq_error("bind", endpoint))?;
        return Ok((bound.to_string(), None));
    }
    let local = socket
        .bind("tcp://127.0.0.1:0")
        .await
        .map_err(zmq_error("bind", endpoint))?
        .to_string();
    let local = local
        .strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| TransportError::Config(format!("unexpected local endpoint {local}")))?;
    let (guard, public) = binding(endpoint, local, report)
        .await
        .map_err(guard_error(endpoint))?;
    Ok((format!("tcp://{public}"), Some(guard)))
}

/// The endpoint a socket connects to instead of `endpoint`, and the guard to keep alive:
/// TCP goes through a guard, other transports connect directly. The guard counts its peer in
/// `report`.
pub(crate) async fn connect_target(
    endpoint: &str,
    report: PeerReport,
) -> Result<(String, Option<Guard>), TransportError> {
    if !endpoint.starts_with("tcp://") {
        return Ok((endpoint.to_owned(), None));
    }
    let guard = connecting(endpoint, report)
        .await
        .map_err(guard_error(endpoint))?;
    Ok((guard.local_endpoint.clone(), Some(guard)))
}

fn guard_error(endpoint: &str) -> impl FnOnce(io::Error) -> TransportError {
    let endpoint = endpoint.to_owned();
    move |source| TransportError::Guard { endpoint, source }
}

/// `host:port` of a `tcp://` endpoint (libzmq's wildcard `*` is `0.0.0.0`).
fn tcp_address(endpoint: &str) -> io::Result<String> {
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{endpoint}: only tcp:// endpoints are guarded"),
        )
    })?;
    Ok(match rest.strip_prefix("*:") {
        Some(port) => format!("0.0.0.0:{port}"),
        None => rest.to_owned(),
    })
}

/// Relays until either side closes or the remote breaks a rule.
async fn relay(local: TcpStream, remote: TcpStream) {
    let _ = local.set_nodelay(true);
    let _ = remote.set_nodelay(true);
    let (mut local_read, mut local_write) = local.into_split();
    let (mut remote_read, mut remote_write) = remote.into_split();
    let outbound = tokio::io::copy(&mut local_read, &mut remote_write);
    let inbound = checked_copy(&mut remote_read, &mut local_write);
    tokio::select! {
        _ = outbound => {}
        r = inbound => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "KV-event peer cut off");
            }
        }
    }
}

/// Copies a ZMTP 3 stream, frame by frame, refusing what zmq.rs must not see.
async fn checked_copy<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut greeting = [0u8; GREETING_BYTES];
    from.read_exact(&mut greeting).await?;
    if greeting[0] != 0xFF || greeting[9] & 1 != 1 || greeting[10] < 3 {
        return Err(invalid("not a ZMTP 3 greeting"));
    }
    to.write_all(&greeting).await?;
    let mut frames_in_message = 0usize;
    let mut header = [0u8; 9];
    loop {
        let flags = match from.read_u8().await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return Err(invalid("reserved frame flags"));
        }
        header[0] = flags;
        let (len, header_len) = if flags & LONG != 0 {
            from.read_exact(&mut header[1..9]).await?;
            let mut be = [0u8; 8];
            be.copy_from_slice(&header[1..9]);
            (u64::from_be_bytes(be), 9)
        } else {
            header[1] = from.read_u8().await?;
            (u64::from(header[1]), 2)
        };
        if len > MAX_FRAME_BYTES {
            return Err(invalid("a frame over the size cap"));
        }
        if flags & COMMAND == 0 {
            frames_in_message += 1;
            if frames_in_message > MAX_FRAMES_PER_MESSAGE {
                return Err(invalid("a message of too many frames"));
            }
            if flags & MORE == 0 {
                frames_in_message = 0;
            }
        }
        to.write_all(&header[..header_len]).await?;
        let copied = tokio::io::copy(&mut (&mut *from).take(len), to).await?;
        if copied != len {
            return Ok(()); // the peer closed inside a frame
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
        g.extend_from_slice(b"NULL");
        g.resize(GREETING_BYTES, 0);
        g
    }

    async fn copy(input: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut out = Vec::new();
        let r = checked_copy(&mut input.as_slice(), &mut out).await;
        (r, out)
    }

    #[tokio::test]
    async fn good_frames_pass_unchanged() {
        let mut input = greeting();
        input.extend_from_slice(&[COMMAND, 3, b'a', b'b', b'c']); // a short command
        input.extend_from_slice(&[MORE, 1, b't']); // a 3-frame message
        input.extend_from_slice(&[MORE | LONG, 0, 0, 0, 0, 0, 0, 0, 2, b's', b'q']);
        input.extend_from_slice(&[0, 0]);
        let (r, out) = copy(input.clone()).await;
        r.unwrap();
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn a_huge_frame_header_cuts_the_stream_before_it_is_passed_on() {
        let mut input = greeting();
        input.push(COMMAND | LONG);
        input.extend_from_slice(&(1u64 << 50).to_be_bytes());
        let (r, out) = copy(input).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(out, greeting(), "the header never reaches the local socket");
    }

    #[tokio::test]
    async fn too_many_frames_bad_flags_and_bad_greetings_are_refused() {
        let mut input = greeting();
        for _ in 0..=MAX_FRAMES_PER_MESSAGE {
            input.extend_from_slice(&[MORE, 0]);
        }
        assert!(copy(input).await.0.is_err());
        let mut input = greeting();
        input.extend_from_slice(&[0x80, 0]);
        assert!(copy(input).await.0.is_err());
        let mut input = greeting();
        input[10] = 2; // ZMTP 2
        assert!(copy(input).await.0.is_err());
    }

    #[test]
    fn endpoints_become_addresses() {
        assert_eq!(tcp_address("tcp://*:5557").unwrap(), "0.0.0.0:5557");
        assert_eq!(tcp_address("tcp://10.0.0.7:5557").unwrap(), "10.0.0.7:5557");
        assert!(tcp_address("ipc:///tmp/kv").is_err());
    }
}
