//! The client side of an event stream: the client's Pingora session, or, for a stream
//! carried in a task of its own, the client's HTTP/1.1 connection itself.
//!
//! A long-lived `GET` stream over HTTP/1.1 keeps nothing of Pingora's session (not the
//! 4 KiB request buffer, the parsed request): [`Raw`] writes the response head and frames
//! the body (chunked, or as it is for an HTTP/1.0 client) on the connection directly and
//! watches it for the client going away,
//! and the few request facts the logs need are copied out. The head goes out with the
//! first body bytes when the origin sent them with its own head (one write, one packet:
//! the client has its first event as soon as it has the head), else on its own at once.

use std::io::IoSlice;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, DATE, HOST, REFERER, TRANSFER_ENCODING, USER_AGENT};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A write timeout that never runs out (tokio caps far deadlines).
const NO_LIMIT: Duration = Duration::from_secs(86_400 * 365 * 30);

/// Where a stream's bytes go.
pub enum Client<'a> {
    /// Through the client's Pingora session (HTTP/2; HTTP/1.1 requests that stay in
    /// Pingora's hands).
    Session(&'a mut ServerSession),
    /// Straight onto the client's HTTP/1.1 connection.
    Raw(&'a mut Raw),
}

impl Client<'_> {
    /// Whether the response head is still to be written (it then goes with the next write).
    pub fn head_pending(&self) -> bool {
        matches!(self, Client::Raw(raw) if raw.head.is_some())
    }

    /// Writes the response head now if it is still pending.
    pub async fn send_head(&mut self) -> Result<()> {
        match self {
            Client::Raw(raw) if raw.head.is_some() => raw.write(None, false).await,
            _ => Ok(()),
        }
    }

    /// Writes a piece of the body (`None`: nothing) and, with `end`, ends it cleanly. A
    /// failure is the client's (gone, or too slow for `write_timeout`).
    pub async fn write(&mut self, body: Option<Bytes>, end: bool) -> Result<()> {
        match self {
            Client::Session(session) => super::exchange::write_body(session, body, end).await,
            Client::Raw(raw) => raw.write(body, end).await,
        }
    }

    /// Resolves when the client goes away (an error), or sends bytes where none belong
    /// (`Err` of type `ConnectError`); pending otherwise.
    pub async fn gone(&mut self) -> Result<()> {
        match self {
            Client::Session(session) => session.read_body_or_idle(true).await.map(|_| ()),
            Client::Raw(raw) => raw.gone().await,
        }
    }
}

/// The client's HTTP/1.x connection, its body framed here.
pub struct Raw {
    stream: Stream,
    /// The response head, until it is written.
    head: Option<Bytes>,
    /// The body goes chunked (the head says so); else as it is, ended by the close.
    chunked: bool,
    write_timeout: Option<Duration>,
    /// Body bytes sent (without the framing), for the logs.
    pub sent: usize,
}

impl Raw {
    /// Takes the connection out of an HTTP/1.x session whose response head was not
    /// written: `head` (framed for the client, see `headers::frame_for_client`; with
    /// `Connection: close`) is, by the first write. Other sessions are given back as they
    /// are.
    pub fn take(
        session: Box<ServerSession>,
        head: ResponseHeader,
        write_timeout: Option<Duration>,
    ) -> Result<Raw, Box<ServerSession>> {
        match *session {
            ServerSession::H1(v1) => Ok(Raw {
                sent: v1.body_bytes_sent(),
                stream: v1.into_inner(),
                chunked: head.headers.contains_key(TRANSFER_ENCODING),
                head: Some(head_wire(head)),
                write_timeout,
            }),
            other => Err(Box::new(other)),
        }
    }

