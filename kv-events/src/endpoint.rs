//! A ZeroMQ `tcp://<host>:<port>` endpoint, parsed once.
//!
//! The EPP's configuration (a publish endpoint, peer endpoints), the frame guard in front of a
//! socket and the peers' follower all need the parts of such an endpoint. Each used to split
//! the string itself, with three different ideas of what a host may be; this is the one parser.
//! The forms are libzmq's: `*` (every IPv4 address, which is what libzmq's wildcard means for
//! a TCP bind), an IPv4 address, an IPv6 address in brackets, or a DNS name.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Longest DNS name accepted as a host.
pub const MAX_HOST_NAME_LEN: usize = 253;

/// The host of a [`TcpEndpoint`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TcpHost {
    /// `*`: every IPv4 address of this host (only where a socket binds).
    Any,
    /// An IP address (IPv6 written in brackets).
    Ip(IpAddr),
    /// A DNS name: ASCII letters, digits, `.` and `-`, at most [`MAX_HOST_NAME_LEN`].
    Name(String),
}

/// A parsed `tcp://<host>:<port>` endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpEndpoint {
    /// The host.
    pub host: TcpHost,
    /// The port (0: the OS picks one, where a socket binds).
    pub port: u16,
}

/// Why a string is not a `tcp://<host>:<port>` endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not `tcp://` (ZeroMQ's `ipc://` and `inproc://` have no host or port).
    #[error("not a tcp:// endpoint")]
    NotTcp,
    /// No `:<port>` after the host.
    #[error("no :<port>")]
    NoPort,
    /// The port is not a number from 0 to 65535.
    #[error("the port is not a number from 0 to 65535")]
    BadPort,
    /// The host is none of `*`, an IP address (IPv6 in brackets) or a DNS name.
    #[error("the host is not *, an IP address (IPv6 in brackets) or a DNS name")]
    BadHost,
}

impl TcpEndpoint {
    /// Parses `tcp://<host>:<port>`.
    pub fn parse(endpoint: &str) -> Result<Self, EndpointError> {
        let rest = endpoint
            .strip_prefix("tcp://")
            .ok_or(EndpointError::NotTcp)?;
        let (host, port) = rest.rsplit_once(':').ok_or(EndpointError::NoPort)?;
        let port = port.parse::<u16>().map_err(|_| EndpointError::BadPort)?;
        let host = if host == "*" {
            TcpHost::Any
        } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            TcpHost::Ip(IpAddr::V6(v6.parse().map_err(|_| EndpointError::BadHost)?))
        } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
            TcpHost::Ip(IpAddr::V4(v4))
        } else if is_dns_name(host) {
            TcpHost::Name(host.to_owned())
        } else {
            return Err(EndpointError::BadHost);
        };
        Ok(Self { host, port })
    }

    /// The socket address to bind or connect to: `*` is IPv4's unspecified address; `None` for
    /// a name (it must be resolved first).
    pub fn socket_address(&self) -> Option<SocketAddr> {
        match &self.host {
            TcpHost::Any => Some(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), self.port)),
            TcpHost::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            TcpHost::Name(_) => None,
        }
    }

    /// The host's DNS name, when it is one.
    pub fn name(&self) -> Option<&str> {
        match &self.host {
            TcpHost::Name(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for TcpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            TcpHost::Any => write!(f, "tcp://*:{}", self.port),
            TcpHost::Ip(IpAddr::V6(v6)) => write!(f, "tcp://[{v6}]:{}", self.port),
            TcpHost::Ip(IpAddr::V4(v4)) => write!(f, "tcp://{v4}:{}", self.port),
            TcpHost::Name(name) => write!(f, "tcp://{name}:{}", self.port),
        }
    }
}

/// Letters, digits, `.` and `-`, not empty, at most [`MAX_HOST_NAME_LEN`] (labels are not
/// checked further: the resolver refuses what it cannot look up).
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_NAME_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_form_parses_and_prints_back() {
        for (text, host, port) in [
            ("tcp://*:5557", TcpHost::Any, 5557),
            (
                "tcp://10.0.0.7:5557",
                TcpHost::Ip("10.0.0.7".parse().unwrap()),
                5557,
            ),
            ("tcp://[::]:5570", TcpHost::Ip("::".parse().unwrap()), 5570),
            ("tcp://[::1]:1", TcpHost::Ip("::1".parse().unwrap()), 1),
            (
                "tcp://epp-peers.ns.svc:5570",
                TcpHost::Name("epp-peers.ns.svc".to_owned()),
                5570,
            ),
            (
                "tcp://localhost:0",
                TcpHost::Name("localhost".to_owned()),
                0,
            ),
        ] {
            let e = TcpEndpoint::parse(text).unwrap();
            assert_eq!(e, TcpEndpoint { host, port }, "{text}");
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn what_is_not_an_endpoint_says_why() {
        for (text, why) in [
            ("ipc:///tmp/kv", EndpointError::NotTcp),
            ("inproc://kv", EndpointError::NotTcp),
            ("tcp://epp", EndpointError::NoPort),
            ("tcp://epp:", EndpointError::BadPort),
            ("tcp://epp:notaport", EndpointError::BadPort),
            ("tcp://epp:65536", EndpointError::BadPort),
            ("tcp://:5557", EndpointError::BadHost),
            ("tcp://::1:5557", EndpointError::BadHost),
            ("tcp://[epp]:5557", EndpointError::BadHost),
            ("tcp://[::1:5557", EndpointError::BadHost),
            ("tcp://ep p:5557", EndpointError::BadHost),
            ("tcp://epp\n:5557", EndpointError::BadHost),
            ("tcp://*.svc:5557", EndpointError::BadHost),
        ] {
            assert_eq!(TcpEndpoint::parse(text), Err(why), "{text:?}");
        }
        let long = format!("tcp://{}:1", "a".repeat(MAX_HOST_NAME_LEN + 1));
        assert_eq!(TcpEndpoint::parse(&long), Err(EndpointError::BadHost));
        let longest = format!("tcp://{}:1", "a".repeat(MAX_HOST_NAME_LEN));
        assert!(TcpEndpoint::parse(&longest).is_ok());
    }

    #[test]
    fn addresses_are_what_sockets_use() {
        let at = |s: &str| TcpEndpoint::parse(s).unwrap().socket_address();
        assert_eq!(at("tcp://*:5557"), Some("0.0.0.0:5557".parse().unwrap()));
        assert_eq!(at("tcp://[::]:5557"), Some("[::]:5557".parse().unwrap()));
        assert_eq!(at("tcp://10.0.0.7:1"), Some("10.0.0.7:1".parse().unwrap()));
        assert_eq!(at("tcp://epp:1"), None);
        let named = TcpEndpoint::parse("tcp://epp:1").unwrap();
        assert_eq!(named.name(), Some("epp"));
        assert_eq!(TcpEndpoint::parse("tcp://*:1").unwrap().name(), None);
    }
}
