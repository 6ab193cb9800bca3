//! An origin that keeps every byte it is sent and reads requests strictly (RFC 9112 with no
//! leniency: CRLF line ends, one `Host`, one framing header with one canonical value, a
//! well-formed chunked body), and a client that speaks raw bytes to the proxy.
//!
//! The origin serves one connection at a time, in the order they were opened, and closes
//! each after its answer: whatever it recorded before a request is then complete when that
//! request is seen (see [`RawOrigin::until`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::guard;

/// A request as the origin read it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended where its framing said (false: the connection closed before).
    pub complete: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::header(&self.headers, name)
    }
}

/// What arrived for one request: its bytes, and the request, or why it is not well-formed.
#[derive(Debug, Clone)]
pub struct Seen {
    pub raw: Vec<u8>,
    pub request: Result<Request, String>,
}

pub struct RawOrigin {
    pub addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl RawOrigin {
    pub async fn start() -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (raw, request) = read_request(&mut conn).await;
                if raw.is_empty() {
                    continue;
                }
                if request.is_ok() {
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                }
                let _ = tx.send(Seen { raw, request });
            }
        });
        RawOrigin { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything seen up to and including the first request for `target`.
    pub async fn until(&mut self, target: &str) -> Vec<Seen> {
        let mut all = Vec::new();
        loop {
            let seen = guard("the origin to see a request", self.seen.recv())
                .await
                .expect("origin channel");
            let done = seen.request.as_ref().is_ok_and(|r| r.target == target);
            all.push(seen);
            if done {
                return all;
            }
        }
    }
}

/// Reads one request off `conn`, strictly: what arrived, and the request or what is wrong.
async fn read_request(conn: &mut TcpStream) -> (Vec<u8>, Result<Request, String>) {
    let mut raw = Vec::new();
    let head = loop {
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&raw) {
            Ok(httparse::Status::Complete(len)) => {
                break head_of(&req, &raw[..len]).map(|h| (h, len))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => break Err(format!("unparseable head: {e}")),
        }
        if read_more(conn, &mut raw).await == 0 {
            let why = "closed before the end of the head".to_string();
            return (raw, Err(why));
        }
    };
    let (mut request, len) = match head {
        Ok(head) => head,
        Err(e) => return (raw, Err(e)),
    };
    let framing = match framing(&request) {
        Ok(framing) => framing,
        Err(e) => return (raw, Err(e)),
    };
    let mut at = len;
    request.complete = match framing {
        None => true,
        Some(Framing::Length(n)) => loop {
            if raw.len() >= at + n {
                request.body = raw[at..at + n].to_vec();
                at += n;
                break true;
            }
            if read_more(conn, &mut raw).await == 0 {
                request.body = raw[at..].to_vec();
                at = raw.len();
                break false;
            }
        },
        Some(Framing::Chunked) => loop {
            match chunked(&raw[at..]) {
                Ok(Some((used, body))) => {
                    request.body = body;
                    at += used;
                    break true;
                }
                Ok(None) => {}
                Err(e) => return (raw, Err(e)),
            }
            if read_more(conn, &mut raw).await == 0 {
                break false;
            }
        },
    };
    if request.complete && at != raw.len() {
        return (raw, Err("bytes after the request".into()));
    }
    (raw, Ok(request))
}

async fn read_more(conn: &mut TcpStream, raw: &mut Vec<u8>) -> usize {
    let mut buf = [0u8; 8192];
    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
        Ok(Ok(n)) => {
            raw.extend_from_slice(&buf[..n]);
            n
        }
        _ => 0,
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

fn head_of(req: &httparse::Request<'_, '_>, head: &[u8]) -> Result<Request, String> {
    if head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') || head.first() == Some(&b'\n') {
        return Err("a line ends with a bare LF".into());
    }
    if req.version != Some(1) {
        return Err(format!("version {:?}, not HTTP/1.1", req.version));
    }
    let target = req.path.unwrap_or_default().to_string();
    if !target.starts_with('/') {
        return Err(format!("target `{target}` is not origin-form"));
    }
    let mut headers = Vec::new();
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| "a header value is not UTF-8")?;
        headers.push((h.name.to_string(), value.to_string()));
    }
    let hosts = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
        .count();
    if hosts != 1 {
        return Err(format!("{hosts} Host headers"));
    }
    Ok(Request {
        method: req.method.unwrap_or_default().to_string(),
        target,
        headers,
        body: Vec::new(),
        complete: false,
    })
}

/// The body's framing: one `Content-Length` line with a canonical number, or one
/// `Transfer-Encoding: chunked`, never both.
fn framing(request: &Request) -> Result<Option<Framing>, String> {
    let all = |name: &str| -> Vec<&str> {
        request
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    match (
        all("content-length").as_slice(),
        all("transfer-encoding").as_slice(),
    ) {
        ([], []) => Ok(None),
        ([len], []) => {
            let canonical = !len.is_empty()
                && len.bytes().all(|b| b.is_ascii_digit())
                && (len.len() == 1 || !len.starts_with('0'));
            match len.parse() {
                Ok(n) if canonical => Ok(Some(Framing::Length(n))),
                _ => Err(format!(
                    "Content-Length `{len}` is not one canonical number"
                )),
            }
        }
        ([], ["chunked"]) => Ok(Some(Framing::Chunked)),
        (cl, te) => Err(format!(
            "framing: Content-Length {cl:?}, Transfer-Encoding {te:?}"
        )),
    }
}

/// A whole chunked body at the start of `wire`: the bytes it takes and its payload;
/// `None` when more bytes are needed. Strict: lower- or upper-case hex sizes, no
/// extensions, no trailers, CRLF everywhere.
fn chunked(wire: &[u8]) -> Result<Option<(usize, Vec<u8>)>, String> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let Some(end) = wire[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&wire[at..at + end]).map_err(|_| "a chunk size is not text")?;
        let size = usize::from_str_radix(line, 16).map_err(|_| format!("chunk size `{line}`"))?;
        at += end + 2;
        if size == 0 {
            return match wire.get(at..at + 2) {
                None | Some([b'\r']) => Ok(None),
                Some(b"\r\n") => Ok(Some((at + 2, body))),
                Some(_) => Err("trailers or garbage after the last chunk".into()),
            };
        }
        if wire.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&wire[at..at + size]);
        if &wire[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

/// Sends `bytes` to the proxy on a new connection and reads until the proxy closes it:
/// the status of the first answer (0 when none came) and everything read.
pub async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut conn = TcpStream::connect(proxy).await.expect("connect");
    conn.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = guard(
        "the proxy to answer and close",
        conn.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    (status_of(&answer), answer)
}

/// The status of an HTTP/1.1 answer's first line; 0 when there is none.
pub fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}
