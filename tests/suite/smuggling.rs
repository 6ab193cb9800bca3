//! The smuggling and parsing table: requests that proxies and origins have read differently
//! (conflicting framing, odd transfer codings, bare line feeds, folded or poisoned header
//! values, huge chunk sizes, absolute-form targets, connection-specific headers over
//! HTTP/2), each sent raw to one proxy in front of an origin that keeps every byte it gets
//! and reads requests strictly.
//!
//! Each row ends one of three ways, and says which: refused before the origin was
//! contacted (the origin saw nothing); the origin saw exactly one well-formed request
//! (strict parse: CRLF, one Host, one canonical Content-Length or `chunked`, origin-form
//! target); or, for a body whose framing breaks after the head went on, the client got a
//! 4xx and the origin saw at most that one head with a body that never reached its end
//! (the connection was closed), never anything it could take for a request of its own.
//! README's table shows the outcome of every row.

use crate::common;

use std::net::SocketAddr;

use common::raw::{exchange, RawOrigin, Request, Seen};
use common::{guard, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a row must come to.
enum Expect {
    /// Refused with a 4xx (over HTTP/2 also a reset stream or connection), the origin
    /// contacted not at all.
    Refused,
    /// Refused with exactly this status.
    Status(u16),
    /// Exactly one well-formed, complete request at the origin, as `check` wants it.
    One(fn(&Request) -> Result<(), String>),
    /// The client got a 4xx; the origin saw at most one well-formed head whose body the
    /// proxy cut (closed) before its end.
    Cut,
}

/// How a row is sent.
enum Send {
    Http1(Vec<u8>),
    /// An HTTP/2 HEADERS block (pseudo-headers first), with END_STREAM.
    Http2(Vec<(&'static str, &'static str)>),
}

struct Row {
    name: &'static str,
    send: Send,
    expect: Expect,
}

fn h1(name: &'static str, bytes: &[u8], expect: Expect) -> Row {
    Row {
        name,
        send: Send::Http1(bytes.to_vec()),
        expect,
    }
}

fn h2(name: &'static str, extra: &[(&'static str, &'static str)], expect: Expect) -> Row {
    let mut headers = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/h2"),
        (":authority", "a.example"),
    ];
    for (name, value) in extra {
        match headers.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => headers.push((name, value)),
        }
    }
    Row {
        name,
        send: Send::Http2(headers),
        expect,
    }
}

fn body_hello(r: &Request) -> Result<(), String> {
    expect_eq("body", &String::from_utf8_lossy(&r.body), "hello")
}

fn length_5(r: &Request) -> Result<(), String> {
    expect_eq(
        "content-length",
        r.header("content-length").unwrap_or("-"),
        "5",
    )?;
    body_hello(r)
}

fn expect_eq(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: `{got}`, wanted `{want}`"))
    }
}

