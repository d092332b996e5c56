//! One-frame messages over PUB/SUB, guarded like the KV-event sockets: what EPP replicas use to
//! tell each other their just-routed requests (`precise-prefix-cache-scorer`'s
//! `speculativePeers`). The payload is the caller's; a message of more than one frame is
//! refused by [`FrameSub::recv`]. Both ends face the network through a [`guard`](super::guard).

use bytes::Bytes;
use zeromq::{PubSocket, Socket as _, SocketRecv as _, SocketSend as _, SubSocket, ZmqMessage};

use super::guard::{self, Guard, Limits, Report};
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
        let (endpoint, guard) = guard::bind(
            &mut socket,
            &bindable(endpoint),
            Report::default(),
            Limits::facing_subscribers(),
        )
        .await?;
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
    /// Dials `endpoint`; a frame of more than `max_frame_bytes` (what the caller's messages
    /// can be, at most) cuts the connection before zmq.rs holds it.
    pub async fn connect(endpoint: &str, max_frame_bytes: u64) -> Result<Self, TransportError> {
        let mut socket = SubSocket::new();
        let limits = Limits {
            frame_bytes: max_frame_bytes,
            message_bytes: max_frame_bytes,
            ..Limits::default()
        };
        let (target, guard) = guard::connect_target(endpoint, Report::default(), limits).await?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::timeout;

    use super::*;
    use crate::transport::guard::MAX_SUBSCRIPTIONS_PER_CONNECTION;

    const WAIT: Duration = Duration::from_secs(10);

    /// A raw ZMTP 3.0 SUB connected to `publisher`: greetings and READY exchanged.
    async fn raw_subscriber(publisher: &str) -> TcpStream {
        let mut s = crate::transport::tests::greeted_peer(publisher).await;
        let command = crate::transport::tests::ready_command(b"SUB");
        s.write_all(&command).await.unwrap();
        // Their READY.
        let mut head = [0u8; 2];
        timeout(WAIT, s.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        let mut body = vec![0u8; usize::from(head[1])];
        timeout(WAIT, s.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
        s
    }

    /// Subscriptions to everything (`0x01` and an empty prefix), `n` of them.
    fn subscriptions(n: u64) -> Vec<u8> {
        (0..n).flat_map(|_| [0x00, 1, 0x01]).collect()
    }

    #[tokio::test]
    async fn a_publisher_cuts_a_subscriber_that_floods_it_with_subscriptions() {
        let mut publisher = FramePub::bind("tcp://127.0.0.1:0").await.unwrap();
        let endpoint = publisher.endpoint().to_owned();

        // As many subscriptions as a subscriber may send: it is still served.
        let mut polite = raw_subscriber(&endpoint).await;
        polite
            .write_all(&subscriptions(MAX_SUBSCRIPTIONS_PER_CONNECTION))
            .await
            .unwrap();
        // One more: cut, before zmq.rs keeps it.
        let mut flooding = raw_subscriber(&endpoint).await;
        flooding
            .write_all(&subscriptions(MAX_SUBSCRIPTIONS_PER_CONNECTION + 1))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = timeout(WAIT, flooding.read_to_end(&mut rest))
            .await
            .expect("the flooding subscriber is cut");

        // The polite one hears what is published once its subscription is in (sent again
        // until it arrives: a PUB drops what no subscription matches yet).
        let mut heard = Vec::new();
        timeout(WAIT, async {
            while heard.len() < 7 {
                publisher.send(b"hello".to_vec()).await.unwrap();
                let mut buf = [0u8; 64];
                // `read` loses nothing when the timeout drops it.
                if let Ok(Ok(n)) = timeout(Duration::from_millis(50), polite.read(&mut buf)).await {
                    assert!(n > 0, "the polite subscriber was cut");
                    heard.extend_from_slice(&buf[..n]);
                }
            }
        })
        .await
        .expect("the polite subscriber is served");
        assert_eq!(&heard[..7], b"\x00\x05hello");
    }
}
