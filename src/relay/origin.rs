//! The origin side of an exchange: one HTTP/1.1 request and its response over a connection
//! from `upstream::connect` (TCP or TLS, pooled in Pingora's pool), framed here.
//!
//! Why our own framing rather than Pingora's HTTP client session: the relay decides what to
//! do with every byte the origin sends (an event stream is scanned, paced and ended at event
//! boundaries; a burst of events is written to the client in one write), and it keeps the
//! memory of a long-lived stream small (reads go through a buffer on the stack, so a quiet
//! stream holds no read buffer at all, where Pingora keeps a 64 KiB body buffer per connection).
//!
//! ```text
//! request   head written as Pingora serialises it; body as the client sent it: with its
//!           Content-Length, or re-chunked (chunked clients, HTTP/2 clients without a length)
//! response  head parsed with httparse (strict: no obs-fold, at most 128 headers, 64 KiB);
//!           1xx answers other than 101 skipped; body framed by RFC 9112 6.3: none (HEAD,
//!           204, 304), chunked (trailers read and dropped), Content-Length (one value),
//!           or until the origin closes
//! reuse     the connection goes back to the pool only when both bodies ended exactly
//!           where their framing said, nothing extra was read, and keep-alive holds
//! ```

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Version};
use pingora_core::protocols::http::v1::client::http_req_header_to_wire;
use pingora_core::protocols::Stream;
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use socket2::SockRef;

use crate::http_util::AddedHeaders;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Most bytes a response head may take.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines a response head may have.
const MAX_HEADERS: usize = 128;
/// The most one read from the origin takes.
const READ: usize = 64 * 1024;
/// The most one read onto the stack takes (a quiet stream's): an event seldom needs more,
/// and every page of it is touched on the way in (stack probes). A read that fills it
/// reads on into the connection's buffer, [`READ`] at a time.
const STACK_READ: usize = 16 * 1024;
/// Longest chunk-size line (with extensions) accepted from an origin.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most trailer bytes accepted (and dropped) after a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

/// How a body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// This many bytes left.
    Length(u64),
    /// Chunked, at this point of a chunk.
    Chunked(ChunkState),
    /// Until the origin closes the connection.
    UntilClose,
    /// The body ended where its framing said.
    Done,
}

/// Where a chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, in the trailers (bytes of trailers seen so far).
    Trailers(usize),
}

/// What the origin sent that cannot be framed.
fn framing_error(what: impl Into<String>) -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, what.into()).into_up()
}

/// A connection to an origin, carrying one exchange at a time.
pub struct OriginConn {
    stream: Stream,
    /// Bytes read and not yet consumed; no allocation once they all are, unless the
    /// origin is sending faster than it is read (`full`).
    buf: BytesMut,
    /// The last read took all it could: more is likely waiting, so the buffer is kept and
    /// the next read goes straight into it.
    full: bool,
    /// The connection came from the pool.
    pub reused: bool,
    /// How the request body is framed on the way out.
    request: Framing,
    /// How the response body is framed.
    response: Framing,
    /// The response allows the connection to be reused.
    keepalive: bool,
    /// Any byte of the response arrived.
    pub answered: bool,
    /// The whole request head was written (into the socket: the origin may have it), or
    /// body bytes read from the client are held or being written with it: either way the
    /// request cannot be sent again.
    pub head_sent: bool,
    /// The request not yet written: its head, held until the body's first bytes go with
    /// it (see [`OriginConn::send_head`]), and the body pieces held with it
    /// ([`OriginConn::hold_body`]); empty otherwise.
    held: BytesMut,
}

impl OriginConn {
    pub fn new(stream: Stream, reused: bool) -> Self {
        OriginConn {
            stream,
            buf: BytesMut::new(),
            full: false,
            reused,
            request: Framing::None,
            response: Framing::None,
            keepalive: false,
            answered: false,
            head_sent: false,
            held: BytesMut::new(),
        }
    }

    /// Writes the request head. `body` is how the body that follows is framed: the head must
    /// already say so (`Content-Length` or `Transfer-Encoding: chunked`). A head with a body
    /// to follow is held until the body's first bytes (or its end) are sent, and goes with
    /// them in one write: an origin that answers once it has read the head, and closes
    /// without reading on, would otherwise get the body after its close, and its kernel
    /// would answer that with a reset, which drops whatever of its answer the proxy had not
    /// read yet (the last events of a stream).
    pub async fn send_head(
        &mut self,
        req: &RequestHeader,
        added: &AddedHeaders,
        body: Framing,
    ) -> Result<()> {
        let mut wire = http_req_header_to_wire(req).ok_or_else(|| {
            Error::explain(
                ErrorType::InvalidHTTPHeader,
                "the request target cannot be sent over HTTP/1.1",
            )
        })?;
        // The head ends with an empty line: the added headers go before it.
        wire.truncate(wire.len() - 2);
        added.write(&mut wire);
        wire.extend_from_slice(b"\r\n");
        self.request = body;
        self.held = wire;
        if body != Framing::None {
            return Ok(());
        }
        self.send(&[]).await
    }

