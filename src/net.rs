//! A plain TCP connection as Pingora's HTTP code takes one ([`Tcp`]): the socket, and the
//! bytes a peek read ahead of the reader; nothing else.
//!
//! Pingora's own L4 stream is 376 bytes: a buffered stream (with write buffering the
//! listeners turn off), a list of pushed-back reads, socket and proxy digests, timing
//! figures, a tracer, pending-time counters. An event stream holds two connections, its
//! client's and its origin's, for as long as it is open, and the relay uses none of that:
//! it frames and gathers its own writes, the client's addresses are kept by its admission
//! (`listen::admission::Admitted`) and the origin's are the endpoint's. Pingora's server,
//! pool and HTTP/2 client take any [`IO`]; its TLS acceptor and connector take its L4
//! stream, so TLS connections keep that.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, IO,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plain TCP connection (see the module docs).
#[derive(Debug)]
pub struct Tcp {
    socket: TcpStream,
    /// Bytes a peek read (Pingora peeks for the HTTP/2 preface on h2c listeners), served
    /// before the socket's; empty, and unallocated, otherwise.
    peeked: Vec<u8>,
}

impl Tcp {
    /// The socket.
    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }
}

impl From<TcpStream> for Tcp {
    fn from(socket: TcpStream) -> Self {
        Tcp {
            socket,
            peeked: Vec::new(),
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.peeked.is_empty() {
            let n = this.peeked.len().min(buf.remaining());
            buf.put_slice(&this.peeked[..n]);
            this.peeked.drain(..n);
            if this.peeked.is_empty() {
                this.peeked = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Tcp {
    async fn shutdown(&mut self) {
        if let Err(e) = tokio::io::AsyncWriteExt::shutdown(&mut self.socket).await {
            log::debug!("shutting a connection down: {e}");
        }
    }
}

impl UniqueID for Tcp {
    fn id(&self) -> UniqueIDType {
        self.socket.as_raw_fd()
    }
}

impl Ssl for Tcp {}

impl GetTimingDigest for Tcp {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for Tcp {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Tcp {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}

#[async_trait]
impl Peek for Tcp {
    /// Waits until `buf` is full, as Pingora's own stream does, and reads it again next:
    /// the bytes are read and kept to be served before the socket's.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let have = self.peeked.len().min(buf.len());
        buf[..have].copy_from_slice(&self.peeked[..have]);
        if have < buf.len() {
            self.socket.read_exact(&mut buf[have..]).await?;
            self.peeked.extend_from_slice(&buf[have..]);
        }
        Ok(true)
    }
}

/// `stream` as a [`Tcp`], when it is one.
pub fn tcp(stream: &dyn IO) -> Option<&Tcp> {
    stream.as_any().downcast_ref()
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (Tcp, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let peer = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (Tcp::from(accepted), peer)
    }

    /// A peek waits for all it asks for, however it arrives, and the reads that follow
    /// get those bytes first, then the rest, and the buffer is given back.
    #[tokio::test]
    async fn peeked_bytes_are_read_again_first() {
        let (mut tcp, mut peer) = pair().await;
        peer.write_all(b"PRI * ").await.expect("write");
        let peeking = tokio::spawn(async move {
            let mut preface = [0u8; 8];
            let peeked = tcp.try_peek(&mut preface).await.expect("peek");
            (tcp, peeked, preface)
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        peer.write_all(b"HTTP/2.0").await.expect("write");
        let (mut tcp, peeked, preface) = peeking.await.expect("task");
        assert!(peeked);
        assert_eq!(&preface, b"PRI * HT");
        let mut again = [0u8; 4];
        assert!(tcp.try_peek(&mut again).await.expect("peek"));
        assert_eq!(&again, b"PRI ");
        let mut read = [0u8; 14];
        tcp.read_exact(&mut read).await.expect("read");
        assert_eq!(&read, b"PRI * HTTP/2.0");
        assert_eq!(tcp.peeked.capacity(), 0, "nothing held once read");
    }

    /// The connection is the socket and a handle to nothing: no digests, no TLS.
    #[tokio::test]
    async fn it_is_the_socket_alone() {
        let (tcp, _peer) = pair().await;
        assert!(tcp.get_socket_digest().is_none());
        assert!(tcp.get_ssl().is_none());
        assert!(
            std::mem::size_of::<Tcp>() <= 64,
            "{}",
            std::mem::size_of::<Tcp>()
        );
    }
}
