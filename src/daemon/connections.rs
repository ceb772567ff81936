//! The cap on open connections (`daemon.max_connections`), and the answer a client beyond it
//! gets: an HTTP 503 with the JSON error body, at once, so the accept loop never waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{ErrorBody, ErrorDetail};
use crate::audit::Peer;
use crate::error::ErrorKind;

/// How long a refused client gets to send its request and close, before the refusal closes.
/// Closing a Unix socket with the client's request unread would reset the connection, and the
/// client could lose the answer before reading it.
const REFUSAL_LINGER: Duration = Duration::from_secs(5);

/// What of a refused client's request is read (and dropped) at most.
const REFUSAL_READ_MAX: usize = 64 << 10;

/// Seconds a refused client is told to wait before it tries again.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// Permits for open connections: one held for as long as each connection is open.
pub struct Connections {
    permits: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    /// Room for `max` connections at once.
    pub fn new(max: u32) -> Self {
        Connections {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// A permit for a new connection, or `None` when `max` are open.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.max as usize - self.permits.available_permits()
    }

    /// Refuse `stream`, a client beyond the cap: answer 503 and close, on a task of its own.
    pub fn refuse(&self, stream: UnixStream, peer: Peer) {
        tracing::warn!(
            uid = peer.uid(),
            pid = peer.pid(),
            max_connections = self.max,
            "refused a connection: daemon.max_connections connections are open"
        );
        let answer = refusal(self.max);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_LINGER, send_and_close(stream, answer)).await;
        });
    }
}

/// The whole HTTP response a refused client gets.
fn refusal(max: u32) -> Vec<u8> {
    let message = format!(
        "thinstackd has {max} connections open, its daemon.max_connections; close idle connections or raise it"
    );
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail {
            kind: ErrorKind::Busy,
            message,
        },
    })
    .unwrap_or_default();
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: {RETRY_AFTER_SECONDS}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    response
}

/// Send the answer, end our side, then read what the client sends until it closes.
async fn send_and_close(mut stream: UnixStream, answer: Vec<u8>) -> std::io::Result<()> {
    stream.write_all(&answer).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let mut read = 0;
    while read < REFUSAL_READ_MAX {
        match stream.read(&mut sink).await? {
            0 => break,
            n => read += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beyond_the_cap_a_client_gets_a_503_that_says_what_to_do() {
        let connections = Connections::new(1);
        let first = connections.admit().expect("room for one");
        assert!(connections.admit().is_none());
        assert_eq!(connections.open(), 1);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        connections.refuse(ours, Peer::default());
        theirs
            .write_all(b"GET /v1/version HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        theirs.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let body: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(body.error.kind, ErrorKind::Busy);
        assert!(
            body.error
                .message
                .contains("1 connections open, its daemon.max_connections"),
            "{}",
            body.error.message
        );
        drop(first);
        assert!(connections.admit().is_some(), "room again once one closed");
    }
}
