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
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{HeaderName, CONNECTION, DATE, HOST, REFERER, TRANSFER_ENCODING, USER_AGENT};
use http::{Method, Version};
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
        if self.head_pending() {
            self.write(None, false).await
        } else {
            Ok(())
        }
    }

    /// Writes a piece of the body (`None`: nothing) and, with `end`, ends it cleanly. A
    /// failure is the client's (gone, or too slow for `write_timeout`).
    pub async fn write(&mut self, body: Option<Bytes>, end: bool) -> Result<()> {
        match self {
            // Boxed: Pingora's write would take 768 bytes of the stream's future, for as
            // long as the stream is open, whichever client it has.
            Client::Session(session) => {
                Box::pin(super::exchange::write_body(session, body, end)).await
            }
            Client::Raw(raw) => match raw.write(body, end)? {
                Some(waiting) => waiting.await,
                None => Ok(()),
            },
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
                // Boxed, as the session's write is (272 bytes).
                Box::pin(session.read_body_or_idle(true)).await.map(|_| ())
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

    /// Writes `body` (and the head, when it is still to go) framed for the client, and with
    /// `end` the body's end. The usual write completes at once, and is made here, with no
    /// timer and no room for waiting in the stream's future (which holds that room for as
    /// long as the stream is open). A write that has to wait (a slow client) is given back
    /// to be awaited: boxed, with the write timeout.
    fn write(&mut self, body: Option<Bytes>, end: bool) -> Result<Option<Waiting<'_>>> {
        let mut frame = Frame::new(self.head.take(), body, end, self.chunked);
        let len = frame.data.len();
        let mut at_once = Context::from_waker(futures_util::task::noop_waker_ref());
        match frame.poll_write(&mut self.stream, &mut at_once) {
            Poll::Ready(result) => {
                result
                    .or_err(ErrorType::WriteError, "writing to the client")
                    .map_err(|e| e.into_down())?;
                self.sent += len;
                Ok(None)
            }
            Poll::Pending => {
                let limit = self.write_timeout.unwrap_or(NO_LIMIT);
                let (stream, sent) = (&mut self.stream, &mut self.sent);
                let rest = std::future::poll_fn(move |cx| frame.poll_write(stream, cx));
                Ok(Some(Box::pin(async move {
                    tokio::time::timeout(limit, rest)
                        .await
                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                        .or_err(ErrorType::WriteError, "writing to the client")
                        .map_err(|e| e.into_down())?;
                    *sent += len;
                    Ok(())
                })))
            }
        }
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

/// The rest of a write to the client that has to wait for the connection.
type Waiting<'a> = Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

/// One write to the client: the response head while it is still to go, a chunk's size
/// line, the data, the line end after it, and the last chunk when the body ends (chunked
/// framing; a body as it is has only the data); `written` bytes of it are out.
struct Frame {
    head: Option<Bytes>,
    data: Bytes,
    size: [u8; 18],
    size_len: u8,
    chunked: bool,
    end: bool,
    written: usize,
}

impl Frame {
    fn new(head: Option<Bytes>, body: Option<Bytes>, end: bool, chunked: bool) -> Frame {
        let data = body.unwrap_or_default();
        let mut size = [0u8; 18];
        let size_len = if chunked && !data.is_empty() {
            super::origin::chunk_size_line(&mut size, data.len()) as u8
        } else {
            0
        };
        Frame {
            head,
            data,
            size,
            size_len,
            chunked,
            end,
            written: 0,
        }
    }

    /// The frame's pieces, in order; some may be empty.
    fn parts(&self) -> [&[u8]; 5] {
        let chunk_end: &[u8] = if self.size_len > 0 { b"\r\n" } else { b"" };
        let last: &[u8] = if self.end && self.chunked {
            b"0\r\n\r\n"
        } else {
            b""
        };
        [
            self.head.as_deref().unwrap_or_default(),
            &self.size[..usize::from(self.size_len)],
            &self.data,
            chunk_end,
            last,
        ]
    }

    /// Writes what is left of the frame, in as few writes as the connection takes, then
    /// flushes.
    fn poll_write(
        &mut self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let parts = self.parts();
            let total: usize = parts.iter().map(|p| p.len()).sum();
            if self.written >= total {
                break;
            }
            let mut slices = [IoSlice::new(&[]); 5];
            let mut count = 0;
            for part in parts.into_iter().filter(|p| !p.is_empty()) {
                slices[count] = IoSlice::new(part);
                count += 1;
            }
            let mut left = &mut slices[..count];
            IoSlice::advance_slices(&mut left, self.written);
            let n = ready!(Pin::new(&mut *stream).poll_write_vectored(cx, left))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Pin::new(stream).poll_flush(cx)
    }
}

/// What the logs need of a request, copied out of it (nothing shared with the buffer the
/// request was read into) for a stream carried apart: method, target, version, `Host`,
/// `Referer`, `User-Agent`, the text of all four in one allocation (a copied request head
/// took about 660 bytes, for as long as the stream is open). The request head the logs
/// take is made of them when the stream ends ([`LogFacts::request`]).
pub struct LogFacts {
    pub method: Method,
    version: Version,
    /// The target, then the values of `Host`, `Referer` and `User-Agent`, one after another.
    text: Box<[u8]>,
    /// Where the target and each value end in `text`.
    ends: [u32; 4],
    /// Which of the three headers the request had (bit 0: `Host`).
    present: u8,
}

/// The headers [`LogFacts`] keeps, in its order.
const LOGGED: [HeaderName; 3] = [HOST, REFERER, USER_AGENT];

impl LogFacts {
    pub fn of(req: &RequestHeader) -> LogFacts {
        let target = req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes();
        let authority = req.uri.authority().map(|a| a.as_str().as_bytes());
        let values = LOGGED.map(|name| match req.headers.get(&name) {
            Some(value) => Some(value.as_bytes()),
            None if name == HOST => authority,
            None => None,
        });
        let parts = [Some(target), values[0], values[1], values[2]];
        let mut text = Vec::with_capacity(parts.iter().flatten().map(|p| p.len()).sum());
        let mut ends = [0u32; 4];
        for (end, part) in ends.iter_mut().zip(parts) {
            text.extend_from_slice(part.unwrap_or_default());
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        let present = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .fold(0, |bits, (i, _)| bits | 1 << i);
        LogFacts {
            method: req.method.clone(),
            version: req.version,
            text: text.into_boxed_slice(),
            ends,
            present,
        }
    }

    /// Part `i` of the text (0: the target).
    fn part(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text
            .get(start..self.ends[i] as usize)
            .unwrap_or_default()
    }

    /// The request head the logs take: the facts, as a head of their own.
    pub fn request(&self) -> RequestHeader {
        // The parts came out of a request head, so they make one again; if not, `GET /`.
        let mut facts = RequestHeader::build_no_case(self.method.as_str(), self.part(0), Some(3))
            .unwrap_or_else(|_| RequestHeader::from(http::Request::new(()).into_parts().0));
        facts.set_version(self.version);
        for (i, name) in LOGGED.into_iter().enumerate() {
            if self.present & (1 << i) != 0 {
                if let Ok(value) = http::HeaderValue::from_bytes(self.part(i + 1)) {
                    let _ = facts.insert_header(name, value);
                }
            }
        }
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn raw(stream: tokio::io::DuplexStream, write_timeout: Option<Duration>) -> Raw {
        Raw {
            stream: Box::new(stream),
            head: Some(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n")),
            chunked: true,
            write_timeout,
            sent: 0,
            next: None,
        }
    }

    #[tokio::test]
    async fn a_write_the_client_takes_slowly_goes_out_whole_and_in_order() {
        // Room for 7 bytes at a time: every write waits for the reader many times.
        let (ours, mut theirs) = tokio::io::duplex(7);
        let mut raw = raw(ours, None);
        let data: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.map(|_| got)
        });
        Client::Raw(&mut raw)
            .write(Some(Bytes::from(data.clone())), false)
            .await
            .expect("written");
        Client::Raw(&mut raw)
            .write(Some(Bytes::from_static(b"data: x\n\n")), true)
            .await
            .expect("written");
        assert_eq!(raw.sent, 1009);
        drop(raw);
        let got = reader.await.expect("reader").expect("read");
        let mut want = b"HTTP/1.1 200 OK\r\n\r\n3e8\r\n".to_vec();
        want.extend_from_slice(&data);
        want.extend_from_slice(b"\r\n9\r\ndata: x\n\n\r\n0\r\n\r\n");
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_client_that_takes_nothing_runs_into_the_write_timeout() {
        let (ours, _theirs) = tokio::io::duplex(7);
        let mut raw = raw(ours, Some(Duration::from_millis(50)));
        let e = Client::Raw(&mut raw)
            .write(Some(Bytes::from_static(b"more than seven bytes")), false)
            .await
            .expect_err("timed out");
        assert_eq!(e.etype(), &ErrorType::WriteError);
        assert_eq!(raw.sent, 0);
    }

    /// A stream's loop awaits these writes for as long as it is open: they hold no room for
    /// a write that waits, nor for a timer (584 bytes before, 816 with a session's write).
    #[test]
    fn a_write_holds_no_room_for_waiting() {
        let (ours, _theirs) = tokio::io::duplex(7);
        let mut raw = raw(ours, None);
        let mut client = Client::Raw(&mut raw);
        let write = client.write(Some(Bytes::from_static(b"x")), false);
        assert!(
            std::mem::size_of_val(&write) <= 128,
            "{}",
            std::mem::size_of_val(&write)
        );
        drop(write);
        let head = client.send_head();
        assert!(
            std::mem::size_of_val(&head) <= 128,
            "{}",
            std::mem::size_of_val(&head)
        );
        assert!(std::mem::size_of::<LogFacts>() <= 64);
    }

    #[test]
    fn log_facts_keep_what_the_logs_read() {
        let mut req = RequestHeader::build("POST", b"/v1/chat?stream=1", None).expect("request");
        req.set_version(Version::HTTP_10);
        req.insert_header(HOST, "api.example").expect("header");
        req.insert_header(USER_AGENT, "sdk/1.0").expect("header");
        req.insert_header("authorization", "Bearer secret")
            .expect("header");
        let facts = LogFacts::of(&req);
        assert_eq!(facts.method, Method::POST);
        let head = facts.request();
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri, "/v1/chat?stream=1");
        assert_eq!(head.version, Version::HTTP_10);
        assert_eq!(head.headers.get(HOST).expect("kept"), "api.example");
        assert_eq!(head.headers.get(USER_AGENT).expect("kept"), "sdk/1.0");
        assert!(head.headers.get(REFERER).is_none());
        assert!(head.headers.get("authorization").is_none());

        // An absolute-form target: its authority stands for the missing Host; an empty
        // header is still one.
        let mut req = RequestHeader::build("GET", b"/", None).expect("request");
        req.set_uri(http::Uri::from_static("http://feed.example/events"));
        req.insert_header(REFERER, "").expect("header");
        let head = LogFacts::of(&req).request();
        assert_eq!(head.uri, "/events");
        assert_eq!(head.headers.get(HOST).expect("kept"), "feed.example");
        assert_eq!(head.headers.get(REFERER).expect("kept"), "");
        assert!(head.headers.get(USER_AGENT).is_none());
    }
}
