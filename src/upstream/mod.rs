//! Upstreams: the services routes send to, and everything about reaching their origins.
//!
//! - [`service`]: a service's URL, `Host` policy, timeouts and peers, request rewriting,
//!   and [`Attempts`] (retries);
//! - [`affinity`]: session affinity learned from responses, and the pin table;
//! - [`endpoints`]: a service's live set of endpoints and the choice of one per request;
//! - [`balancing`]: the load-balancing algorithms; [`health`]: active and passive health;
//! - [`connect`]: connections to origins (Pingora's pool; a plain origin's new connection
//!   made without Pingora's connect future, and without a loop turn when it is made at once);
//! - [`discovery`]: where endpoints come from (static, DNS, files, the system resolver);
//! - [`registry`]: every service's endpoints across reloads, and the upkeep task;
//! - [`origin_tls`]: TLS toward https origins.

pub mod affinity;
pub mod balancing;
pub mod connect;
pub mod discovery;
pub mod endpoints;
pub mod health;
pub mod origin_tls;
pub mod registry;
pub mod service;

pub use affinity::{Affinity, AffinityFile};
pub use balancing::{Algorithm, HashKey};
pub use endpoints::{EndpointView, Endpoints, Lease};
pub use service::{
    url_endpoints, Attempts, HostHeader, Scheme, Service, ServiceUrl, Timeouts,
    DEFAULT_REQUEST_BUFFER,
};
