//! One-frame messages over PUB/SUB, guarded like the KV-event sockets: what EPP replicas use to
//! tell each other their just-routed requests (`precise-prefix-cache-scorer`'s
//! `speculativePeers`). The payload is the caller's; a message of more than one frame is
//! refused by [`FrameSub::recv`]. Both ends face the network through a [`guard`](super::guard).

use bytes::Bytes;
use zeromq::{PubSocket, Socket as _, SocketRecv as _, SocketSend as _, SubSocket, ZmqMessage};

use super::guard::{self, Guard, Report};
use super::{TransportError, bindable, zmq_error};

/// A bound PUB socket.
pub struct FramePub {
    socket: PubSocket,
    endpoint: String,
    _guard: Option<Guard>,
}

impl std::fmt::Debug for FramePub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramePub")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl FramePub {
    /// Binds `endpoint` (`tcp://host:port`, `tcp://*:port`, `ipc://…`; port 0 picks one).
    pub async fn bind(endpoint: &str) -> Result<Self, TransportError> {
        let mut socket = PubSocket::new();
        let (endpoint, guard) =
            guard::bind(&mut socket, &bindable(endpoint), Report::default()).await?;
        Ok(Self {
            socket,
            endpoint,
            _guard: guard,
        })
    }

    /// The endpoint as bound (port 0 resolved).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one frame to every subscriber (a subscriber that does not keep up loses it).
    pub async fn send(&mut self, payload: Vec<u8>) -> Result<(), TransportError> {
        self.socket
            .send(ZmqMessage::from(payload))
            .await
            .map_err(zmq_error("send", &self.endpoint))
    }
}

/// A SUB socket dialing one publisher, subscribed to everything.
pub struct FrameSub {
    socket: SubSocket,
    endpoint: String,
    _guard: Option<Guard>,
}

impl std::fmt::Debug for FrameSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSub")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl FrameSub {
    /// Dials `endpoint`.
    pub async fn connect(endpoint: &str) -> Result<Self, TransportError> {
        let mut socket = SubSocket::new();
        let (target, guard) = guard::connect_target(endpoint, Report::default()).await?;
        socket
            .connect(&target)
            .await
            .map_err(zmq_error("connect", endpoint))?;
        socket
            .subscribe("")
            .await
            .map_err(zmq_error("subscribe", endpoint))?;
        Ok(Self {
            socket,
            endpoint: endpoint.to_owned(),
            _guard: guard,
        })
    }

    /// The next message: `Ok(Some(frame))`, `Ok(None)` for a message that is not one frame,
    /// `Err` when the connection failed.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        let m = self
            .socket
            .recv()
            .await
            .map_err(zmq_error("recv", &self.endpoint))?;
        let mut frames = m.into_vec();
        Ok((frames.len() == 1).then(|| frames.swap_remove(0)))
    }
}
