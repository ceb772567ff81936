//! The audit of containerd's requests that change something (Prepare, View, Commit, Remove,
//! Update, Cleanup): who asked, for which snapshot key, and how it ended.

use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Status};

use super::service::{code_of, NAMESPACE_HEADER};
use crate::audit::{self, Peer};

/// One request that changes something, audited when it ends.
pub struct Change {
    peer: Peer,
    operation: &'static str,
    namespace: String,
    key: String,
}

impl Change {
    /// What `request` asks for; `operation` is its RPC's name, such as `containerd.Prepare`.
    pub fn begin<T>(operation: &'static str, request: &Request<T>) -> Change {
        // Set by tonic from the connection (SO_PEERCRED); absent only in unit tests.
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        // Lossy: a namespace that is not text is refused, and still audited.
        let namespace = request
            .metadata()
            .get(NAMESPACE_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        Change {
            peer: Peer::from_cred(cred),
            operation,
            namespace,
            key: String::new(),
        }
    }

    /// The snapshot key the request is about.
    pub fn on(mut self, key: &str) -> Change {
        self.key = key.to_string();
        self
    }

    /// Audit a request refused before it reached the engine.
    pub fn refused(&self, status: &Status) {
        self.log(status.code(), Some(status.message()));
    }

    /// Audit the engine's result.
    pub fn finished<T>(&self, result: &crate::error::Result<T>) {
        match result {
            Ok(_) => self.log(Code::Ok, None),
            Err(e) => self.log(code_of(e.kind()), Some(&e.to_string())),
        }
    }

    fn log(&self, code: Code, error: Option<&str>) {
        audit::Entry {
            peer: self.peer,
            operation: self.operation,
            layer: (!self.key.is_empty()).then_some(self.key.as_str()),
            namespace: Some(&self.namespace),
            status: &format!("{code:?}"),
            error,
        }
        .log();
    }
}
