//! Host and path patterns as written in `host_rules[].pattern` and `route_rules[].pattern`.
//!
//! Both parse once, when the config loads; a pattern that cannot match anything sensible
//! (a `*` in the middle of a host, a path that starts with neither `/` nor `~`, a regex
//! that does not compile) is refused with the reason.

use std::fmt;

use regex::Regex;

/// `host_rules[].pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.example.com`: that host only (compared case-insensitively).
    Exact(String),
    /// `*.example.com`: any host ending in `.example.com`, at any depth, but not
    /// `example.com` itself. Holds the suffix with its leading dot.
    Wildcard(String),
    /// `*`: any host, including requests without one.
    Any,
}

impl TryFrom<String> for HostPattern {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        let pattern = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        if pattern == "*" {
            return Ok(HostPattern::Any);
        }
        let (wildcard, name) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern.as_str()),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        let ipv6 = !wildcard && name.starts_with('[') && name.ends_with(']');
        if !valid && !ipv6 {
            return Err(format!(
                "invalid host pattern `{raw}`: use an exact host (`api.example.com`), \
                 a wildcard (`*.example.com`) or `*`; a port goes in `port:`"
            ));
        }
        Ok(if wildcard {
            HostPattern::Wildcard(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_string())
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

/// `route_rules[].pattern`.
#[derive(Debug, Clone)]
pub enum PathPattern {
    /// `/events`: that path only.
    Exact(String),
    /// `/events/*`: `/events` itself and everything below `/events/`. `/*` matches every
    /// path. Holds the prefix without the trailing `/*`.
    Prefix(String),
    /// `~^/v[0-9]+/stream$`: a regex on the path (without the query).
    Regex(Regex),
}

impl TryFrom<String> for PathPattern {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        if let Some(re) = raw.strip_prefix('~') {
            return Regex::new(re)
                .map(PathPattern::Regex)
                .map_err(|e| format!("invalid regex in path pattern `{raw}`: {e}"));
        }
        if !raw.starts_with('/') {
            return Err(format!(
                "invalid path pattern `{raw}`: use `/exact`, `/prefix/*` or `~regex`"
            ));
        }
        if let Some(prefix) = raw.strip_suffix("/*") {
            if prefix.contains('*') {
                return Err(format!(
                    "invalid path pattern `{raw}`: `*` is only allowed as a final `/*`"
                ));
            }
            return Ok(PathPattern::Prefix(prefix.to_string()));
        }
        if raw.contains('*') {
            return Err(format!(
                "invalid path pattern `{raw}`: `*` is only allowed as a final `/*`; \
                 use `~regex` for anything else"
            ));
        }
        Ok(PathPattern::Exact(raw))
    }
}

impl PathPattern {
    /// The pattern as it was written (for route names and duplicate detection).
    pub fn source(&self) -> String {
        match self {
            PathPattern::Exact(p) => p.clone(),
            PathPattern::Prefix(p) => format!("{p}/*"),
            PathPattern::Regex(re) => format!("~{}", re.as_str()),
        }
    }
}

/// Whether `path` is `prefix` itself or lies below `prefix/`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Result<HostPattern, String> {
        HostPattern::try_from(s.to_string())
    }

    fn path(s: &str) -> Result<PathPattern, String> {
        PathPattern::try_from(s.to_string())
    }

    #[test]
    fn host_patterns_parse() {
        assert_eq!(
            host("API.Example.com.").ok(),
            Some(HostPattern::Exact("api.example.com".into()))
        );
        assert_eq!(
            host("*.example.com").ok(),
            Some(HostPattern::Wildcard(".example.com".into()))
        );
        assert_eq!(host("*").ok(), Some(HostPattern::Any));
        assert!(host("a.*.com").is_err());
        assert!(host("example.com:80").is_err());
        assert!(host("").is_err());
        assert!(host("[::1]").is_ok());
    }

    #[test]
    fn path_patterns_parse() {
        assert!(matches!(path("/x"), Ok(PathPattern::Exact(p)) if p == "/x"));
        assert!(matches!(path("/x/*"), Ok(PathPattern::Prefix(p)) if p == "/x"));
        assert!(matches!(path("/*"), Ok(PathPattern::Prefix(p)) if p.is_empty()));
        assert!(matches!(path("~^/v[0-9]+$"), Ok(PathPattern::Regex(_))));
        assert!(path("x").is_err());
        assert!(path("/x*").is_err());
        assert!(path("/*/y").is_err());
        assert!(path("~(").is_err());
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/events", "/events"));
        assert!(prefix_matches("/events", "/events/"));
        assert!(prefix_matches("/events", "/events/a/b"));
        assert!(!prefix_matches("/events", "/eventsfoo"));
        assert!(prefix_matches("", "/anything"));
    }
}
