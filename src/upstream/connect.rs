//! Connecting to an origin over TCP without a turn of the event loop when the connection
//! is made at once.
//!
//! Pingora's connector waits for a new socket to report it is writable before it hands the
//! connection over, and tokio learns that only at the loop's next poll of its reactor:
//! after every task ready before it has run. To a loopback origin (a sidecar, a model
//! server on the same host) the handshake is complete when `connect` returns, so that turn
//! is pure wait, and the request waited a second one, since tokio does no I/O on a socket
//! before its first readiness event (the relay's `OriginConn::send_head` writes the head
//! itself first). Here a send of nothing right after `connect` tells whether the
//! connection is made (it is then, or the connect failed, or it is still under way), and
//! only one still under way is waited for, within the service's connect timeout.

use std::io;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::connectors::l4::Connect;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_error::{Error, ErrorType, OrErr, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Pingora's L4 connect for TCP origins (`PeerOptions::custom_l4`): what Pingora does
/// after it (TCP keepalive, `TCP_NODELAY`, the socket's digest, TLS) is unchanged.
#[derive(Debug)]
pub struct TcpConnect {
    /// The service's connect timeout (Pingora applies it to its own connect only).
    pub timeout: Option<Duration>,
}

#[async_trait]
impl Connect for TcpConnect {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(addr) = addr else {
            return Error::e_explain(ErrorType::InternalError, "not a TCP address");
        };
        let socket = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
        .or_err(ErrorType::SocketError, "creating a socket to the origin")?;
        match socket.connect(&(*addr).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(failed(e, addr)),
        }
        // Nothing is sent: 0 once connected, "would block" while connecting, or the
        // connect's own error.
        let made = match socket.send_with_flags(&[], libc::MSG_NOSIGNAL) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(failed(e, addr)),
        };
        let tcp = tokio::net::TcpStream::from_std(socket.into())
            .or_err(ErrorType::SocketError, "registering the origin connection")?;
        if !made {
            let writable = tcp.writable();
            let ready = match self.timeout {
                Some(limit) => tokio::time::timeout(limit, writable).await.map_err(|_| {
                    Error::explain(
                        ErrorType::ConnectTimedout,
                        format!("timeout {limit:?} connecting to {addr}"),
                    )
                })?,
                None => writable.await,
            };
            ready.map_err(|e| failed(e, addr))?;
            if let Some(e) = tcp.take_error().map_err(|e| failed(e, addr))? {
                return Err(failed(e, addr));
            }
        }
        Ok(Stream::from(tcp))
    }
}

/// A connect that failed, typed as Pingora types its own (refused, no route, timed out).
fn failed(e: io::Error, addr: &std::net::SocketAddr) -> Box<Error> {
    let etype = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ErrorType::ConnectRefused,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => ErrorType::ConnectNoRoute,
        Some(libc::ETIMEDOUT) => ErrorType::ConnectTimedout,
        _ => ErrorType::ConnectError,
    };
    Error::because(etype, format!("connecting to {addr}"), e)
}

/// Loopback origins and connections to them, for tests here and in the relay.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A loopback listener standing for an origin, and its address as a peer's.
    pub async fn loopback() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, SocketAddr::Inet(addr))
    }

    /// A new connection to `target`, made as the services make them.
    pub async fn connected(target: &SocketAddr) -> Result<Stream> {
        TcpConnect {
            timeout: Some(Duration::from_secs(1)),
        }
        .connect(target)
        .await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::testing::{connected, loopback};
    use super::*;

    #[tokio::test]
    async fn a_loopback_connection_is_ready_at_once_and_failures_keep_their_type() {
        let (listener, target) = loopback().await;
        let mut stream = connected(&target).await.expect("connects");
        let (mut accepted, _) = listener.accept().await.expect("accept");
        stream.write_all(b"hello").await.expect("write");
        stream.flush().await.expect("flush");
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        drop(listener);
        let refused = connected(&target).await.expect_err("nobody listens");
        assert_eq!(refused.etype(), &ErrorType::ConnectRefused);
    }
}
