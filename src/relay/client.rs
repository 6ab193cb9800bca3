//! The client side of an event stream: the client's Pingora session, or, for a stream
//! carried in a task of its own, the client's HTTP/1.1 connection itself.
//!
//! A long-lived `GET` stream over HTTP/1.1 keeps nothing of Pingora's session once its
//! response head is out (not the 4 KiB request buffer, the parsed request, the copy of the
//! response head): [`Raw`] frames the body (chunked) on the connection directly and watches
//! it for the client going away, and the few request facts the logs need are copied out.

use std::io::IoSlice;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, REFERER, USER_AGENT};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::RequestHeader;
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

/// The client's HTTP/1.1 connection, its response head sent, its body chunked here.
pub struct Raw {
    stream: Stream,
    write_timeout: Option<Duration>,
    /// Body bytes sent (without the framing), for the logs.
    pub sent: usize,
}

impl Raw {
    /// Takes the connection out of an HTTP/1.1 session whose (chunked) response head was
    /// written; `None` for other sessions, which stay as they are.
    pub fn take(
        session: Box<ServerSession>,
        write_timeout: Option<Duration>,
    ) -> Result<Raw, Box<ServerSession>> {
        match *session {
            ServerSession::H1(v1) => Ok(Raw {
                sent: v1.body_bytes_sent(),
                stream: v1.into_inner(),
                write_timeout,
            }),
            other => Err(Box::new(other)),
        }
    }

    async fn write(&mut self, body: Option<Bytes>, end: bool) -> Result<()> {
        let written = async {
            if let Some(data) = body.filter(|d| !d.is_empty()) {
                let mut head = [0u8; 18];
                let n = super::origin::chunk_size_line(&mut head, data.len());
                write_all(&mut self.stream, [&head[..n], &data, b"\r\n"]).await?;
                self.sent += data.len();
            }
            if end {
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

/// Writes every byte of `parts` (a chunk's size line, data and end), in as few writes as
/// the connection takes.
async fn write_all(stream: &mut Stream, parts: [&[u8]; 3]) -> std::io::Result<()> {
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