    async fn write(&mut self, body: Option<Bytes>, end: bool) -> Result<()> {
        let written = async {
            let head = self.head.take();
            let head = head.as_deref().unwrap_or_default();
            if let Some(data) = body.filter(|d| !d.is_empty()) {
                let mut size = [0u8; 18];
                let (size, crlf): (&[u8], &[u8]) = if self.chunked {
                    let n = super::origin::chunk_size_line(&mut size, data.len());
                    (&size[..n], b"\r\n")
                } else {
                    (&[], &[])
                };
                write_all(&mut self.stream, [head, size, &data, crlf]).await?;
                self.sent += data.len();
            } else if !head.is_empty() {
                self.stream.write_all(head).await?;
            }
            if end && self.chunked {
                self.stream.write_all(b"0\r\n\r\n").await?;
            }
            self.stream.flush().await
        };
        // One future either way (the timer is only set if the write has to wait).
        let limit = self.write_timeout.unwrap_or(NO_LIMIT);
        tokio::time::timeout(limit, written)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .or_err(ErrorType::WriteError, "writing to the client")
            .map_err(|e| e.into_down())
    }

    async fn gone(&mut self) -> Result<()> {
        let mut probe = [0u8; 1];
        match self.stream.read(&mut probe).await {
            Ok(0) => Error::e_explain(ErrorType::ConnectionClosed, "the client went away")
                .map_err(|e| e.into_down()),
            Ok(_) => Error::e_explain(ErrorType::ConnectError, "the client sent data"),
            Err(e) => {
                Err(Error::because(ErrorType::ReadError, "reading from the client", e).into_down())
            }
        }
    }

    /// Closes the connection after a stream that ended cleanly.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// A response head as HTTP/1.1 puts it on the wire (the status line is the proxy's own
/// HTTP/1.1, as `headers::frame_for_client` set it), with what Pingora's session would add
/// to it: `Date`, and `Connection: close` (the connection ends with the stream, so a client
/// never sends another request on it).
fn head_wire(mut head: ResponseHeader) -> Bytes {
    let _ = head.insert_header(DATE, get_cached_date());
    let _ = head.insert_header(CONNECTION, "close");
    let mut wire = BytesMut::with_capacity(256);
    wire.put_slice(b"HTTP/1.1 ");
    wire.put_slice(head.status.as_str().as_bytes());
    wire.put_u8(b' ');
    wire.put_slice(head.get_reason_phrase().unwrap_or_default().as_bytes());
    wire.put_slice(b"\r\n");
    head.header_to_h1_wire(&mut wire);
    wire.put_slice(b"\r\n");
    wire.freeze()
}

/// Writes every byte of `parts` (the head, a chunk's size line, data and end), in as few
/// writes as the connection takes.
async fn write_all(stream: &mut Stream, parts: [&[u8]; 4]) -> std::io::Result<()> {
    let mut slices = parts.map(IoSlice::new);
    let mut left = &mut slices[..];
    while !left.is_empty() {
        let n = stream.write_vectored(left).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// What the logs need of a request, copied out of it (nothing shared with the buffer the
/// request was read into): method, target, version, `Host`, `Referer`, `User-Agent`.
pub fn log_facts(req: &RequestHeader) -> RequestHeader {
    let target = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    let mut facts = match RequestHeader::build_no_case(req.method.as_str(), target, Some(3)) {
        Ok(facts) => facts,
        Err(_) => {
            return RequestHeader::build_no_case("GET", b"/", Some(0))
                .unwrap_or_else(|_| req.clone())
        }
    };
    facts.set_version(req.version);
    for name in [HOST, REFERER, USER_AGENT] {
        if let Some(value) = req.headers.get(&name) {
            if let Ok(copy) = http::HeaderValue::from_bytes(value.as_bytes()) {
                let _ = facts.insert_header(name, copy);
            }
        }
    }
    if let Some(authority) = req.uri.authority() {
        if !facts.headers.contains_key(HOST) {
            if let Ok(copy) = http::HeaderValue::from_str(authority.as_str()) {
                let _ = facts.insert_header(HOST, copy);
            }
        }
    }
    facts
}