    /// Writes `parts`, after what is held of the request (all in one write, which on a
    /// new plain connection goes out at once: see `send_at_once`), and sends them on.
    async fn send(&mut self, parts: &[&[u8]]) -> Result<()> {
        if self.held.is_empty() {
            for part in parts.iter().filter(|part| !part.is_empty()) {
                self.write(part).await?;
            }
        } else {
            let mut first = std::mem::take(&mut self.held);
            for part in parts {
                first.extend_from_slice(part);
            }
            // Body bytes read from the client go with it: the request cannot be sent again,
            // whether this write succeeds or not. A head alone can, until it is written.
            if !parts.is_empty() {
                self.head_sent = true;
            }
            let sent = self.send_at_once(&first);
            self.write(&first[sent..]).await?;
            self.head_sent = true;
        }
        self.flush().await
    }

    /// Writes what it can of `data` on a new plain TCP connection at once, in one system
    /// call past tokio: tokio does no I/O on a socket it has just registered before its
    /// first readiness event, a turn of the loop away, though a connection made at once
    /// (see `upstream::connect`) takes the bytes now. How many went out: 0 for a pooled
    /// connection (tokio knows its state; its buffer may not be empty), TLS, or a socket
    /// that takes nothing now (an error is left for the write that follows to report).
    fn send_at_once(&self, data: &[u8]) -> usize {
        if self.reused {
            return 0;
        }
        let Some(tcp) = crate::net::tcp(&*self.stream) else {
            return 0;
        };
        SockRef::from(tcp.socket())
            .send_with_flags(data, libc::MSG_NOSIGNAL)
            .unwrap_or(0)
    }

    /// Writes a piece of the request body, framed; `last`: the body ends with it, and a
    /// chunked body's last chunk goes in the same write.
    pub async fn send_body(&mut self, data: &[u8], last: bool) -> Result<()> {
        if data.is_empty() {
            return if last {
                self.finish_body().await
            } else {
                Ok(())
            };
        }
        let mut size = [0u8; 18];
        let parts = self.frame(data, last, &mut size)?;
        self.send(&parts).await
    }

    /// Holds a piece of the request body, framed, with the request head, to go with what
    /// is sent next (or [`OriginConn::send_held`]): the request is then not sent again.
    pub fn hold_body(&mut self, data: &[u8]) -> Result<()> {
        let mut size = [0u8; 18];
        for part in self.frame(data, false, &mut size)? {
            self.held.extend_from_slice(part);
        }
        self.head_sent = true;
        Ok(())
    }

    /// Sends what is held of the request (its head, body pieces).
    pub async fn send_held(&mut self) -> Result<()> {
        self.send(&[]).await
    }

