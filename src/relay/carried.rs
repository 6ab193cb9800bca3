//! Event streams over HTTP/2 carried on after Pingora's request is done.
//!
//! Pingora serves each HTTP/2 stream in a task of its own, whose request future (about
//! 16 KiB) lives as long as the request does. A long-lived event stream needs none of it
//! once its response head is out: only its client session, its context and the origin
//! connection. So the relay hands the rest of the stream (the loop, then the record) to
//! the task's server-side wrapper as a [`Carried`] future and lets Pingora's request
//! end; the wrapper runs it in the same task, where Pingora's guard that counts the
//! stream open for `http2.idle_timeout` (and for a graceful shutdown) is still held.
//!
//! The hand-over is a slot that lives for one request: [`carrying`] opens it around
//! Pingora's request and [`hand`] fills it. Outside a slot (a request the server did not
//! wrap), [`hand`] gives the stream back and it stays in Pingora's request.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

/// The rest of an event stream, run after Pingora's request.
pub type Carried = Pin<Box<dyn Future<Output = ()> + Send>>;

tokio::task_local! {
    static SLOT: RefCell<Option<Carried>>;
}

/// Runs `request` with a slot open for a stream to carry on; returns what it returned and
/// the stream handed over, if any.
pub async fn carrying<T>(request: impl Future<Output = T> + Send) -> (T, Option<Carried>) {
    SLOT.scope(RefCell::new(None), async {
        let out = request.await;
        let carried = SLOT.with(|slot| slot.borrow_mut().take());
        (out, carried)
    })
    .await
}

/// Hands `stream` over to run after the current request; gives it back when the request
/// has no slot open (it is then not carried).
pub fn hand(stream: Carried) -> Result<(), Carried> {
    let mut stream = Some(stream);
    // Outside a slot the closure does not run and the stream stays here.
    let _ = SLOT.try_with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = stream.take();
        }
    });
    stream.map_or(Ok(()), Err)
}

/// Whether the current request can hand a stream over.
pub fn open() -> bool {
    SLOT.try_with(|slot| slot.borrow().is_none())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_handed_in_a_slot_comes_out_after_the_request() {
        let (out, carried) = carrying(async {
            assert!(open());
            assert!(hand(Box::pin(async {})).is_ok());
            assert!(!open(), "one stream per request");
            assert!(hand(Box::pin(async {})).is_err());
            7
        })
        .await;
        assert_eq!(out, 7);
        carried.expect("handed").await;
    }

    #[tokio::test]
    async fn without_a_slot_the_stream_is_given_back() {
        assert!(!open());
        assert!(hand(Box::pin(async {})).is_err());
    }
}
