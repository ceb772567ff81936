//! A blocking client for thinstackd's API, used by the `thinstack` command, benchmarks and
//! tests. It keeps one connection open across requests.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;
use crate::error::ErrorKind;

/// Where clients look for the daemon unless told (`--socket` or `THINSTACK_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/thinstack/thinstack.sock";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach thinstackd at {socket}: {reason}; start it (systemctl start thinstackd, or run thinstackd) or name its socket with --socket or THINSTACK_SOCKET")]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// The daemon refused or failed the request.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error's kind.
        kind: ErrorKind,
        /// What failed and what to do.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("thinstackd answered something unexpected: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The error's kind, for exit codes; `None` when the daemon was unreachable.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { kind, .. } => Some(*kind),
            ClientError::Unreachable { .. } => None,
            ClientError::Protocol(_) => Some(ErrorKind::Io),
        }
    }

    /// The error as the API's JSON body.
    pub fn to_json(&self) -> serde_json::Value {
        let kind = match self {
            ClientError::Unreachable { .. } => "unreachable".to_string(),
            other => other.kind().unwrap_or(ErrorKind::Io).to_string(),
        };
        serde_json::json!({ "error": { "kind": kind, "message": self.to_string() } })
    }
}

/// A connection to thinstackd.
pub struct Client {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
    connection: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for the daemon at `socket` (connected at the first request).
    pub fn new(socket: &Path) -> Client {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a single-threaded runtime");
        Client {
            socket: socket.to_path_buf(),
            runtime,
            connection: None,
        }
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        self.call("DELETE", path, None)
    }

    /// Send one request and decode the answer (or the error).
    pub fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.exchange(method, path, body)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("{method} {path}: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status,
                kind: body.error.kind,
                message: body.error.message,
            }),
            Err(_) => Err(ClientError::Protocol(format!(
                "{method} {path}: status {status}: {}",
                String::from_utf8_lossy(&bytes)
            ))),
        }
    }

    /// Status and body of one request; a kept-alive connection the daemon closed is replaced
    /// once.
    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let reused = self.connection.is_some();
        let body = Bytes::from(body.unwrap_or_default());
        match self.send(method, path, body.clone()) {
            Err(SendError::Closed(_)) if reused => {
                self.connection = None;
                self.send(method, path, body)
                    .map_err(SendError::into_client)
            }
            other => other.map_err(SendError::into_client),
        }
    }

    fn send(&mut self, method: &str, path: &str, body: Bytes) -> Result<(u16, Bytes), SendError> {
        let socket = self.socket.clone();
        let connection = self.connection.take();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| SendError::Other(ClientError::Protocol(e.to_string())))?;
        let (result, connection) = self.runtime.block_on(async move {
            let mut sender = match connection {
                Some(sender) => sender,
                None => match connect(&socket).await {
                    Ok(sender) => sender,
                    Err(e) => return (Err(e), None),
                },
            };
            if sender.ready().await.is_err() {
                return (Err(SendError::Closed("connection closed".into())), None);
            }
            // Once sent, a broken connection is not retried: the operation may have happened.
            let broke = |e: hyper::Error| {
                SendError::Other(ClientError::Protocol(format!(
                    "the connection to thinstackd broke during the request ({e}); it may or may not have been carried out: check with `thinstack layer inspect` or `layer list`"
                )))
            };
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(e) => return (Err(broke(e)), None),
            };
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Ok(collected) => (Ok((status, collected.to_bytes())), Some(sender)),
                Err(e) => (Err(broke(e)), None),
            }
        });
        self.connection = connection;
        result
    }
}

enum SendError {
    /// The kept-alive connection was closed before the request was sent; it may be retried.
    Closed(String),
    Other(ClientError),
}

impl SendError {
    fn into_client(self) -> ClientError {
        match self {
            SendError::Closed(reason) => {
                ClientError::Protocol(format!("the connection to thinstackd broke: {reason}"))
            }
            SendError::Other(e) => e,
        }
    }
}

async fn connect(socket: &Path) -> Result<SendRequest<Full<Bytes>>, SendError> {
    let unreachable = |reason: String| {
        SendError::Other(ClientError::Unreachable {
            socket: socket.to_path_buf(),
            reason,
        })
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
