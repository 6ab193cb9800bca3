//! The proxy app as Pingora's HTTP server runs it, with HTTP/2 event streams carried on
//! after their request (see `relay::carried`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;

use crate::listen::admission;
use crate::relay::carried;

/// `app`, running each HTTP/2 request with a slot open for its event stream, and the
/// stream handed over after the request, in the request's own task: Pingora's request
/// future is freed, and the guard Pingora's HTTP/2 loop holds for the stream (counting it
/// open for `http2.idle_timeout` and a graceful shutdown) is held until the stream ends.
/// HTTP/1.x requests pass straight through (their streams go to a task of their own),
/// each with its head bounded by the listener's `request_header_timeout` (see
/// `listen::admission::Admitted::expect_head`).
pub struct Carrying<A> {
    app: Arc<A>,
}

impl<A> Carrying<A> {
    pub fn new(app: A) -> Self {
        Carrying { app: Arc::new(app) }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for Carrying<A> {
    // Written out rather than as an `async fn`: a future of this method's own would hold
    // room for the session it is given for as long as the request runs, and an HTTP/1.1
    // connection is in a request while it waits for the next one. HTTP/1.x gets the app's
    // future itself; HTTP/2 a small one around it.
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        session: ServerSession,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let http2 = session.is_http2();
        // A request of an HTTP/1.x connection is about to be read: its head is bounded.
        if let Some(admitted) = session.stream().and_then(admission::admitted) {
            admitted.expect_head();
        }
        let request = self.app.process_new_http(session, shutdown);
        if !http2 {
            return request;
        }
        Box::pin(async move {
            let (reused, stream) = carried::carrying(request).await;
            if let Some(stream) = stream {
                stream.await;
            }
            reused
        })
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.app.http_cleanup().await
    }
}
