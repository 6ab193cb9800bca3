//! The proxy app behind its listeners' admission (`listen::admission`): Pingora accepts
//! connections and hands each to its app (`ServerApp::process_new`), which serves it to its
//! end: every request of a keep-alive HTTP/1.1 connection, every stream of an HTTP/2 one.
//! [`Admitting`] stands in front of the app: each connection passes its listener's gate
//! first, and a connection given back after an event stream carried in a task of its own
//! is served again ([`Admitting::handing_back`]).

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use crate::listen::admission::{admitted, local_addr, Gate, Workers};
use crate::relay::client::Handback;

/// The app of a listening service, behind the admission of its listeners.
pub struct Admitting<A> {
    app: Arc<A>,
    gates: Vec<Arc<Gate>>,
    /// Connected to the app on the first connection (see [`Admitting::handing_back`]).
    handback: Option<Arc<Handback>>,
    /// The worker threads of the listener group, and which of them this copy runs on.
    worker: Option<(Arc<Workers>, usize)>,
}

impl<A> Admitting<A> {
    pub fn new(app: A, gates: Vec<Arc<Gate>>) -> Self {
        Admitting {
            app: Arc::new(app),
            gates,
            handback: None,
            worker: None,
        }
    }

    /// Counts the connections this copy serves as worker `worker` of `workers`.
    pub fn worker(mut self, workers: Arc<Workers>, worker: usize) -> Self {
        self.worker = Some((workers, worker));
        self
    }

    /// Connects `handback` to this app: a client connection given back after a stream
    /// carried in a task of its own is served by the app again, as Pingora serves a
    /// kept-alive HTTP/1.1 connection, in a task of its own.
    pub fn handing_back(mut self, handback: Arc<Handback>) -> Self {
        self.handback = Some(handback);
        self
    }

    /// The gate of the listener `stream` was accepted on.
    fn gate(&self, stream: &Stream) -> Option<&Arc<Gate>> {
        if let [only] = self.gates.as_slice() {
            return Some(only);
        }
        let local = local_addr(&**stream)?;
        self.gates
            .iter()
            .find(|g| g.listener().addr == local)
            .or_else(|| self.gates.iter().find(|g| g.listener().accepts(local)))
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Admitting<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if let Some(handback) = &self.handback {
            // The app holds the handback (a weak reference back, or neither is ever freed).
            handback.connect(|| {
                let app = Arc::downgrade(&self.app);
                let shutdown = shutdown.clone();
                Box::new(move |conn| {
                    if let Some(app) = app.upgrade() {
                        tokio::spawn(serve_again(app, conn, shutdown.clone()));
                    }
                })
            });
        }
        // A connection handed back for another round was admitted already.
        if admitted(&stream).is_some() {
            return self.app.process_new(stream, shutdown).await;
        }
        let Some(gate) = self.gate(&stream) else {
            return self.app.process_new(stream, shutdown).await;
        };
        let worker = self.worker.as_ref().map(|(workers, w)| (workers, *w));
        let admitted = gate.admit(stream, worker)?;
        self.app.process_new(Box::new(admitted), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Serves a kept-alive HTTP/1.1 connection given back after a stream, request after
/// request, as Pingora's own loop for HTTP/1.1 connections does (the keep-alive settings
/// and early bytes of the next request carried over).
async fn serve_again<A: HttpServerApp + Send + Sync + 'static>(
    app: Arc<A>,
    conn: ReusedHttpStream,
    shutdown: ShutdownWatch,
) {
    let mut next = Some(conn);
    while let Some((stream, settings)) = next.map(ReusedHttpStream::consume) {
        let mut session = ServerSession::new_http1(stream);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        next = app.process_new_http(session, &shutdown).await;
    }
}