fn rows() -> Vec<Row> {
    use Expect::*;
    let chunked_hello = "5\r\nhello\r\n0\r\n\r\n";
    let post = |headers: &str, body: &str| {
        format!("POST /p HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n{headers}\r\n{body}")
            .into_bytes()
    };
    // (name, header lines, body) of a POST that asks for the connection to close.
    #[rustfmt::skip]
    let posts = [
        ("te_chunked_identity", "Transfer-Encoding: chunked, identity\r\n", chunked_hello, Refused),
        ("te_leading_space", "Transfer-Encoding:  chunked\r\n", chunked_hello, One(body_hello)),
        ("te_xchunked", "Transfer-Encoding: xchunked\r\n", chunked_hello, Refused),
        ("te_duplicate_lines", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", chunked_hello, One(body_hello)),
        ("te_identity_then_chunked_lines", "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", chunked_hello, One(body_hello)),
        ("cl_duplicate_equal_lines", "Content-Length: 5\r\nContent-Length: 5\r\n", "hello", One(length_5)),
        ("cl_equal_list", "Content-Length: 5, 5\r\n", "hello", One(length_5)),
        ("cl_leading_zeros", "Content-Length: 005\r\n", "hello", One(length_5)),
        ("cl_conflicting_lines", "Content-Length: 5\r\nContent-Length: 6\r\n", "hello!", Refused),
        ("cl_conflicting_list", "Content-Length: 5, 6\r\n", "hello!", Refused),
        ("cl_negative", "Content-Length: -5\r\n", "hello", Refused),
        ("cl_plus_sign", "Content-Length: +5\r\n", "hello", Refused),
        ("cl_too_large", "Content-Length: 99999999999999999999999\r\n", "hello", Refused),
        ("huge_chunk_size", "Transfer-Encoding: chunked\r\n", "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n", Cut),
        ("chunk_size_with_garbage", "Transfer-Encoding: chunked\r\n", "5x\r\nhello\r\n0\r\n\r\n", Cut),
    ];
    let mut rows: Vec<Row> = posts
        .into_iter()
        .map(|(name, headers, body, expect)| h1(name, &post(headers, body), expect))
        .collect();
    rows.extend([
        h1(
            "cl_and_te",
            format!(
                "POST /p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{chunked_hello}\
                 GET /smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n"
            )
            .as_bytes(),
            One(body_hello),
        ),
        h1(
            "te_and_cl",
            format!(
                "POST /p HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\
                 Content-Length: 40\r\n\r\n{chunked_hello}\
                 GET /smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n"
            )
            .as_bytes(),
            One(body_hello),
        ),
        h1(
            "te_in_http10",
            format!(
                "POST /p HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {chunked_hello}"
            )
            .as_bytes(),
            Refused,
        ),
        h1(
            "bare_lf_line_ends",
            b"GET /lf HTTP/1.1\nHost: a.example\nConnection: close\n\n",
            One(|r| expect_eq("target", &r.target, "/lf")),
        ),
        h1(
            "obs_fold",
            b"GET /p HTTP/1.1\r\nHost: a.example\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n",
            Refused,
        ),
        h1(
            "nul_in_header_value",
            b"GET /p HTTP/1.1\r\nHost: a.example\r\nX-A: a\0b\r\nConnection: close\r\n\r\n",
            Refused,
        ),
        h1(
            "cr_in_header_value",
            b"GET /p HTTP/1.1\r\nHost: a.example\r\nX-A: a\rb\r\nConnection: close\r\n\r\n",
            Refused,
        ),
        h1(
            "space_before_colon",
            b"GET /p HTTP/1.1\r\nHost: a.example\r\nContent-Length : 5\r\nConnection: close\r\n\r\nhello",
            Refused,
        ),
        h1(
            "absolute_form",
            b"GET http://a.example/abs?q=1 HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            One(|r| {
                expect_eq("target", &r.target, "/abs?q=1")?;
                expect_eq("host", r.header("host").unwrap_or("-"), "a.example")
            }),
        ),
        h1(
            "absolute_form_host_mismatch",
            b"GET http://b.example/abs HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            Status(400),
        ),
        h1(
            "absolute_form_http10_without_host",
            b"GET http://b.example/abs HTTP/1.0\r\n\r\n",
            One(|r| {
                expect_eq("target", &r.target, "/abs")?;
                expect_eq("host", r.header("host").unwrap_or("-"), "b.example")
            }),
        ),
        h1(
            "http10_without_host",
            // Longer than the HTTP/2 preface: an h2c listener waits for 24 bytes to tell.
            b"GET /old HTTP/1.0\r\nUser-Agent: p\r\n\r\n",
            One(|r| {
                expect_eq("target", &r.target, "/old")?;
                let host = r.header("host").unwrap_or("-");
                match host.strip_prefix("127.0.0.1:") {
                    Some(_) => Ok(()),
                    None => Err(format!("host `{host}`, wanted the service URL's")),
                }
            }),
        ),
        h1(
            "no_host",
            b"GET /p HTTP/1.1\r\nConnection: close\r\n\r\n",
            Status(400),
        ),
        h1(
            "host_not_a_host",
            b"GET /p HTTP/1.1\r\nHost: a b@c.example\r\nConnection: close\r\n\r\n",
            Status(400),
        ),
        h1(
            "two_hosts",
            b"GET /p HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
            Status(400),
        ),
        h1(
            "extra_spaces_in_request_line",
            b"GET  /p HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            Status(400),
        ),
        h1(
            "extra_space_before_version",
            b"GET /p  HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            One(|r| expect_eq("target", &r.target, "/p%20")),
        ),
        h1(
            "connection_named_header",
            b"GET /p HTTP/1.1\r\nHost: a.example\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n",
            One(|r| match r.header("x-secret") {
                None => Ok(()),
                Some(v) => Err(format!("x-secret: {v} reached the origin")),
            }),
        ),
        h2(
            "h2_plain",
            &[(":path", "/h2?q=1")],
            One(|r| {
                expect_eq("target", &r.target, "/h2?q=1")?;
                expect_eq("host", r.header("host").unwrap_or("-"), "a.example")
            }),
        ),
        h2("h2_connection", &[("connection", "close")], Refused),
        h2("h2_transfer_encoding", &[("transfer-encoding", "chunked")], Refused),
        h2("h2_keep_alive", &[("keep-alive", "timeout=5")], Refused),
        h2("h2_upgrade", &[("upgrade", "websocket")], Refused),
        h2("h2_proxy_connection", &[("proxy-connection", "close")], Refused),
        h2("h2_te_gzip", &[("te", "gzip")], Refused),
        h2(
            "h2_te_trailers",
            &[("te", "trailers")],
            One(|r| match r.header("te") {
                None => Ok(()),
                Some(v) => Err(format!("te: {v} reached the origin")),
            }),
        ),
        h2("h2_cr_in_value", &[("x-a", "a\rb")], Refused),
        h2("h2_lf_in_value", &[("x-a", "a\nx-injected: 1")], Refused),
        h2("h2_crlf_in_value", &[("x-a", "a\r\nx-injected: 1")], Refused),
        h2("h2_nul_in_value", &[("x-a", "a\0b")], Refused),
        h2("h2_crlf_in_path", &[(":path", "/h2\r\nx-injected: 1")], Refused),
        h2("h2_host_differs_from_authority", &[("host", "b.example")], Status(400)),
        h2("h2_dot_segment", &[(":path", "/a/../h2")], Status(400)),
    ]);
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn the_smuggling_and_parsing_table() {
    let mut origin = RawOrigin::start().await;
    let proxy = Proxy::start_h2c(&format!(
        "services:\n  web:\n    url: \"{}\"\nhost_rules:\n  - pattern: \"*\"\n    target: web\n",
        origin.url()
    ))
    .await;
    let mut failures = Vec::new();
    for (i, row) in rows().into_iter().enumerate() {
        let outcome = match &row.send {
            Send::Http1(bytes) => Outcome::Status(exchange(proxy.addr, bytes).await.0),
            Send::Http2(headers) => h2_exchange(proxy.addr, headers).await,
        };
        // A request after the row, on a new connection: the origin serves connections one
        // at a time, so what it saw before this one is all the row made it see.
        let sentinel = format!("/sentinel/{i}");
        let probe = format!("GET {sentinel} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
        let (status, _) = exchange(proxy.addr, probe.as_bytes()).await;
        assert_eq!(status, 200, "the sentinel after {}", row.name);
        let mut seen = origin.until(&sentinel).await;
        seen.pop();
        if let Err(why) = judge(&row.expect, &outcome, &seen) {
            failures.push(format!(
                "{}: {why}\n  outcome: {outcome:?}\n  origin saw: {:?}",
                row.name,
                seen.iter()
                    .map(|s| String::from_utf8_lossy(&s.raw).into_owned())
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "rows failed:\n{}", failures.join("\n"));
}

fn judge(expect: &Expect, outcome: &Outcome, seen: &[Seen]) -> Result<(), String> {
    let refused = match outcome {
        Outcome::Status(code) => (400..500).contains(code),
        Outcome::Reset(_) | Outcome::GoAway(_) => true,
        Outcome::Closed => false,
    };
    match expect {
        Expect::Refused | Expect::Status(_) => {
            if let (Expect::Status(want), Outcome::Status(got)) = (expect, outcome) {
                if want != got {
                    return Err(format!("status {got}, wanted {want}"));
                }
            }
            if !refused {
                return Err("not refused".into());
            }
            if !seen.is_empty() {
                return Err(format!("the origin saw {} requests", seen.len()));
            }
        }
        Expect::One(check) => {
            if *outcome != Outcome::Status(200) {
                return Err("not answered 200".into());
            }
            let [one] = seen else {
                return Err(format!("the origin saw {} requests", seen.len()));
            };
            let request = one
                .request
                .as_ref()
                .map_err(|e| format!("malformed: {e}"))?;
            if !request.complete {
                return Err("the body was cut".into());
            }
            check(request)?;
        }
        Expect::Cut => {
            if !refused {
                return Err("not answered with a 4xx".into());
            }
            match seen {
                [] => {}
                [one] => {
                    let request = one
                        .request
                        .as_ref()
                        .map_err(|e| format!("malformed: {e}"))?;
                    if request.complete {
                        return Err("the origin saw a whole request".into());
                    }
                }
                more => return Err(format!("the origin saw {} requests", more.len())),
            }
        }
    }
    Ok(())
}

/// How an exchange ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// An answer with this status (0: the connection closed without one, over HTTP/1.1).
    Status(u16),
    /// HTTP/2: the stream was reset with this error code.
    Reset(u32),
    /// HTTP/2: the connection was ended with this error code.
    GoAway(u32),
    /// HTTP/2: the connection closed without a word.
    Closed,
}

/// Sends one HTTP/2 request (prior knowledge) as raw frames, so that headers an HTTP/2
/// client library refuses to send can be sent: each header a literal without indexing or
/// Huffman coding.
async fn h2_exchange(proxy: SocketAddr, headers: &[(&str, &str)]) -> Outcome {
    let mut conn = TcpStream::connect(proxy).await.expect("connect");
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0);
        hpack_string(&mut block, name.as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&frame(0x4, 0, 0, &[]));
    // END_STREAM | END_HEADERS on stream 1.
    out.extend_from_slice(&frame(0x1, 0x5, 1, &block));
    conn.write_all(&out).await.expect("write");
    guard("an HTTP/2 answer", async {
        loop {
            let mut head = [0u8; 9];
            if conn.read_exact(&mut head).await.is_err() {
                return Outcome::Closed;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if conn.read_exact(&mut payload).await.is_err() {
                return Outcome::Closed;
            }
            let code = |at: usize| {
                payload
                    .get(at..at + 4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            };
            match kind {
                0x4 if flags & 0x1 == 0 => {
                    let _ = conn.write_all(&frame(0x4, 0x1, 0, &[])).await;
                }
                0x1 if stream == 1 => return Outcome::Status(status(&payload, flags)),
                0x3 if stream == 1 => return Outcome::Reset(code(0)),
                0x7 => return Outcome::GoAway(code(4)),
                _ => {}
            }
        }
    })
    .await
}

/// One HTTP/2 frame: its 9-byte header and `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    // A 7-bit prefix integer (RFC 7541 5.1).
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

/// The `:status` of a response HEADERS frame: the first field of its block, indexed from
/// the static table or a literal value (plain or Huffman-coded digits).
fn status(payload: &[u8], flags: u8) -> u16 {
    let mut block = payload;
    if flags & 0x8 != 0 {
        let pad = usize::from(block[0]);
        block = &block[1..block.len() - pad];
    }
    if flags & 0x20 != 0 {
        block = &block[5..];
    }
    let first = block[0];
    if first & 0x80 != 0 {
        return match first & 0x7f {
            8 => 200,
            9 => 204,
            10 => 206,
            11 => 304,
            12 => 400,
            13 => 404,
            14 => 500,
            other => panic!("unexpected first field {other}"),
        };
    }
    let value = &block[1..];
    let (huffman, len) = (value[0] & 0x80 != 0, usize::from(value[0] & 0x7f));
    let bytes = &value[1..1 + len];
    let text = if huffman {
        huffman_digits(bytes)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    };
    text.parse().expect("a status")
}

/// Decodes Huffman-coded ASCII digits (RFC 7541 Appendix B: `0`-`2` are 5 bits, `00000` to
/// `00010`; `3`-`9` are 6 bits, `011001` to `011111`).
fn huffman_digits(bytes: &[u8]) -> String {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut at = 0;
    while at + 5 <= bits.len() {
        let five = bits[at..at + 5].iter().fold(0u8, |v, b| v << 1 | b);
        if five <= 2 {
            out.push(char::from(b'0' + five));
            at += 5;
        } else if at + 6 <= bits.len() && (12..=15).contains(&five) {
            let six = five << 1 | bits[at + 5];
            out.push(char::from(b'0' + six - 22));
            at += 6;
        } else {
            break; // the padding: all ones
        }
    }
    out
}
