//! Host and path routing, compiled once per config.
//!
//! Precedence, from most to least specific, is fixed and does not depend on file order
//! except among regexes:
//!
//! 1. host: an exact host, then the wildcard with the longest suffix, then `*`. At each of
//!    these, a rule with a `port:` equal to the listener's port wins over one without.
//!    When a host pattern has no rule for the port, the next, less specific host level is
//!    tried.
//! 2. path, within the chosen host rule: an exact path, then the longest prefix, then
//!    regexes in file order, then the host rule's own `target`. Once a host rule is chosen
//!    there is no fallthrough to less specific host rules: a miss is a 404.
//!
//! A lookup allocates nothing: the host is lower-cased into a stack buffer. The path it is
//! given should be the one [`normalize_path`] made (see [`path`]): the table compares text,
//! and every spelling of a path must reach the route the path itself reaches.

pub mod path;

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;

use crate::metrics::RouteMetrics;
use crate::middleware::Chain;
use crate::pattern::{self, HostPattern, PathPattern};
use crate::upstream::Service;
pub use path::{normalize_path, PathRefusal};

/// A matched route: what the rest of the request needs to know about where it goes.
#[derive(Debug)]
pub struct Route {
    /// Stable, human-readable name: `name:` from the config, or `host[:port]` plus the path
    /// pattern. Used in logs (and metrics labels), never the raw request path.
    pub name: String,
    pub service: Arc<Service>,
    /// The middleware chain, in run order: global, host, route.
    pub chain: Chain,
    pub metrics: Arc<RouteMetrics>,
}

/// A path pattern and its route, as listed by `describe`.
pub type RouteEntry<'a> = (String, &'a Arc<Route>);

/// The routes of one host rule.
#[derive(Debug, Default)]
pub struct HostRoutes {
    exact: HashMap<String, Arc<Route>>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<Route>)>,
    /// File order.
    regexes: Vec<(Regex, Arc<Route>)>,
    /// The host rule's own `target`.
    fallback: Option<Arc<Route>>,
}

impl HostRoutes {
    pub fn new(fallback: Option<Arc<Route>>) -> Self {
        HostRoutes {
            fallback,
            ..HostRoutes::default()
        }
    }

    /// Adds a path rule. Returns false when the same pattern is already present.
    pub fn add(&mut self, pattern: PathPattern, route: Arc<Route>) -> bool {
        match pattern {
            PathPattern::Exact(p) => self.exact.insert(p, route).is_none(),
            PathPattern::Prefix(p) => {
                if self.prefixes.iter().any(|(q, _)| *q == p) {
                    return false;
                }
                let at = self.prefixes.partition_point(|(q, _)| q.len() >= p.len());
                self.prefixes.insert(at, (p, route));
                true
            }
            PathPattern::Regex(re) => {
                if self.regexes.iter().any(|(r, _)| r.as_str() == re.as_str()) {
                    return false;
                }
                self.regexes.push((re, route));
                true
            }
        }
    }

    fn lookup(&self, path: &str) -> Option<&Arc<Route>> {
        if let Some(route) = self.exact.get(path) {
            return Some(route);
        }
        if let Some((_, route)) = self
            .prefixes
            .iter()
            .find(|(prefix, _)| pattern::prefix_matches(prefix, path))
        {
            return Some(route);
        }
        if let Some((_, route)) = self.regexes.iter().find(|(re, _)| re.is_match(path)) {
            return Some(route);
        }
        self.fallback.as_ref()
    }

    /// Every route, in precedence order (for `-t` output and, later, the admin API).
    pub fn describe(&self) -> Vec<RouteEntry<'_>> {
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        let mut out: Vec<RouteEntry<'_>> = exact.into_iter().map(|(p, r)| (p.clone(), r)).collect();
        out.extend(self.prefixes.iter().map(|(p, r)| (format!("{p}/*"), r)));
        out.extend(
            self.regexes
                .iter()
                .map(|(re, r)| (format!("~{}", re.as_str()), r)),
        );
        if let Some(r) = &self.fallback {
            out.push(("(host default)".to_string(), r));
        }
        out
    }
}

/// Host rules sharing one host pattern, at most one per port plus one for any port.
#[derive(Debug, Default)]
struct PortRules {
    /// Port-specific rules first, the any-port rule (if any) last.
    rules: Vec<(Option<u16>, Arc<HostRoutes>)>,
}

