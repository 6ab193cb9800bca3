//! What one affinity pin costs in heap bytes, counted by a global allocator of this test
//! binary (it holds this one test, so nothing else allocates meanwhile): the figure the
//! README and `streamgate -t` quote (`BYTES_PER_PIN`).

use std::net::SocketAddr;

use pingora_http::{RequestHeader, ResponseHeader};
use streamgate::metrics::Metrics;
use streamgate::upstream::affinity::{AffinityFile, Pins, BYTES_PER_PIN};

#[path = "support/counting.rs"]
mod counting;

/// glibc's malloc rounds each request up to a 16-byte multiple with 8 bytes of header (a
/// pin's 72-byte node takes an 80-byte chunk); the counting allocator sees requests only.
fn chunk(request: usize) -> usize {
    (request + 8).div_ceil(16) * 16
}

#[test]
fn a_pin_costs_at_most_bytes_per_pin() {
    let metrics = Metrics::new();
    let file: AffinityFile =
        serde_yaml::from_str("{ header: Mcp-Session-Id, max_entries: 1000000 }").expect("parses");
    let affinity = file.build(metrics.affinity("mcp"));
    let from = SocketAddr::from(([10, 0, 0, 1], 8080));
    let request = RequestHeader::build("POST", b"/mcp", None).expect("request");
    let pin = |pins: &Pins, i: usize| {
        let mut response = ResponseHeader::build(200, None).expect("response");
        let value = format!("{i:08x}-0000-4000-8000-000000000000");
        response
            .insert_header("mcp-session-id", value)
            .expect("header");
        affinity.learn(pins, &request, &response, from);
    };
    let mut rows = Vec::new();
    // 100,000 is the default bound; 57,345 is one past a growth of the hash index, where
    // it is emptiest (the most bytes per pin).
    for count in [57_345, 100_000] {
        let before = counting::held();
        let pins = Pins::new();
        for i in 0..count {
            pin(&pins, i);
        }
        assert_eq!(pins.len(), count);
        let held = (counting::held() - before) as f64;
        rows.push((count, held / count as f64));
    }
    for (count, requested) in &rows {
        let node = chunk(72) - 72;
        let per_pin = requested + node as f64;
        eprintln!(
            "{count} pins: {requested:.1} bytes requested per pin, {per_pin:.1} with malloc's \
             chunk overhead"
        );
        assert!(
            per_pin <= BYTES_PER_PIN as f64,
            "{per_pin:.1} bytes per pin at {count} pins, documented as at most {BYTES_PER_PIN}"
        );
    }
}