    /// The framed pieces of `data`, a piece of the request body (`last`: the body ends
    /// with it), the chunk-size line written into `size`; counts them off the framing.
    fn frame<'a>(
        &mut self,
        data: &'a [u8],
        last: bool,
        size: &'a mut [u8; 18],
    ) -> Result<[&'a [u8]; 3]> {
        match self.request {
            Framing::Length(left) => {
                let len = data.len() as u64;
                if len > left {
                    return Err(Error::explain(
                        ErrorType::InvalidHTTPHeader,
                        "the request body is longer than its Content-Length",
                    )
                    .into_down());
                }
                self.request = Framing::Length(left - len);
                Ok([data, b"", b""])
            }
            Framing::Chunked(_) => {
                let n = chunk_size_line(size, data.len());
                if last {
                    self.request = Framing::Done;
                    return Ok([&size[..n], data, b"\r\n0\r\n\r\n"]);
                }
                Ok([&size[..n], data, b"\r\n"])
            }
            _ => Err(Error::explain(
                ErrorType::InternalError,
                "a request body where the head announced none",
            )),
        }
    }

    /// Ends the request body: the last chunk of a chunked one; a body with a length must
    /// have been sent whole. What is held of the request goes now.
    pub async fn finish_body(&mut self) -> Result<()> {
        match self.request {
            Framing::Chunked(_) => self.send(&[b"0\r\n\r\n"]).await?,
            Framing::Length(0) | Framing::None | Framing::Done | Framing::UntilClose => {
                if !self.held.is_empty() {
                    self.send_held().await?;
                }
            }
            Framing::Length(left) => {
                return Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    format!("the client's request body ended {left} bytes early"),
                )
                .into_down())
            }
        }
        self.request = Framing::Done;
        Ok(())
    }

    /// Whether the response has no body left to read.
    pub fn body_done(&self) -> bool {
        matches!(self.response, Framing::None | Framing::Done)
    }

    /// Whether the request body has been sent whole.
    pub fn request_sent(&self) -> bool {
        matches!(self.request, Framing::None | Framing::Done)
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.stream
            .write_all(data)
            .await
            .or_err(ErrorType::WriteError, "writing the request to the origin")
            .map_err(|e| e.into_up())
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream
            .flush()
            .await
            .or_err(ErrorType::WriteError, "writing the request to the origin")
            .map_err(|e| e.into_up())
    }

    /// Reads more from the origin into the buffer; 0 at the end of the connection.
    async fn fill(&mut self) -> Result<usize> {
        let (n, ()) = self
            .read(|conn, cx| conn.poll_fill(cx).map_ok(|n| (n, ())))
            .await?;
        Ok(n)
    }

    /// One read from the origin, made by `poll`: how many bytes it read (0: the end of
    /// the connection) and what it made of them.
    async fn read<R>(
        &mut self,
        mut poll: impl FnMut(&mut Self, &mut Context<'_>) -> Poll<std::io::Result<(usize, R)>>,
    ) -> Result<(usize, R)> {
        let (n, made) = std::future::poll_fn(|cx| poll(self, cx))
            .await
            .or_err(ErrorType::ReadError, "reading from the origin")
            .map_err(|e| e.into_up())?;
        if n > 0 {
            self.answered = true;
        }
        Ok((n, made))
    }

    /// One read from the origin. Onto the stack ([`STACK_READ`] at most), whose bytes are
    /// then appended to `buf`, so that a connection waiting for its origin (a quiet event
    /// stream) holds no read buffer; but while the origin sends faster than it is read (a
    /// burst: the last read was full), straight into `buf` ([`READ`] at most), kept for it
    /// (its bytes are back in it once the client has had them), without the copy.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.full {
            self.buf.reserve(READ);
            let Poll::Ready(read) = poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
            else {
                // Nothing waiting after all: wait without the buffer.
                self.full = false;
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Poll::Pending;
            };
            let n = read?;
            self.full = n >= READ;
            return Poll::Ready(Ok(n));
        }
        self.poll_read_stack(cx, |conn, read| conn.buf.extend_from_slice(read))
            .map_ok(|(n, ())| n)
    }

    /// One read of up to [`STACK_READ`] bytes onto the stack, handed to `take`; how many
    /// were read (0: the end of the connection) and what `take` made of them.
    fn poll_read_stack<R>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut Self, &mut [u8]) -> R,
    ) -> Poll<std::io::Result<(usize, R)>> {
        let mut scratch = [MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut read = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.full = n == STACK_READ;
        Poll::Ready(Ok((n, take(self, read.filled_mut()))))
    }

    /// The next piece of a chunked body, nothing of it buffered: read onto the stack and
    /// decoded there, so that the payload is the only allocation (a quiet event stream's
    /// every event comes this way). What follows the payload (the start of the next chunk)
    /// is buffered. `None` when the read gave no payload; 0 bytes read: the end of the
    /// connection.
    async fn read_chunked(&mut self, state: ChunkState) -> Result<(usize, Option<Bytes>)> {
        let (n, data) = self
            .read(|conn, cx| {
                conn.poll_read_stack(cx, |conn, read| {
                    let (state, used, written) = decode_chunked(read, state)?;
                    conn.response = state.map_or(Framing::Done, Framing::Chunked);
                    conn.buf.extend_from_slice(&read[used..]);
                    Ok::<_, Box<Error>>(
                        (written > 0).then(|| Bytes::copy_from_slice(&read[..written])),
                    )
                })
            })
            .await?;
        Ok((n, data?))
    }

    /// Reads the final response head (informational answers other than `101` are skipped)
    /// and sets the body framing for `method`. Cancel-safe: what was read stays buffered.
    pub async fn read_head(&mut self, method: &Method) -> Result<ResponseHeader> {
        loop {
            if let Some((len, head)) = parse_head(&self.buf)? {
                self.buf.advance(len);
                let status = head.status.as_u16();
                if (100..200).contains(&status) && status != 101 {
                    continue;
                }
                self.response = response_framing(&head, method)?;
                self.keepalive = keeps_alive(&head);
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(framing_error(format!(
                    "the response head is larger than {MAX_HEAD} bytes"
                )));
            }
            if self.fill().await? == 0 {
                return Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    "the origin closed the connection before answering",
                )
                .into_up());
            }
        }
    }

    /// The next piece of the response body: everything that can be decoded from what is
    /// buffered, reading from the origin only when nothing can. `None` at the end of the
    /// body. Cancel-safe.
    pub async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.response == Framing::Done || self.response == Framing::None {
                self.response = Framing::Done;
                return Ok(None);
            }
            if let Some(data) = self.decode()? {
                if self.buf.is_empty() && !self.full {
                    // Let go of the allocation `data` came from, so it is freed with `data`.
                    self.buf = BytesMut::new();
                }
                return Ok(Some(data));
            }
            if self.response == Framing::Done {
                return Ok(None);
            }
            let read = match self.response {
                Framing::Chunked(state) if self.buf.is_empty() && !self.full => {
                    match self.read_chunked(state).await? {
                        (_, Some(data)) => return Ok(Some(data)),
                        (n, None) => n,
                    }
                }
                _ => self.fill().await?,
            };
            if read == 0 {
                return match self.response {
                    Framing::UntilClose => {
                        self.response = Framing::Done;
                        self.keepalive = false;
                        Ok(None)
                    }
                    _ => Err(Error::explain(
                        ErrorType::ConnectionClosed,
                        "the origin closed the connection before the end of the body",
                    )
                    .into_up()),
                };
            }
        }
    }

    /// Decodes what is buffered: `Some` payload when there is any.
    fn decode(&mut self) -> Result<Option<Bytes>> {
        // Nothing is, the usual case between two events.
        if self.buf.is_empty() {
            return Ok(None);
        }
        match self.response {
            Framing::Length(left) => {
                let take = left.min(self.buf.len() as u64) as usize;
                let data = self.buf.split_to(take).freeze();
                let left = left - take as u64;
                self.response = if left == 0 {
                    Framing::Done
                } else {
                    Framing::Length(left)
                };
                Ok(Some(data))
            }
            Framing::UntilClose => Ok(Some(self.buf.split().freeze())),
            Framing::Chunked(state) => {
                let (state, read, written) = decode_chunked(&mut self.buf, state)?;
                self.response = state.map_or(Framing::Done, Framing::Chunked);
                let data = self.buf.split_to(written).freeze();
                self.buf.advance(read - written);
                Ok((!data.is_empty()).then_some(data))
            }
            Framing::None | Framing::Done => Ok(None),
        }
    }

    /// The connection, to go back to the pool: only when the exchange ended cleanly.
    pub fn into_reusable(self) -> Option<Stream> {
        let clean = self.keepalive
            && self.response == Framing::Done
            && self.request_sent()
            && self.buf.is_empty();
        clean.then_some(self.stream)
    }

    /// The connection and what was read past the response head, for an upgraded (`101`)
    /// exchange whose bytes are relayed as they are.
    pub fn into_raw(self) -> (Stream, BytesMut) {
        (self.stream, self.buf)
    }
}

