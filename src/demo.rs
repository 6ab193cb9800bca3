//! The built-in demo SSE origin, started by the `demo:` config key.
//!
//! It is an ordinary HTTP server on its own loopback port, reached through an ordinary
//! service and route, so `curl -N http://127.0.0.1:8080/demo/events` exercises the real
//! proxy path. Any path ending in `/events` streams one event a second (`id`, `event: tick`,
//! a JSON `data` line) and resumes after `Last-Event-ID`; any other path serves a small
//! page that shows the stream in a browser.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::apps::{HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>streamgate demo</title>
<h1>streamgate demo stream</h1>
<p>Events from <code>events</code>, through the proxy:</p>
<pre id="log"></pre>
<script>
  const log = document.getElementById("log");
  const source = new EventSource("events");
  source.addEventListener("tick", (e) => {
    log.textContent = `id ${e.lastEventId}: ${e.data}\n` + log.textContent;
  });
  source.onerror = () => { log.textContent = "(reconnecting)\n" + log.textContent; };
</script>
"#;

/// The demo origin application.
pub struct DemoOrigin {
    interval: Duration,
}

/// The demo origin, an event a second.
pub fn origin() -> DemoOrigin {
    DemoOrigin {
        interval: Duration::from_secs(1),
    }
}

#[async_trait]
impl HttpServerApp for DemoOrigin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        let path = session.req_header().uri.path().to_string();
        let result = if path.ends_with("/events") {
            self.stream(&mut session, shutdown.clone()).await
        } else {
            page(&mut session).await
        };
        if let Err(e) = result {
            log::debug!("demo origin: {path}: {e}");
        }
        None
    }
}

impl DemoOrigin {
    async fn stream(
        &self,
        session: &mut ServerSession,
        mut shutdown: ShutdownWatch,
    ) -> pingora_error::Result<()> {
        let mut next: u64 = session
            .get_header("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(1, |last| last + 1);
        let mut header = ResponseHeader::build(200, None)?;
        header.insert_header("content-type", "text/event-stream; charset=utf-8")?;
        header.insert_header("cache-control", "no-cache")?;
        session.write_response_header(Box::new(header)).await?;
        session
            .write_response_body(Bytes::from_static(b"retry: 2000\n\n"), false)
            .await?;
        loop {
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let event =
                format!("id: {next}\nevent: tick\ndata: {{\"n\":{next},\"unix_ms\":{millis}}}\n\n");
            session
                .write_response_body(Bytes::from(event), false)
                .await?;
            next += 1;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => break,
            }
        }
        session.write_response_body(Bytes::new(), true).await
    }
}

async fn page(session: &mut ServerSession) -> pingora_error::Result<()> {
    let mut header = ResponseHeader::build(200, None)?;
    header.insert_header("content-type", "text/html; charset=utf-8")?;
    header.insert_header("content-length", PAGE.len())?;
    session.write_response_header(Box::new(header)).await?;
    session
        .write_response_body(Bytes::from_static(PAGE.as_bytes()), true)
        .await
}