impl PortRules {
    fn add(&mut self, port: Option<u16>, routes: Arc<HostRoutes>) -> bool {
        if self.rules.iter().any(|(p, _)| *p == port) {
            return false;
        }
        self.rules.push((port, routes));
        self.rules.sort_by_key(|(p, _)| p.is_none());
        true
    }

    fn pick(&self, port: Option<u16>) -> Option<&HostRoutes> {
        self.rules
            .iter()
            .find(|(p, _)| p.is_none() || *p == port)
            .map(|(_, routes)| routes.as_ref())
    }
}

/// Why no route matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No host rule accepts this host and port.
    Host,
    /// A host rule matched but none of its paths, and it has no `target` of its own.
    Path,
}

impl NoRoute {
    /// The reason a 404 gives for a request to `host` and `path`.
    pub fn reason(self, host: Option<&str>, path: &str) -> String {
        let host = host.unwrap_or("");
        match self {
            NoRoute::Host => format!("no route for host `{host}`"),
            NoRoute::Path => format!("no route for path `{path}` on host `{host}`"),
        }
    }
}

/// The compiled host and path rules of one config.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, PortRules>,
    /// Longest suffix first.
    wildcards: Vec<(String, PortRules)>,
    any: PortRules,
}

impl RouteTable {
    /// Adds a host rule. Returns false when the same pattern and port are already present.
    pub fn add_host(
        &mut self,
        pattern: HostPattern,
        port: Option<u16>,
        routes: HostRoutes,
    ) -> bool {
        let routes = Arc::new(routes);
        match pattern {
            HostPattern::Exact(host) => self.exact.entry(host).or_default().add(port, routes),
            HostPattern::Wildcard(suffix) => {
                if let Some((_, rules)) = self.wildcards.iter_mut().find(|(s, _)| *s == suffix) {
                    return rules.add(port, routes);
                }
                let mut rules = PortRules::default();
                rules.add(port, routes);
                let at = self
                    .wildcards
                    .partition_point(|(s, _)| s.len() >= suffix.len());
                self.wildcards.insert(at, (suffix, rules));
                true
            }
            HostPattern::Any => self.any.add(port, routes),
        }
    }

    /// Finds the route for a request. `host` is the `Host` header or URI authority as sent
    /// (any case, optional port); `port` is the port of the listener the request came in on.
    pub fn lookup(
        &self,
        host: Option<&str>,
        port: Option<u16>,
        path: &str,
    ) -> Result<&Arc<Route>, NoRoute> {
        let mut buf = [0u8; 256];
        let host = host.and_then(|h| normalize_host(h, &mut buf));
        let routes = host
            .and_then(|h| self.match_host(h, port))
            .or_else(|| self.any.pick(port))
            .ok_or(NoRoute::Host)?;
        routes.lookup(path).ok_or(NoRoute::Path)
    }

    fn match_host(&self, host: &str, port: Option<u16>) -> Option<&HostRoutes> {
        if let Some(routes) = self.exact.get(host).and_then(|r| r.pick(port)) {
            return Some(routes);
        }
        self.wildcards
            .iter()
            .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .find_map(|(_, rules)| rules.pick(port))
    }

    /// Every host rule in precedence order with its routes (for `-t` output).
    pub fn describe(&self) -> Vec<(String, Vec<RouteEntry<'_>>)> {
        let label = |host: &str, port: &Option<u16>| match port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = Vec::new();
        let hosts = exact
            .into_iter()
            .map(|(h, r)| (h.clone(), r))
            .chain(self.wildcards.iter().map(|(s, r)| (format!("*{s}"), r)))
            .chain(std::iter::once(("*".to_string(), &self.any)));
        for (host, rules) in hosts {
            for (port, routes) in &rules.rules {
                out.push((label(&host, port), routes.describe()));
            }
        }
        out
    }
}

