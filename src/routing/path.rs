//! The one spelling of a request path that routing sees and the origin gets.
//!
//! A path can be written many ways that an origin reads as the same path: `//admin/users`,
//! `/%61dmin/users`, `/admin/./users`. If the route table compared the raw text, a request
//! could miss the `/admin/*` route (and its `basic_auth`) and reach the same resource at the
//! origin through a catch-all route. [`normalize_path`] turns every harmless spelling into
//! one path, and refuses the spellings that origins disagree about:
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every
//!   other escape is kept, with upper-case hex digits (`%c3%a9` becomes `%C3%A9`);
//! - repeated slashes are merged (`//a///b/` becomes `/a/b/`);
//! - refused ([`PathRefusal`]): an encoded slash (`%2F`, which some origins decode into a
//!   separator and others do not), a backslash raw or encoded (`\`, `%5C`: a separator on
//!   some servers), NUL raw or encoded and raw control characters, `.` and `..` segments
//!   plain or encoded (`%2e%2E`), also with path parameters (`..;x`, which servlet
//!   containers read as `..`), a `%` not followed by two hex digits, and a path that does
//!   not start with `/`.
//!
//! The input is the path only, without the query. An unchanged path is returned borrowed,
//! without allocating. (Its property tests, with the route table, are in
//! `tests/suite/properties.rs`.)

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused; [`PathRefusal::reason`] is the text of the `400` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Empty, `*`, or anything else that does not start with `/`.
    NotAbsolute,
    /// `%2F`: a slash inside a segment, or a separator, depending on the origin.
    EncodedSlash,
    /// `\` or `%5C`: a separator on some servers.
    Backslash,
    /// NUL (raw or `%00`) or a raw control character.
    ControlCharacter,
    /// A `.` or `..` segment, plain, percent-encoded or followed by `;` parameters.
    DotSegment,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
}

impl PathRefusal {
    /// A one-line reason for the client.
    pub fn reason(self) -> &'static str {
        match self {
            PathRefusal::NotAbsolute => "the path does not start with `/`",
            PathRefusal::EncodedSlash => "the path contains an encoded slash (%2F)",
            PathRefusal::Backslash => "the path contains a backslash (\\ or %5C)",
            PathRefusal::ControlCharacter => "the path contains NUL or a control character",
            PathRefusal::DotSegment => "the path contains `.` or `..` segments",
            PathRefusal::BadPercentEncoding => {
                "the path contains a `%` not followed by two hex digits"
            }
        }
    }
}

impl fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for PathRefusal {}

/// The normalized form of `raw` (a request path without its query), or why it is refused.
/// See the module documentation for the rules. Never panics; borrowed when `raw` is already
/// normalized.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathRefusal> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathRefusal::NotAbsolute);
    }
    let mut out = Output { raw: b, copy: None };
    let mut segment = Segment::default();
    let mut after_slash = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'/' => {
                if after_slash {
                    // A repeated slash: leave it out.
                    out.change(i);
                } else {
                    segment.end()?;
                    out.push(b"/");
                    after_slash = true;
                }
                i += 1;
                continue;
            }
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRefusal::BadPercentEncoding);
                };
                let decoded = hi << 4 | lo;
                match decoded {
                    b'/' => return Err(PathRefusal::EncodedSlash),
                    b'\\' => return Err(PathRefusal::Backslash),
                    0 => return Err(PathRefusal::ControlCharacter),
                    _ if is_unreserved(decoded) => {
                        out.change(i);
                        out.push(&[decoded]);
                        segment.char(decoded);
                    }
                    _ => {
                        let upper = [b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]];
                        if b[i + 1..i + 3] == upper[1..] {
                            out.push(&upper);
                        } else {
                            out.change(i);
                            out.push(&upper);
                        }
                        segment.char(decoded);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathRefusal::Backslash),
            c if c < 0x20 || c == 0x7f => return Err(PathRefusal::ControlCharacter),
            b';' => {
                segment.params = true;
                out.push(b";");
                i += 1;
            }
            c => {
                segment.char(c);
                out.push(&[c]);
                i += 1;
            }
        }
        after_slash = false;
    }
    segment.end()?;
    Ok(out.finish(raw))
}

/// The output, copied only from the first change on; until then it is `raw[..i]`.
struct Output<'a> {
    raw: &'a [u8],
    copy: Option<Vec<u8>>,
}

