//! Loopback ports for processes that bind them later (a child `epp`, Envoy, a simulator).
//!
//! A port the OS hands out for port 0 comes from the ephemeral range, which every outgoing
//! connection and every other port-0 listener also draws from: between the pick and the
//! child's bind, a scrape's source port or a concurrent test's listener can take it (a CI run
//! lost Envoy's listener that way). So these ports come from the band just below the
//! ephemeral range, walked from a per-process offset and never handed out twice by this
//! process; only another explicit bind can collide. Where the ephemeral range leaves no such
//! band, the OS picks.
//!
//! A port that must stay closed ([`ClosedPort`]) is held instead: bound but never listening,
//! so that connections to it are refused and nothing else can take it while the test runs.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A port free on 127.0.0.1 now.
pub fn free_port() -> io::Result<u16> {
    free_port_on(&[IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// A port free on every one of `ips` now (pods on several loopback IPs sharing one target
/// port, as the Pods of a real InferencePool do).
pub fn free_port_on(ips: &[IpAddr]) -> io::Result<u16> {
    static BAND: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let free = |port: u16| ips.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok());
    let band = *BAND.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        band_below(range.split_whitespace().next()?.parse().ok()?)
    });
    let Some((low, span)) = band else {
        let first = ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for _ in 0..50 {
            let port = TcpListener::bind((first, 0))?.local_addr()?.port();
            if free(port) {
                return Ok(port);
            }
        }
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no common free port",
        ));
    };
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + (offset.wrapping_add(n)) % span).unwrap_or(0);
        if port != 0 && free(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port in {low}..{}", low + span),
    ))
}

/// A loopback port nobody listens on, reserved for as long as the value lives: its socket is
/// bound without listening, so a connection to it is refused, and neither a port-0 listener
/// nor an outgoing connection's source port can take it (a port merely found closed could be
/// handed to the next listener, making a "dead" endpoint answer).
#[derive(Debug)]
pub struct ClosedPort {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

impl ClosedPort {
    /// Reserves a port on 127.0.0.1.
    pub fn new() -> io::Result<Self> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("a TCP socket without an IP address"))?;
        Ok(Self {
            _socket: socket,
            addr,
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The band `(first port, length)` below an ephemeral range starting at `ephemeral_low`: up
/// to 10,000 ports above the privileged ones, or none if that leaves fewer than 1,000.
fn band_below(ephemeral_low: u32) -> Option<(u32, u32)> {
    let low = ephemeral_low.saturating_sub(10_000).max(1_024);
    let span = ephemeral_low.checked_sub(low)?;
    (span >= 1_000).then_some((low, span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_band_sits_below_the_ephemeral_range() {
        assert_eq!(band_below(32_768), Some((22_768, 10_000)));
        assert_eq!(band_below(5_000), Some((1_024, 3_976)));
        assert_eq!(band_below(1_500), None);
        assert_eq!(band_below(0), None);
    }

    #[test]
    fn a_closed_port_refuses_connections_and_cannot_be_taken() {
        let closed = ClosedPort::new().unwrap();
        let refused = std::net::TcpStream::connect(closed.addr()).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        assert!(TcpListener::bind(closed.addr()).is_err());
        let port = closed.addr().port();
        drop(closed);
        // Alive until dropped: the port is free again.
        assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
    }

    #[test]
    fn ports_are_never_handed_out_twice_and_avoid_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        if low >= 2_024 {
            assert!(ports.iter().all(|&p| p < low), "{ports:?} against {low}");
        }
    }
}