/// Writes the chunk-size line for a chunk of `len` bytes into `out`; returns its length.
pub(crate) fn chunk_size_line(out: &mut [u8; 18], len: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = HEX[(len >> shift) & 0xf];
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    digits + 2
}

/// Parses a response head at the start of `buf`: its length and the header, or `None`
/// when more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, ResponseHeader)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Room for the headers, left uninitialised: the parser writes those it finds.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(framing_error(format!("invalid response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    // Room for what the proxy and the chain add.
    let mut head = ResponseHeader::build_no_case(code, Some(resp.headers.len() + 8))
        .map_err(|e| framing_error(format!("invalid response status {code}: {e}")))?;
    head.set_version(match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    });
    if let Some(reason) = resp.reason.filter(|r| !r.is_empty()) {
        let _ = head.set_reason_phrase(Some(reason));
    }
    for h in resp.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| framing_error(format!("invalid header name `{}`", h.name)))?;
        let value = http::HeaderValue::from_bytes(h.value)
            .map_err(|_| framing_error(format!("invalid value of header `{}`", h.name)))?;
        head.append_header(name, value)?;
    }
    Ok(Some((len, head)))
}

/// How the response body of `head` (to a `method` request) is framed (RFC 9112 6.3).
fn response_framing(head: &ResponseHeader, method: &Method) -> Result<Framing> {
    let status = head.status.as_u16();
    if *method == Method::HEAD || status == 204 || status == 304 || status == 101 {
        return Ok(Framing::None);
    }
    let encodings: Vec<&[u8]> = head
        .headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
        .collect();
    if let Some(last) = encodings.last() {
        // Chunked last: chunked. Any other transfer coding: the body runs to the close.
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(ChunkState::Size)
        } else {
            Framing::UntilClose
        });
    }
    match content_length(head)? {
        Some(len) => Ok(if len == 0 {
            Framing::Done
        } else {
            Framing::Length(len)
        }),
        None => Ok(Framing::UntilClose),
    }
}

/// The `Content-Length` of `head`: one value (repeated equal values count as one).
fn content_length(head: &ResponseHeader) -> Result<Option<u64>> {
    let mut found: Option<u64> = None;
    for value in head.headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            let len = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| framing_error("the origin sent an invalid Content-Length"))?;
            if found.is_some_and(|f| f != len) {
                return Err(framing_error("the origin sent conflicting Content-Lengths"));
            }
            found = Some(len);
        }
    }
    Ok(found)
}

/// Whether the response lets the connection carry another request.
fn keeps_alive(head: &ResponseHeader) -> bool {
    let tokens = || {
        head.headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|t| t.trim_ascii())
    };
    if tokens().any(|t| t.eq_ignore_ascii_case(b"close")) {
        return false;
    }
    head.version == Version::HTTP_11 || tokens().any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
}

