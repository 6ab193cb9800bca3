//! The relay: how a request is carried to its origin and its answer back, whichever loop
//! carries it.
//!
//! - [`context`]: the per-request context every hook and the loop share;
//! - [`inbound`]: the client's request head checked and brought to one form (one spelling
//!   of its path, origin-form, `Host`) before it is routed;
//! - [`carried`]: an event stream over HTTP/2 carried on after Pingora's request ends;
//! - [`client`]: where a stream's bytes go: the client's Pingora session, or its HTTP/1.1
//!   connection itself for a stream carried in a task of its own;
//! - [`limits`]: the stream limits a request takes before its origin is contacted;
//! - [`headers`]: the request header on its way out (rewriting, the chain's hooks) and the
//!   response header on its way back (the SSE rules, the start of a stream, the chain's
//!   hooks and body filters);
//! - [`stream`]: an event stream in flight and its per-chunk pipeline (scan, record,
//!   filter, pace), the one path every chunk takes;
//! - [`exchange`]: streamgate's own loop, which carries every proxied request to its origin
//!   and the answer back; [`origin`]: the HTTP/1.1 framing toward the origin;
//! - [`events`]: the loop of an event stream, which acts while the origin is silent
//!   (heartbeats, timeouts, lifetime, drain, admin ends, resume);
//! - [`reply`]: answers the proxy gives itself (a middleware's, a limit's refusal);
//! - [`resume`]: what a resumed stream remembers;
//! - [`record`]: what a finished request leaves: metrics, logging hooks, the access log,
//!   how its stream ended.
//!
//! It sits above `upstream`, `middleware` and `sse` and below `proxy`, whose `ProxyHttp`
//! hooks call into it.

pub mod carried;
pub mod client;
pub mod context;
pub mod events;
pub mod exchange;
pub mod headers;
pub mod inbound;
pub mod limits;
pub mod origin;
pub mod record;
pub mod reply;
pub mod resume;
pub mod stream;

pub use context::{RequestCtx, UpstreamCtx};
pub use exchange::Relay;
pub use stream::Stream;
