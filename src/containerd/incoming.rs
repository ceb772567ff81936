//! containerd's connections: capped like the API's (`daemon.max_connections`, counted apart),
//! each carrying its peer's credentials into requests for the audit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::audit::Peer;

/// An accepted connection holding its place under the cap until it closes.
pub struct Capped {
    stream: UnixStream,
    _permit: OwnedSemaphorePermit,
}

/// The connections accepted on `listener`, at most `permits`' worth open at once. One beyond
/// that is closed at once, with a warning: gRPC has no answer to give before its handshake,
/// and containerd's client reconnects with backoff.
pub fn capped(
    listener: UnixListener,
    permits: Arc<Semaphore>,
    max: u32,
) -> impl Stream<Item = io::Result<Capped>> {
    UnixListenerStream::new(listener).filter_map(move |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => return Some(Err(e)),
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(Capped {
                stream,
                _permit: permit,
            })),
            Err(_) => {
                let peer = Peer::of(&stream);
                tracing::warn!(
                    uid = peer.uid(),
                    pid = peer.pid(),
                    max_connections = max,
                    "refused a connection to containerd's snapshot service: daemon.max_connections connections are open; close idle ones or raise it"
                );
                None
            }
        }
    })
}

impl Connected for Capped {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_connection_beyond_the_cap_is_closed_and_the_next_after_one_closes_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut incoming = Box::pin(capped(listener, Arc::new(Semaphore::new(1)), 1));
        let _first_client = UnixStream::connect(&path).await.unwrap();
        let first = incoming.next().await.unwrap().unwrap();
        assert_eq!(
            first.connect_info().peer_cred.map(|c| c.pid()),
            Some(Some(std::process::id() as i32))
        );
        let mut refused = UnixStream::connect(&path).await.unwrap();
        // Accepted and closed unserved: nothing comes out of the stream for it.
        let waited = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        assert!(waited.is_err(), "the second connection was not served");
        let mut buffer = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(&mut refused, &mut buffer).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The third takes the place the first left.
        drop(first);
        let _third_client = UnixStream::connect(&path).await.unwrap();
        assert!(incoming.next().await.unwrap().is_ok());
    }
}