/// Decodes a chunked body in `buf` from `state`, moving the payload to the front of `buf`.
/// Returns the next state (`None`: the body ended), how many bytes of `buf` were read, and
/// how many payload bytes now stand at its front.
pub fn decode_chunked(
    buf: &mut [u8],
    mut state: ChunkState,
) -> Result<(Option<ChunkState>, usize, usize)> {
    let mut read = 0;
    let mut written = 0;
    loop {
        let rest = &buf[read..];
        match state {
            ChunkState::Size => {
                let (size, len) = match plain_chunk_size(rest) {
                    Some(plain) => plain,
                    None => {
                        let within = &rest[..rest.len().min(MAX_CHUNK_LINE + 1)];
                        let Some(lf) = memchr::memchr(b'\n', within) else {
                            if rest.len() > MAX_CHUNK_LINE {
                                return Err(framing_error("a chunk-size line is too long"));
                            }
                            return Ok((Some(state), read, written));
                        };
                        let line = rest[..lf]
                            .strip_suffix(b"\r")
                            .ok_or_else(|| framing_error("a chunk-size line without CRLF"))?;
                        (parse_chunk_size(line)?, lf + 1)
                    }
                };
                read += len;
                state = if size == 0 {
                    ChunkState::Trailers(0)
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(left) => {
                if rest.is_empty() {
                    return Ok((Some(state), read, written));
                }
                let take = left.min(rest.len() as u64) as usize;
                buf.copy_within(read..read + take, written);
                read += take;
                written += take;
                let left = left - take as u64;
                state = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                };
            }
            ChunkState::DataEnd => {
                if rest.len() < 2 {
                    if rest.first().is_some_and(|b| *b != b'\r') {
                        return Err(framing_error("chunk data not followed by CRLF"));
                    }
                    return Ok((Some(state), read, written));
                }
                if &rest[..2] != b"\r\n" {
                    return Err(framing_error("chunk data not followed by CRLF"));
                }
                read += 2;
                state = ChunkState::Size;
            }
            ChunkState::Trailers(seen) => {
                let Some(lf) = rest.iter().position(|b| *b == b'\n') else {
                    if seen + rest.len() > MAX_TRAILERS {
                        return Err(framing_error("the trailers are too long"));
                    }
                    return Ok((Some(state), read, written));
                };
                let line = &rest[..lf];
                read += lf + 1;
                if line == b"\r" || line.is_empty() {
                    return Ok((None, read, written));
                }
                let seen = seen + lf + 1;
                if seen > MAX_TRAILERS {
                    return Err(framing_error("the trailers are too long"));
                }
                state = ChunkState::Trailers(seen);
            }
        }
    }
}

/// The size of a chunk whose size line is the usual one, hex digits and CRLF, with the
/// line's length: read in one pass. `None` for any other line, or one not all here yet,
/// which [`parse_chunk_size`] then reads (or refuses).
fn plain_chunk_size(rest: &[u8]) -> Option<(u64, usize)> {
    let mut size = 0u64;
    for (i, &b) in rest.iter().enumerate().take(16) {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b'\r' if i > 0 && rest.get(i + 1) == Some(&b'\n') => return Some((size, i + 2)),
            _ => return None,
        };
        size = size << 4 | u64::from(digit);
    }
    None
}

