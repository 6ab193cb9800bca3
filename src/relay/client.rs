//! The client side of an event stream: the client's Pingora session, or, for a stream
//! carried in a task of its own, the client's HTTP/1.1 connection itself.
//!
//! A long-lived stream over HTTP/1.1 keeps nothing of Pingora's session (not the 4 KiB
//! request buffer, the parsed request, Pingora's per-request future): [`Raw`] writes the
//! response head and frames the body (chunked, or as it is for an HTTP/1.0 client) on the
//! connection directly and watches it for the client going away, and the few request
//! facts the logs need are copied out. The head goes out with the first body bytes when
//! the origin sent them with its own head (one write, one packet: the client has its first
//! event as soon as it has the head), else on its own at once.
//!
//! After a stream that ended cleanly, a connection the client keeps alive (an answer to a
//! `POST`, whose client sends its next request on it) goes back to the server through the
//! [`Handback`], with whatever bytes of the next request came early, and is served as any
//! kept-alive connection is; any other is closed.

use std::io::IoSlice;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{CONNECTION, DATE, HOST, REFERER, TRANSFER_ENCODING, USER_AGENT};
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
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
    /// (`Err` of type `ConnectError`); pending otherwise, and, over HTTP/1.x, while the
    /// request body is still to be read (a request asked of a middleware's service before
    /// it is sent): what the watch read then would be taken from the body. (HTTP/2's watch
    /// waits for the stream's reset and reads nothing.)
    pub async fn gone(&mut self) -> Result<()> {
        match self {
            Client::Session(session) => {
                if matches!(session, ServerSession::H1(_)) && !session.is_body_done() {
                    return std::future::pending().await;
                }
                session.read_body_or_idle(true).await.map(|_| ())
            }
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
    /// Set when the connection serves the client's next request after the stream.
    next: Option<Box<Next>>,
}

/// What the client's next request on a kept-alive connection inherits.
struct Next {
    /// Pingora's keep-alive settings of the request the stream answered.
    settings: HttpPersistentSettings,
    /// Bytes of the next request that came before the stream ended.
    early: BytesMut,
}

impl Raw {
    /// Takes the connection out of an HTTP/1.x session whose request body was read and
    /// whose response head was not written: `head` (framed for the client, see
    /// `headers::frame_for_client`) is written by the first write. With `keep_alive`, a
    /// connection the client keeps alive, with a body framed by chunks, is kept for the
    /// client's next request (its head says `Connection: keep-alive`); any other is closed
    /// after the stream (`Connection: close`). Anything but HTTP/1.x is refused.
    pub fn take(
        session: Box<ServerSession>,
        head: ResponseHeader,
        write_timeout: Option<Duration>,
        keep_alive: bool,
    ) -> Result<Raw> {
        let settings = keep_alive.then(|| HttpPersistentSettings::for_session(&session));
        let ServerSession::H1(mut v1) = *session else {
            return Error::e_explain(
                ErrorType::InternalError,
                "a stream to carry not on HTTP/1.x",
            );
        };
        let chunked = head.headers.contains_key(TRANSFER_ENCODING);
        let sent = v1.body_bytes_sent();
        let settings = settings.filter(|_| {
            chunked && v1.will_keepalive() && v1.is_body_done() && v1.pipelining_enabled()
        });
        let (stream, next) = match settings {
            // With the body read, keep-alive on and early bytes kept (pipelining), this
            // completes at once and gives the connection back with those bytes.
            Some(settings) => match v1.reuse().now_or_never() {
                Some(Ok(Some(reusable))) => {
                    let (stream, early) = reusable.into_parts();
                    // A copy: what Pingora gives is a piece of its 64 KiB read buffer,
                    // which would stay for the whole stream.
                    let early = early.map_or_else(BytesMut::new, |b| BytesMut::from(&b[..]));
                    (stream, Some(Box::new(Next { settings, early })))
                }
                _ => {
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "the client connection could not be kept for its next request",
                    )
                }
            },
            None => (v1.into_inner(), None),
        };
        Ok(Raw {
            sent,
            stream,
            chunked,
            head: Some(head_wire(head, next.is_some())),
            write_timeout,
            next,
        })
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
        // The usual write completes at once, and is made without a timer; only one that
        // has to wait gets the write timeout.
        let mut written = std::pin::pin!(written);
        let result = match written.as_mut().now_or_never() {
            Some(result) => result,
            None => {
                let limit = self.write_timeout.unwrap_or(NO_LIMIT);
                tokio::time::timeout(limit, written)
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            }
        };
        result
            .or_err(ErrorType::WriteError, "writing to the client")
            .map_err(|e| e.into_down())
    }

    /// Bytes from a client that keeps its connection alive are the start of its next
    /// request, kept for it; from any other they do not belong. Either way the caller stops
    /// watching (it is told by a `ConnectError`) and the stream goes on.
    async fn gone(&mut self) -> Result<()> {
        let mut probe = [0u8; 1];
        match self.stream.read(&mut probe).await {
            Ok(0) => Error::e_explain(ErrorType::ConnectionClosed, "the client went away")
                .map_err(|e| e.into_down()),
            Ok(n) => {
                if let Some(next) = &mut self.next {
                    next.early.extend_from_slice(&probe[..n]);
                }
                Error::e_explain(ErrorType::ConnectError, "the client sent data")
            }
            Err(e) => {
                Err(Error::because(ErrorType::ReadError, "reading from the client", e).into_down())
            }
        }
    }

    /// After a stream that ended cleanly: a kept-alive connection goes to `handback` for
    /// the client's next request (`None`: the process is draining, so the client is better
    /// served by the process that takes over); any other is closed.
    pub async fn finish(mut self, handback: Option<&Handback>) {
        match (self.next.take(), handback) {
            (Some(next), Some(handback)) => {
                let Next {
                    mut settings,
                    early,
                } = *next;
                if !early.is_empty() {
                    settings.set_pipelined_prefix(early);
                }
                handback.serve(ReusedHttpStream::new(self.stream, Some(settings)));
            }
            _ => {
                let _ = self.stream.shutdown().await;
            }
        }
    }
}

/// Where a kept-alive client connection goes after a stream carried by [`Raw`]: back to
/// the server that accepted it, which serves its next request as it serves any kept-alive
/// connection. The server connects it once it runs (it holds the app and its shutdown
/// signal); until then a connection handed back is closed.
#[derive(Default)]
pub struct Handback(OnceLock<Box<dyn Fn(ReusedHttpStream) + Send + Sync>>);

impl Handback {
    /// Sets where connections go, on the first call; later calls change nothing.
    pub fn connect(&self, serve: impl FnOnce() -> Box<dyn Fn(ReusedHttpStream) + Send + Sync>) {
        self.0.get_or_init(serve);
    }

    /// Gives `conn` back to the server (closed when nothing is connected).
    pub fn serve(&self, conn: ReusedHttpStream) {
        if let Some(serve) = self.0.get() {
            serve(conn);
        }
    }
}

/// A response head as HTTP/1.1 puts it on the wire (the status line is the proxy's own
/// HTTP/1.1, as `headers::frame_for_client` set it), with what Pingora's session would add
/// to it: `Date`, and `Connection: keep-alive` when the connection serves the client's next
/// request after the stream, else `Connection: close` (so the client sends none on it).
fn head_wire(mut head: ResponseHeader, keep_alive: bool) -> Bytes {
    let _ = head.insert_header(DATE, get_cached_date());
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = head.insert_header(CONNECTION, connection);
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