/// Lower-cases `raw` into `buf`, without its port and trailing dot.
fn normalize_host<'a>(raw: &str, buf: &'a mut [u8; 256]) -> Option<&'a str> {
    let host = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
    if host.is_empty() || host.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..host.len()];
    out.copy_from_slice(host);
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::upstream::Service;

    fn route(name: &str) -> Arc<Route> {
        Arc::new(Route {
            name: name.to_string(),
            service: Arc::new(Service::for_tests(name)),
            chain: Vec::new().into(),
            metrics: crate::metrics::Metrics::new().route(name, name),
        })
    }

    fn host(s: &str) -> HostPattern {
        HostPattern::try_from(s.to_string()).expect("host pattern")
    }

    fn path(s: &str) -> PathPattern {
        PathPattern::try_from(s.to_string()).expect("path pattern")
    }

    fn table() -> RouteTable {
        let mut t = RouteTable::default();
        let mut exact = HostRoutes::new(Some(route("exact-default")));
        assert!(exact.add(path("/events/*"), route("events-prefix")));
        assert!(exact.add(path("/events/live/*"), route("events-live")));
        assert!(exact.add(path("/events/live/special"), route("special")));
        assert!(exact.add(path("~^/events/live/[0-9]+$"), route("regex-numbers")));
        assert!(exact.add(path("~^/r/"), route("regex-r")));
        assert!(!exact.add(path("/events/*"), route("dup")));
        assert!(t.add_host(host("api.example.com"), None, exact));
        let mut on_port = HostRoutes::new(Some(route("exact-8443")));
        assert!(on_port.add(path("/only"), route("only-8443")));
        assert!(t.add_host(host("api.example.com"), Some(8443), on_port));
        assert!(t.add_host(
            host("*.example.com"),
            None,
            HostRoutes::new(Some(route("wild")))
        ));
        assert!(t.add_host(
            host("*.deep.example.com"),
            None,
            HostRoutes::new(Some(route("wild-deep")))
        ));
        assert!(t.add_host(host("*"), None, HostRoutes::new(Some(route("any")))));
        let mut nodefault = HostRoutes::new(None);
        assert!(nodefault.add(path("/x"), route("x")));
        assert!(t.add_host(host("strict.test"), None, nodefault));
        assert!(!t.add_host(host("*"), None, HostRoutes::new(None)));
        t
    }

    fn name(t: &RouteTable, host: Option<&str>, port: Option<u16>, path: &str) -> String {
        match t.lookup(host, port, path) {
            Ok(r) => r.name.clone(),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn host_precedence() {
        let t = table();
        assert_eq!(
            name(&t, Some("api.example.com"), Some(80), "/"),
            "exact-default"
        );
        assert_eq!(
            name(&t, Some("API.Example.COM:80"), Some(80), "/"),
            "exact-default"
        );
        assert_eq!(
            name(&t, Some("api.example.com."), None, "/"),
            "exact-default"
        );
        assert_eq!(
            name(&t, Some("api.example.com"), Some(8443), "/"),
            "exact-8443"
        );
        assert_eq!(
            name(&t, Some("api.example.com"), Some(8443), "/only"),
            "only-8443"
        );
        assert_eq!(name(&t, Some("w.example.com"), None, "/"), "wild");
        assert_eq!(name(&t, Some("a.b.example.com"), None, "/"), "wild");
        assert_eq!(name(&t, Some("a.deep.example.com"), None, "/"), "wild-deep");
        assert_eq!(name(&t, Some("example.com"), None, "/"), "any");
        assert_eq!(name(&t, None, None, "/"), "any");
    }

    #[test]
    fn path_precedence() {
        let t = table();
        let h = Some("api.example.com");
        assert_eq!(name(&t, h, None, "/events"), "events-prefix");
        assert_eq!(name(&t, h, None, "/events/x"), "events-prefix");
        assert_eq!(name(&t, h, None, "/events/live/1"), "events-live");
        assert_eq!(name(&t, h, None, "/events/live/special"), "special");
        assert_eq!(name(&t, h, None, "/eventsx"), "exact-default");
        assert_eq!(name(&t, h, None, "/r/1"), "regex-r");
        assert_eq!(name(&t, Some("strict.test"), None, "/x"), "x");
        assert_eq!(name(&t, Some("strict.test"), None, "/y"), "Path");
    }

    #[test]
    fn no_catch_all_means_no_route_for_unknown_hosts() {
        let mut t = RouteTable::default();
        assert!(t.add_host(host("a.test"), Some(80), HostRoutes::new(Some(route("a")))));
        assert_eq!(name(&t, Some("a.test"), Some(80), "/"), "a");
        assert_eq!(name(&t, Some("a.test"), Some(81), "/"), "Host");
        assert_eq!(name(&t, Some("b.test"), Some(80), "/"), "Host");
    }

    #[test]
    fn normalizes_hosts_without_allocating() {
        let mut buf = [0u8; 256];
        assert_eq!(normalize_host("A.B:8080", &mut buf), Some("a.b"));
        assert_eq!(normalize_host("[::1]:80", &mut buf), Some("[::1]"));
        assert_eq!(normalize_host("", &mut buf), None);
        assert_eq!(normalize_host(&"a".repeat(300), &mut buf), None);
    }
}