/// A chunk-size line without its CRLF: hex digits, then optional extensions.
fn parse_chunk_size(line: &[u8]) -> Result<u64> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (hex, ext) = line.split_at(digits);
    if hex.is_empty() || hex.len() > 15 {
        return Err(framing_error("an invalid chunk size"));
    }
    let ext = ext.trim_ascii_start();
    if !ext.is_empty() && ext[0] != b';' {
        return Err(framing_error("an invalid chunk size"));
    }
    if ext.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return Err(framing_error("a control character in a chunk extension"));
    }
    let mut size = 0u64;
    for d in hex {
        let v = (*d as char).to_digit(16).unwrap_or(0) as u64;
        size = size * 16 + v;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::connect::testing::{loopback, plain as connect};

    /// On a connection just made, the request head goes out in the same turn (tokio alone
    /// would wait for the socket's first readiness event, a turn of the loop away); on a
    /// pooled one it goes through tokio as before.
    #[tokio::test]
    async fn a_new_connection_takes_the_request_head_at_once() {
        use futures_util::FutureExt as _;
        use tokio::io::AsyncReadExt as _;
        let (listener, target) = loopback().await;
        let request = RequestHeader::build("GET", b"/events", None).expect("request");
        let added = AddedHeaders::default();
        let mut conn = OriginConn::new(connect(&target).await, false);
        let sent = conn
            .send_head(&request, &added, Framing::None)
            .now_or_never();
        assert!(matches!(sent, Some(Ok(()))), "written in the same turn");
        let (mut origin, _) = listener.accept().await.expect("accept");
        let mut head = vec![0u8; 64];
        let n = origin.read(&mut head).await.expect("read");
        assert!(head[..n].starts_with(b"GET /events HTTP/1.1\r\n"));
        // A pooled connection is written through tokio.
        let mut pooled = OriginConn::new(connect(&target).await, true);
        assert_eq!(pooled.send_at_once(b"x"), 0);
        pooled
            .send_head(&request, &added, Framing::None)
            .await
            .expect("sent");
    }

    /// A `POST /chat` whose head says `body`, sent (held) on a new connection to the
    /// origin listening on `listener`, with the origin's side of it.
    async fn post_held(
        listener: &tokio::net::TcpListener,
        target: &pingora_core::protocols::l4::socket::SocketAddr,
        body: Framing,
    ) -> (OriginConn, tokio::net::TcpStream) {
        let mut request = RequestHeader::build("POST", b"/chat", None).expect("request");
        match body {
            Framing::Length(n) => request.insert_header("content-length", n.to_string()),
            _ => request.insert_header("transfer-encoding", "chunked"),
        }
        .expect("header");
        let mut conn = OriginConn::new(connect(target).await, false);
        let (origin, _) = listener.accept().await.expect("accept");
        conn.send_head(&request, &AddedHeaders::default(), body)
            .await
            .expect("held");
        (conn, origin)
    }

    /// A head with a body to follow goes out with the body's first bytes, in one write
    /// (and at once on a new connection), not before them: an origin that answers on the
    /// head and closes would reset the connection on the body's arrival. Chunked and
    /// with a length; a chunked body's end in the same write when it ends with the data,
    /// and alone with the head when it is empty.
    #[tokio::test]
    async fn a_head_with_a_body_goes_out_with_the_bodys_first_bytes() {
        use futures_util::FutureExt as _;
        use tokio::io::AsyncReadExt as _;
        let (listener, target) = loopback().await;
        // (framing, data, the body ends with it, how the one read at the origin ends)
        let cases: [(Framing, &[u8], bool, &str); 4] = [
            (Framing::Length(2), b"{}", false, "\r\n\r\n{}"),
            (
                Framing::Chunked(ChunkState::Size),
                b"{}",
                false,
                "\r\n\r\n2\r\n{}\r\n",
            ),
            (
                Framing::Chunked(ChunkState::Size),
                b"{}",
                true,
                "\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            ),
            (
                Framing::Chunked(ChunkState::Size),
                b"",
                true,
                "\r\n\r\n0\r\n\r\n",
            ),
        ];
        for (body, data, last, tail) in cases {
            let (mut conn, mut origin) = post_held(&listener, &target, body).await;
            assert!(!conn.head_sent, "nothing sent before the body");
            let sent = conn.send_body(data, last).now_or_never();
            assert!(matches!(sent, Some(Ok(()))), "written in the same turn");
            assert!(conn.head_sent);
            let mut got = vec![0u8; 1024];
            let n = origin.read(&mut got).await.expect("read");
            let got = String::from_utf8_lossy(&got[..n]);
            assert!(got.starts_with("POST /chat HTTP/1.1\r\n"), "{got}");
            assert!(
                got.ends_with(tail),
                "one read has the head and the body: {got:?}"
            );
        }
    }

    /// Body pieces held with the head go with what is sent next, each framed, in one
    /// write; once a piece is held the request counts as sent (it cannot be sent again).
    #[tokio::test]
    async fn held_body_pieces_go_with_the_next_write() {
        use tokio::io::AsyncReadExt as _;
        let (listener, target) = loopback().await;
        // (framing, what follows the held pieces, how the one read at the origin ends)
        for (body, end, tail) in [
            (
                Framing::Chunked(ChunkState::Size),
                None,
                "\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n",
            ),
            (Framing::Length(3), Some(&b"!"[..]), "\r\n\r\n{}!"),
        ] {
            let (mut conn, mut origin) = post_held(&listener, &target, body).await;
            conn.hold_body(b"{").expect("hold");
            assert!(conn.head_sent, "a held piece commits the request");
            conn.hold_body(b"}").expect("hold");
            match end {
                Some(data) => conn.send_body(data, true).await.expect("sent"),
                None => conn.finish_body().await.expect("sent"),
            }
            conn.finish_body().await.expect("whole");
            assert!(conn.request_sent());
            let mut got = vec![0u8; 1024];
            let n = origin.read(&mut got).await.expect("read");
            let got = String::from_utf8_lossy(&got[..n]);
            assert!(got.starts_with("POST /chat HTTP/1.1\r\n"), "{got}");
            assert!(got.ends_with(tail), "one read has it all: {got:?}");
        }
    }

    /// Feeds `wire` to the decoder in pieces cut at `cuts`, as an origin's bytes arrive:
    /// the payload, whether the body ended, and how many bytes came after its end.
    fn feed(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool, usize)> {
        let mut buf = BytesMut::new();
        let mut state = Some(ChunkState::Size);
        let mut out = Vec::new();
        let mut from = 0;
        for at in cuts.iter().copied().chain([wire.len()]) {
            let Some(s) = state else { break };
            let at = at.clamp(from, wire.len());
            buf.extend_from_slice(&wire[from..at]);
            from = at;
            let (next, read, written) = decode_chunked(&mut buf, s)?;
            out.extend_from_slice(&buf[..written]);
            buf.advance(read);
            state = next;
        }
        Ok((out, state.is_none(), buf.len() + wire.len() - from))
    }

    /// A burst (more than one read's worth waiting) is read whole and in order, straight
    /// into the connection's buffer; once the origin pauses, the connection waits holding
    /// no read buffer, as a quiet stream's does.
    #[tokio::test]
    async fn a_burst_is_read_whole_and_a_wait_after_it_holds_no_buffer() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let events: Vec<u8> = (0..2_000)
            .flat_map(|i| format!("id: {i}\ndata: {}\n\n", "x".repeat(100)).into_bytes())
            .collect();
        let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                         transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        for chunk in events.chunks(700) {
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        let (hold, held) = tokio::sync::oneshot::channel::<()>();
        let (sent, written) = tokio::sync::oneshot::channel::<()>();
        let origin = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.write_all(&wire).await.expect("write");
            let _ = sent.send(());
            // The body is not over: the connection stays open and quiet.
            let _ = held.await;
        });
        // Room for the whole burst on the proxy's side, which reads only once all is there.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(1 << 20).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        written.await.expect("the origin wrote");
        let mut conn = OriginConn::new(
            Box::new(pingora_core::protocols::l4::stream::Stream::from(stream)),
            false,
        );
        conn.read_head(&Method::GET).await.expect("head");
        let mut body = Vec::new();
        let mut bursting = false;
        while body.len() < events.len() {
            let data = conn.read_body().await.expect("read").expect("data");
            body.extend_from_slice(&data);
            bursting |= conn.full;
        }
        assert_eq!(body, events);
        assert!(bursting, "some read took all it could");
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), conn.read_body()).await;
        assert!(waiting.is_err(), "the origin sent nothing more");
        assert_eq!(conn.buf.capacity(), 0, "a wait holds no read buffer");
        drop(hold);
        origin.await.expect("origin");
    }

    /// A quiet stream's chunks, each read and decoded on the stack: payloads whole and in
    /// order whatever a read ends on (a size line cut, the next chunk begun, the last chunk
    /// with the payload), no read buffer held between them, and the connection reusable
    /// after the last chunk.
    #[tokio::test]
    async fn quiet_chunks_are_decoded_as_they_come_holding_no_buffer() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pieces: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              transfer-encoding: chunked\r\n\r\n",
            b"d\r\ndata: hello\n\n\r\n",
            b"6\r\ndata: \r\n7\r\nworld\n\n",
            b"\r\n1",
            b"0\r\ndata: 01234567\n\n\r\n",
            b"6\r\ndata: \r\n4\r\nend\n\r\n0\r\n\r\n",
        ];
        let (next, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
        let origin = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.set_nodelay(true).expect("nodelay");
            for piece in pieces {
                s.write_all(piece).await.expect("write");
                // The next piece once the proxy has read this one (or a while, for a
                // piece that gives it nothing to return).
                let _ =
                    tokio::time::timeout(std::time::Duration::from_millis(100), asked.recv()).await;
            }
            let mut rest = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest).await;
        });
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut conn = OriginConn::new(
            Box::new(pingora_core::protocols::l4::stream::Stream::from(stream)),
            false,
        );
        conn.keepalive = true;
        conn.read_head(&Method::GET).await.expect("head");
        let _ = next.send(());
        let mut body = Vec::new();
        while let Some(data) = conn.read_body().await.expect("read") {
            body.extend_from_slice(&data);
            assert_eq!(conn.buf.capacity(), 0, "no read buffer held between chunks");
            let _ = next.send(());
        }
        assert_eq!(
            body,
            b"data: hello\n\ndata: world\n\ndata: 01234567\n\ndata: end\n".as_slice()
        );
        assert!(conn.into_reusable().is_some(), "the body ended cleanly");
        origin.abort();
    }

    fn decode_all(wire: &[u8], split: usize) -> Result<Vec<u8>> {
        let (out, ended, after) = feed(wire, &[split])?;
        assert!(ended && after == 0, "the body ended where the wire did");
        Ok(out)
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut out = [0u8; 18];
        for (len, line) in [
            (0, "0\r\n"),
            (5, "5\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
        ] {
            let n = chunk_size_line(&mut out, len);
            assert_eq!(&out[..n], line.as_bytes());
        }
    }

    #[test]
    fn the_usual_size_line_is_read_as_the_general_reader_reads_it() {
        for line in [
            "0\r\n",
            "1f4\r\n",
            "1F4\r\n",
            "fffffffffffffff\r\n",
            "ffffffffffffffff\r\n",
            "\r\n",
            "1f4;x=y\r\n",
            "1f4 \r\n",
            "1f4\n",
            "1f4\r",
            "1f4\rx",
            "g\r\n",
            "1f4",
        ] {
            let line = line.as_bytes();
            let general = line
                .strip_suffix(b"\r\n")
                .and_then(|l| parse_chunk_size(l).ok());
            match plain_chunk_size(line) {
                Some((size, len)) => {
                    assert_eq!(Some(size), general, "{line:?}");
                    assert_eq!(len, line.len(), "{line:?}");
                }
                // Left to the general reader: anything but digits and CRLF, or too long.
                None => assert!(
                    general.is_none() || line.contains(&b';') || line.contains(&b' '),
                    "{line:?}"
                ),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 0..=wire.len() {
            assert_eq!(
                decode_all(wire, split).expect("decodes"),
                b"hello world!",
                "split at {split}"
            );
        }
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        for wire in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"zz\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            assert!(decode_all(wire, wire.len()).is_err(), "{:?}", wire);
        }
    }

    #[test]
    fn response_framing_follows_the_rules() {
        let head = |lines: &[(&str, &str)], status: u16| {
            let mut h = ResponseHeader::build_no_case(status, None).expect("head");
            for (k, v) in lines {
                h.append_header(k.to_string(), *v).expect("header");
            }
            h
        };
        let get = Method::GET;
        assert_eq!(
            response_framing(&head(&[("content-length", "5")], 200), &get).ok(),
            Some(Framing::Length(5))
        );
        assert_eq!(
            response_framing(&head(&[("content-length", "5, 5")], 200), &get).ok(),
            Some(Framing::Length(5))
        );
        assert!(response_framing(&head(&[("content-length", "5, 6")], 200), &get).is_err());
        assert!(response_framing(&head(&[("content-length", "-1")], 200), &get).is_err());
        assert_eq!(
            response_framing(
                &head(
                    &[
                        ("transfer-encoding", "gzip, chunked"),
                        ("content-length", "9")
                    ],
                    200
                ),
                &get
            )
            .ok(),
            Some(Framing::Chunked(ChunkState::Size))
        );
        assert_eq!(
            response_framing(&head(&[("transfer-encoding", "gzip")], 200), &get).ok(),
            Some(Framing::UntilClose)
        );
        assert_eq!(
            response_framing(&head(&[], 200), &get).ok(),
            Some(Framing::UntilClose)
        );
        assert_eq!(
            response_framing(&head(&[("content-length", "5")], 200), &Method::HEAD).ok(),
            Some(Framing::None)
        );
        assert_eq!(
            response_framing(&head(&[], 304), &get).ok(),
            Some(Framing::None)
        );
    }

    #[test]
    fn heads_parse_strictly() {
        let (len, head) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody")
            .expect("parses")
            .expect("complete");
        assert_eq!(len, 45);
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["content-type"], "text/plain");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent")
            .expect("ok")
            .is_none());
    }

    // --- Properties -------------------------------------------------------------------

    use proptest::prelude::*;

    /// How a body is chunked: chunk sizes (cycled), a chunk extension for some chunks,
    /// hex digits in upper case, leading zeros, trailers.
    #[derive(Debug, Clone)]
    struct Chunking {
        sizes: Vec<usize>,
        extensions: Vec<Option<&'static str>>,
        upper: bool,
        zeros: usize,
        trailers: Vec<String>,
    }

    fn chunking() -> impl Strategy<Value = Chunking> {
        let extension = proptest::option::of(prop::sample::select(vec![
            ";a=b",
            ";x",
            ";q=\"v w\"",
            " ;a=1",
            "\t;t",
            ";a=1;b=2",
        ]));
        (
            proptest::collection::vec(1..700usize, 1..12),
            proptest::collection::vec(extension, 1..6),
            any::<bool>(),
            0..3usize,
            proptest::collection::vec("x-[a-z]{1,8}: [ -~]{0,20}", 0..3),
        )
            .prop_map(|(sizes, extensions, upper, zeros, trailers)| Chunking {
                sizes,
                extensions,
                upper,
                zeros,
                trailers,
            })
    }

    /// `body` chunked as `how` says.
    fn encode(body: &[u8], how: &Chunking) -> Vec<u8> {
        let mut wire = Vec::new();
        let line = |wire: &mut Vec<u8>, size: usize, i: usize| {
            let hex = format!("{}{size:x}", "0".repeat(how.zeros));
            let hex = if how.upper {
                hex.to_ascii_uppercase()
            } else {
                hex
            };
            wire.extend_from_slice(hex.as_bytes());
            if let Some(ext) = how.extensions[i % how.extensions.len()] {
                wire.extend_from_slice(ext.as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
        };
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let size = how.sizes[i % how.sizes.len()].min(rest.len());
            line(&mut wire, size, i);
            wire.extend_from_slice(&rest[..size]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[size..];
            i += 1;
        }
        line(&mut wire, 0, i);
        for trailer in &how.trailers {
            wire.extend_from_slice(trailer.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        wire
    }

    /// Up to 8 places to cut a wire of any length.
    fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
        proptest::collection::vec(any::<prop::sample::Index>(), 0..8)
    }

    fn positions(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
        at.sort_unstable();
        at
    }

    proptest! {
        #[test]
        fn prop_chunked_bodies_decode_whole_however_they_arrive(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            how in chunking(),
            after in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in cuts(),
        ) {
            let mut wire = encode(&body, &how);
            wire.extend_from_slice(&after);
            let (out, ended, left) = feed(&wire, &positions(&cuts, wire.len()))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(out, body);
            prop_assert!(ended);
            prop_assert_eq!(left, after.len(), "the decoder stops at the body's end");
        }

        #[test]
        fn prop_chunked_garbage_never_panics_nor_yields_more_than_it_got(
            wire in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..600),
                "[0-9a-fA-F;= \t\r\nxX\"]{0,300}".prop_map(String::into_bytes),
            ],
            cuts in cuts(),
        ) {
            if let Ok((out, _, _)) = feed(&wire, &positions(&cuts, wire.len())) {
                prop_assert!(out.len() <= wire.len());
            }
        }

        #[test]
        fn prop_damaged_chunked_bodies_never_panic_nor_yield_more_than_they_got(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            how in chunking(),
            damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cuts in cuts(),
        ) {
            let mut wire = encode(&body, &how);
            for (at, byte) in &damage {
                let at = at.index(wire.len());
                wire[at] = *byte;
            }
            if let Ok((out, _, _)) = feed(&wire, &positions(&cuts, wire.len())) {
                prop_assert!(out.len() <= wire.len());
            }
        }
    }
}
