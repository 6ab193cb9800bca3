//! One spelling per path, end to end: `/admin/*` behind `basic_auth` to one origin and a
//! catch-all to another. Every spelling of an admin path is either refused or routed to
//! the admin route (and its `basic_auth`), never to the catch-all's origin; what the admin
//! origin gets is the normalized path, with the query as it was sent.

use crate::common;

use common::raw::exchange;
use common::{Origin, Proxy};

/// `alice:s3cret`.
const CREDENTIALS: &str = "Authorization: Basic YWxpY2U6czNjcmV0\r\n";

/// `admin_route` (a path pattern) behind `basic_auth` to one origin, everything else to
/// another.
async fn start(admin_route: &str) -> (Proxy, Origin, Origin) {
    let admin = Origin::plain("admin").await;
    let public = Origin::plain("public").await;
    let proxy = Proxy::start(&format!(
        "services:\n  admin:\n    url: \"{}\"\n  public:\n    url: \"{}\"\n\
         middleware_services:\n\
         \x20 - {{ name: auth, type: basic_auth, config: {{ realm: ops, users: {{ alice: s3cret }} }} }}\n\
         host_rules:\n  - pattern: \"*\"\n    target: public\n    route_rules:\n\
         \x20     - {{ pattern: \"{admin_route}\", target: admin, middlewares: [auth] }}\n",
        admin.url(),
        public.url()
    ))
    .await;
    (proxy, admin, public)
}

/// Sends `target` raw (an HTTP client would tidy it up first), with `extra` header lines.
async fn get(proxy: &Proxy, target: &str, extra: &str) -> u16 {
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: h.example\r\n{extra}Connection: close\r\n\r\n");
    exchange(proxy.addr, request.as_bytes()).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn every_spelling_of_an_admin_path_is_refused_or_meets_basic_auth() {
    let (proxy, mut admin, mut public) = start("/admin/*").await;
    // (spelling, status without credentials, what the admin origin gets with them)
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/admin/users", 401, Some("/admin/users")),
        ("//admin/users", 401, Some("/admin/users")),
        ("/admin//users/", 401, Some("/admin/users/")),
        ("///admin", 401, Some("/admin")),
        ("/%61dmin/users", 401, Some("/admin/users")),
        ("/%61%64%6D%69%6e/%75sers", 401, Some("/admin/users")),
        (
            "/admin/%7Eu%2d1?next=%2F..%2F&x=/a//b",
            401,
            Some("/admin/~u-1?next=%2F..%2F&x=/a//b"),
        ),
        ("/admin/caf%c3%a9", 401, Some("/admin/caf%C3%A9")),
        ("http://h.example//admin/users", 401, Some("/admin/users")),
        ("/admin%2Fusers", 400, None),
        ("/admin%2fusers", 400, None),
        ("/admin/./users", 400, None),
        ("/admin/%2e/users", 400, None),
        ("/x/../admin/users", 400, None),
        ("/x/%2e%2E/admin/users", 400, None),
        ("/admin/users%00", 400, None),
        ("/admin\\users", 400, None),
        ("/admin%5Cusers", 400, None),
        ("/admin/..;/users", 400, None),
        ("/x/..;/admin/users", 400, None),
        ("/admin/users%", 400, None),
        ("*", 400, None),
    ];
    for (spelling, status, _) in cases {
        assert_eq!(get(&proxy, spelling, "").await, *status, "{spelling}");
    }
    for (spelling, _, forwarded) in cases {
        let Some(forwarded) = forwarded else { continue };
        assert_eq!(get(&proxy, spelling, CREDENTIALS).await, 200, "{spelling}");
        assert_eq!(admin.next_request().await.target, *forwarded, "{spelling}");
    }
    // The catch-all's origin saw none of it: the first request it gets is this one.
    assert_eq!(get(&proxy, "/public", "").await, 200);
    assert_eq!(public.next_request().await.target, "/public");
}

/// Paths compare case-sensitively (RFC 3986 6.2.2.1): `/ADMIN/users` is another path, and
/// goes to the catch-all. A route in front of an origin that reads paths without regard to
/// case says so with a regex (README: "One spelling per path").
#[tokio::test(flavor = "multi_thread")]
async fn paths_are_case_sensitive_and_a_regex_route_can_say_otherwise() {
    let (proxy, _admin, mut public) = start("/admin/*").await;
    assert_eq!(get(&proxy, "/ADMIN/users", "").await, 200);
    assert_eq!(public.next_request().await.target, "/ADMIN/users");

    let (proxy, _admin, _public) = start("~(?i)^/admin(/|$)").await;
    for spelling in ["/ADMIN/users", "/Admin", "//%41dmin/x", "/admin"] {
        assert_eq!(get(&proxy, spelling, "").await, 401, "{spelling}");
    }
}
