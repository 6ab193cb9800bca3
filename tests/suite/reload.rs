//! Live reload: config changes on disk and `SIGHUP` apply without a restart, open SSE
//! streams keep streaming, middleware loads and unloads, broken configs are refused.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{client, eventually, free_port, sse_get, After, Events, Origin, Proxy};
use tokio::sync::{mpsc, Mutex};

async fn body(url: String) -> (u16, String) {
    match client().get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Expects the stream's next event to be number `next_id`, then acknowledges it so the
/// origin sends the following one.
async fn expect_event(events: &mut Events, ack: &mpsc::UnboundedSender<()>, next_id: &mut u32) {
    let want = format!("id: {next_id}\ndata: e");
    *next_id += 1;
    assert_eq!(events.next().await.as_deref(), Some(want.as_str()));
    ack.send(()).expect("ack");
}

/// Writes the config atomically, as deploy tools do (write aside, then rename).
fn write_config(path: &Path, text: &str) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).expect("write config");
    std::fs::rename(&aside, path).expect("rename config");
}

#[tokio::test(flavor = "multi_thread")]
async fn file_changes_apply_live_without_touching_open_streams() {
    // A stream origin that sends event i+1 only after the test acknowledged event i.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<()>();
    let ack_rx = Arc::new(Mutex::new(ack_rx));
    let feed = Origin::start(move |_, mut conn| {
        let ack_rx = ack_rx.clone();
        async move {
            let mut acks = ack_rx.lock().await;
            conn.sse_head().await.expect("head");
            for i in 0.. {
                if conn.chunk(&format!("id: {i}\ndata: e\n\n")).await.is_err() {
                    break;
                }
                if acks.recv().await.is_none() {
                    break;
                }
            }
            After::Close
        }
    })
    .await;
    let web = Origin::plain("web").await;
    let added = Origin::plain("added").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("streamgate.yaml");
    let port = free_port();
    let base = format!(
        "listen: [\"127.0.0.1:{port}\"]\n\
         services:\n  web: {{ url: \"{}\" }}\n  feed: {{ url: \"{}\" }}\n  added: {{ url: \"{}\" }}\n",
        web.url(),
        feed.url(),
        added.url()
    );
    let rules = |extra_route: &str| {
        format!(
            "host_rules:\n  - pattern: \"*\"\n    target: web\n    route_rules:\n      \
             - {{ pattern: /events, target: feed }}\n{extra_route}"
        )
    };
    write_config(&main, &format!("{base}{}", rules("")));
    let proxy = Proxy::start_file(&main).await;

    let stream = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(stream);
    let mut next_id = 0;
    expect_event(&mut events, &ack_tx, &mut next_id).await;
    assert_eq!(body(proxy.url("/new")).await, (200, "web".into()));

    // Add a route and load a middleware.
    let tag = "middleware_services:\n  - { name: tag, type: headers, enabled: ENABLED, \
               config: { response: { set: { x-tag: on } } } }\nmiddlewares: [tag]\n";
    let added_route = "      - { pattern: /new, target: added }\n";
    write_config(
        &main,
        &format!(
            "{base}{}{}",
            tag.replace("ENABLED", "true"),
            rules(added_route)
        ),
    );
    eventually("the new route to answer", || async {
        body(proxy.url("/new")).await == (200, "added".into())
    })
    .await;
    let tagged = client().get(proxy.url("/")).send().await.expect("r");
    assert_eq!(
        tagged.headers()["x-tag"],
        "on",
        "the loaded middleware acts"
    );
    expect_event(&mut events, &ack_tx, &mut next_id).await;

    // Unload it.
    write_config(
        &main,
        &format!(
            "{base}{}{}",
            tag.replace("ENABLED", "false"),
            rules(added_route)
        ),
    );
    eventually("the middleware to unload", || async {
        let r = client().get(proxy.url("/")).send().await.expect("r");
        r.headers().get("x-tag").is_none()
    })
    .await;
    expect_event(&mut events, &ack_tx, &mut next_id).await;

    // A broken config is refused; the running one keeps serving.
    write_config(&main, &format!("{base}servcies: {{}}\n{}", rules("")));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(body(proxy.url("/new")).await, (200, "added".into()));
    expect_event(&mut events, &ack_tx, &mut next_id).await;
    // And a good one after it applies again.
    write_config(&main, &format!("{base}{}", rules("")));
    eventually("the route to go away", || async {
        body(proxy.url("/new")).await == (200, "web".into())
    })
    .await;
    for _ in 0..3 {
        expect_event(&mut events, &ack_tx, &mut next_id).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_files_the_watcher_does_not_cover() {
    // Keep SIGHUP from ending this test process before the reloader listens for it.
    let _hold = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("sighup handler");
    let web = Origin::plain("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("streamgate.yaml");
    std::fs::write(dir.path().join("keys.txt"), "old-key\n").expect("keys");
    write_config(
        &main,
        &format!(
            "listen: [\"127.0.0.1:{}\"]\nservices:\n  web: {{ url: \"{}\" }}\n\
             middleware_services:\n  - {{ name: key, type: api_key, config: {{ keys_file: keys.txt }} }}\n\
             middlewares: [key]\nhost_rules:\n  - {{ pattern: \"*\", target: web }}\n",
            free_port(),
            web.url()
        ),
    );
    let proxy = Proxy::start_file(&main).await;
    let with_key = |key: &'static str| {
        let url = proxy.url("/");
        async move {
            client()
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(with_key("old-key").await, 200);
    std::fs::write(dir.path().join("keys.txt"), "new-key\n").expect("keys");
    // The key file is read when the config loads: the SIGHUP reload picks the new one up.
    eventually("SIGHUP to reload the key file", || async {
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status();
        with_key("new-key").await == 200
    })
    .await;
    assert_eq!(with_key("old-key").await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_middleware_keeps_its_state_across_reloads() {
    let web = Origin::plain("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("streamgate.yaml");
    let port = free_port();
    let text = |extra_mw: &str, chain: &str| {
        format!(
            "listen: [\"127.0.0.1:{port}\"]\nservices:\n  web: {{ url: \"{}\" }}\n\
             middleware_services:\n  - {{ name: rl, type: rate_limit, config: {{ rate: 0.01, burst: 1 }} }}\n\
             {extra_mw}middlewares: [{chain}]\nhost_rules:\n  - {{ pattern: \"*\", target: web }}\n",
            web.url()
        )
    };
    write_config(&main, &text("", "rl"));
    let proxy = Proxy::start_file(&main).await;
    assert_eq!(body(proxy.url("/")).await.0, 200);
    assert_eq!(body(proxy.url("/")).await.0, 429);
    // The new config adds a marker to every answer, so the reload shows; the limiter is
    // unchanged and must still be spent.
    write_config(
        &main,
        &text(
            "  - { name: ver, type: headers, config: { response: { set: { x-version: '2' } } } }\n",
            "rl, ver",
        ),
    );
    eventually("the reload to apply", || async {
        let r = client().get(proxy.url("/")).send().await.expect("r");
        if r.headers().get("x-version").is_none() {
            return false;
        }
        assert_eq!(
            r.status(),
            429,
            "the rate limiter's buckets survived the reload"
        );
        true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_says_which_settings_need_an_upgrade() {
    use arc_swap::ArcSwap;
    use streamgate::Config;
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("streamgate.yaml");
    // Pingora's settings are read as the server starts, but for the local addresses of
    // origin connections, which streamgate's connect reads from each config.
    let text = |port: u16, mw: &str| {
        let pingora = if port == 1 {
            "threads: 1\nupstream_keepalive_pool_size: 8\nclient_bind_to_ipv4: [\"127.0.0.2\"]\n"
        } else {
            "threads: 2\nupstream_keepalive_pool_size: 16\nclient_bind_to_ipv4: [\"127.0.0.3\"]\n"
        };
        format!(
            "{pingora}listen: [\"127.0.0.1:{port}\"]\nservices: {{}}\nmiddleware_services:\n{mw}"
        )
    };
    write_config(&main, &text(1, "  - { name: a, type: request_id }\n"));
    let current = ArcSwap::from_pointee(Config::load(&main).expect("loads"));
    write_config(&main, &text(2, "  - { name: b, type: request_id }\n"));
    let done = streamgate::reload::reload(&current).expect("reloads");
    assert_eq!(
        done.not_applied,
        ["listen", "threads", "upstream_keepalive_pool_size"]
    );
    assert_eq!(
        (done.loaded, done.unloaded),
        (vec!["b".to_string()], vec!["a".to_string()])
    );
    assert_eq!(
        current.load().version,
        done.config.version,
        "the new config is live"
    );
    write_config(&main, "listen: nope\n");
    assert!(streamgate::reload::reload(&current).is_err());
    assert_eq!(
        current.load().version,
        done.config.version,
        "a broken config changes nothing"
    );
}

/// When the serving config was loaded, in seconds since the epoch, as the proxy exports it.
fn loaded_at(proxy: &Proxy) -> String {
    let metrics = proxy.state.metrics.render();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("streamgate_config_loaded_timestamp_seconds "))
        .expect("the loaded time is exported")
        .to_string()
}

/// A config file written again as it was (a deploy tool rewriting every file, an editor
/// saving without a change) reloads nothing: the serving config, and the time it was
/// loaded, stay. A change after it reloads.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_again_unchanged_reloads_nothing() {
    let web = Origin::plain("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("streamgate.yaml");
    let text = format!(
        "listen: [\"127.0.0.1:{}\"]\nservices:\n  web: {{ url: \"{}\" }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: web }}\n",
        free_port(),
        web.url()
    );
    write_config(&main, &text);
    let proxy = Proxy::start_file(&main).await;
    let first = loaded_at(&proxy);
    // Past the next whole second, so that a reload would show in the loaded time; then
    // past the watcher's wait for the writes to settle.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_config(&main, &text);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(loaded_at(&proxy), first, "the unchanged file reloaded");
    assert_eq!(body(proxy.url("/")).await, (200, "web".into()));
    write_config(&main, &format!("{text}# changed\n"));
    eventually("the changed file to reload", || async {
        loaded_at(&proxy) != first
    })
    .await;
}

/// The requests a middleware asks (`forward_auth`) are counted under its own route, and
/// a reload, which drops the series of routes that are gone, keeps those.
#[tokio::test]
async fn a_reload_keeps_the_series_of_a_middlewares_own_route() {
    use arc_swap::ArcSwap;
    use streamgate::Config;
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("streamgate.yaml");
    let text = |extra: &str| {
        format!(
            "listen: [\"127.0.0.1:1\"]\nservices:\n  auth: {{ url: \"http://127.0.0.1:9\" }}\n{extra}\
             middleware_services:\n  - {{ name: sso, type: forward_auth, config: {{ service: auth }} }}\n"
        )
    };
    write_config(&main, &text(""));
    let current = ArcSwap::from_pointee(Config::load(&main).expect("loads"));
    let series = "route=\"forward_auth:sso\",service=\"auth\"";
    let metrics = || current.load().state.metrics.render();
    assert!(metrics().contains(series), "{}", metrics());
    write_config(&main, &text("  other: { url: \"http://127.0.0.1:10\" }\n"));
    streamgate::reload::reload(&current).expect("reloads");
    assert!(
        metrics().contains(series),
        "kept across the reload:\n{}",
        metrics()
    );
}