impl Output<'_> {
    /// The bytes at `i` are replaced: from here on the output is a copy.
    fn change(&mut self, i: usize) {
        if self.copy.is_none() {
            let mut copy = Vec::with_capacity(self.raw.len() + 8);
            copy.extend_from_slice(&self.raw[..i]);
            self.copy = Some(copy);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(copy) = &mut self.copy {
            copy.extend_from_slice(bytes);
        }
    }

    fn finish(self, raw: &str) -> Cow<'_, str> {
        match self.copy {
            // Only ASCII was inserted and the rest copied whole, so this is UTF-8.
            Some(copy) => Cow::Owned(String::from_utf8_lossy(&copy).into_owned()),
            None => Cow::Borrowed(raw),
        }
    }
}

/// What a segment is made of, as far as dot segments go: the decoded characters before
/// its first `;`.
#[derive(Default)]
struct Segment {
    dots: usize,
    other: bool,
    params: bool,
}

impl Segment {
    fn char(&mut self, c: u8) {
        if self.params {
            return;
        }
        if c == b'.' && !self.other {
            self.dots += 1;
        } else {
            self.other = true;
        }
    }

    /// The segment ended: refuse a dot segment, start the next.
    fn end(&mut self) -> Result<(), PathRefusal> {
        let dot = !self.other && (self.dots == 1 || self.dots == 2);
        *self = Segment::default();
        if dot {
            Err(PathRefusal::DotSegment)
        } else {
            Ok(())
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 unreserved characters: decoding them never changes what a path means.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        match normalize_path(raw) {
            Ok(p) => p.into_owned(),
            Err(e) => panic!("{raw:?} refused: {e}"),
        }
    }

    fn refused(raw: &str) -> PathRefusal {
        match normalize_path(raw) {
            Ok(p) => panic!("{raw:?} accepted as {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn spellings_of_one_path_become_that_path() {
        assert_eq!(ok("//admin/users"), "/admin/users");
        assert_eq!(ok("/%61dmin/users"), "/admin/users");
        assert_eq!(
            ok("/%41%44MIN"),
            "/ADMIN",
            "case is kept: paths are case-sensitive"
        );
        assert_eq!(ok("///a//b///"), "/a/b/");
        assert_eq!(ok("/a%2db%5Fc%7e%2E"), "/a-b_c~.");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a;b=c/d"), "/a;b=c/d");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/…/ü"), "/…/ü", "raw non-ASCII passes as it is");
        assert!(matches!(normalize_path("/a/b"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/a/%C3%A9"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn ambiguous_forms_are_refused() {
        assert_eq!(refused("/admin%2Fusers"), PathRefusal::EncodedSlash);
        assert_eq!(refused("/admin%2fusers"), PathRefusal::EncodedSlash);
        assert_eq!(refused("/a%5Cb"), PathRefusal::Backslash);
        assert_eq!(refused("/a\\b"), PathRefusal::Backslash);
        assert_eq!(refused("/a%00b"), PathRefusal::ControlCharacter);
        assert_eq!(refused("/a\0b"), PathRefusal::ControlCharacter);
        assert_eq!(refused("/a\nb"), PathRefusal::ControlCharacter);
        assert_eq!(refused("/a/..;/admin"), PathRefusal::DotSegment);
        assert_eq!(refused("/a/.;x=1/b"), PathRefusal::DotSegment);
        assert_eq!(refused("/a/../b"), PathRefusal::DotSegment);
        assert_eq!(refused("/a/./b"), PathRefusal::DotSegment);
        assert_eq!(refused("/a/%2e%2E/b"), PathRefusal::DotSegment);
        assert_eq!(refused("/a/.%2e"), PathRefusal::DotSegment);
        assert_eq!(refused("/.."), PathRefusal::DotSegment);
        assert_eq!(refused("/a//./b"), PathRefusal::DotSegment);
        assert_eq!(refused("/a%"), PathRefusal::BadPercentEncoding);
        assert_eq!(refused("/a%4"), PathRefusal::BadPercentEncoding);
        assert_eq!(refused("/a%zz"), PathRefusal::BadPercentEncoding);
        assert_eq!(refused(""), PathRefusal::NotAbsolute);
        assert_eq!(refused("*"), PathRefusal::NotAbsolute);
        assert_eq!(refused("admin"), PathRefusal::NotAbsolute);
        // Names that only contain dots are ordinary segments.
        assert_eq!(ok("/a/..b/.c/.../d."), "/a/..b/.c/.../d.");
    }
}
