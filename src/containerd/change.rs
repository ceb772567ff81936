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
    /// The RPC's name, such as `containerd.Prepare`.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::{Arc, Mutex};
    use tonic::transport::server::Connected;

    /// Log output, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `log` logs, formatted as thinstackd does off a terminal.
    fn logged(log: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = captured.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[tokio::test]
    async fn a_containerd_change_is_audited_with_its_peer_key_namespace_and_code() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, "ns".parse().unwrap());
        request.extensions_mut().insert(ours.connect_info());
        let change = Change::begin("containerd.Remove", &request).on("k");
        let text = logged(|| change.finished::<()>(&Err(Error::not_found("no snapshot k"))));
        let (uid, pid) = (nix::unistd::geteuid(), std::process::id());
        let expected = format!(
            "INFO audit uid={uid} pid={pid} operation=\"containerd.Remove\" layer=\"k\" namespace=\"ns\" status=NotFound outcome=\"failed\" error=\"no snapshot k\""
        );
        assert!(text.contains(&expected), "{text}");
        let text =
            logged(|| Change::begin("containerd.Cleanup", &Request::new(())).finished(&Ok(())));
        assert!(
            text.contains("audit uid=unknown pid=unknown operation=\"containerd.Cleanup\" namespace=\"\" status=Ok outcome=\"ok\""),
            "{text}"
        );
    }
}
