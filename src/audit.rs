//! The audit log: one line for each request that changes something, on the API socket and on
//! containerd's, naming who asked (the peer's uid and pid, from `SO_PEERCRED`), the operation,
//! the layer, and how it ended.
//!
//! Lines are logged at info with the target `thinstack::audit` and the message `audit`, so
//! `RUST_LOG=thinstack::audit=info` keeps only them and `grep ' audit '` finds them in the
//! journal:
//!
//! ```text
//! INFO audit uid=0 pid=4242 operation="DELETE /v1/layers/{name}" layer="web" status=200 outcome="ok"
//! INFO audit uid=1000 pid=77 operation="containerd.Remove" layer="k" namespace="default" status=NotFound outcome="failed" error="..."
//! ```

use std::fmt;

use tokio::net::unix::UCred;
use tokio::net::UnixStream;

/// The target audit lines are logged under.
pub const TARGET: &str = "thinstack::audit";

/// Who is at the other end of a Unix socket connection, as the kernel recorded it when the
/// connection was made (`SO_PEERCRED`): the connecting process, even if it later handed the
/// socket to another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl Peer {
    /// The credentials of `stream`'s peer; unknown (and logged) if the kernel gives none.
    pub fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer::from_cred(Some(cred)),
            Err(e) => {
                tracing::warn!(error = %e, "could not read a client's credentials (SO_PEERCRED); it is audited as unknown");
                Peer::default()
            }
        }
    }

    /// A peer from credentials read elsewhere (tonic reads them for containerd's socket).
    pub fn from_cred(cred: Option<UCred>) -> Peer {
        Peer {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }

    /// The peer's user id, when known.
    pub fn uid(&self) -> Option<u32> {
        self.uid
    }

    /// The peer's process id, when known.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }
}

/// A value or `unknown`, so a missing credential shows as such rather than vanishing.
struct OrUnknown<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrUnknown<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// One audited request.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Who asked.
    pub peer: Peer,
    /// What: `METHOD /route/{template}` for the API, `containerd.<Rpc>` for containerd.
    pub operation: &'a str,
    /// The layer (containerd: the snapshot key), when the request names one.
    pub layer: Option<&'a str>,
    /// containerd's namespace, for containerd's requests.
    pub namespace: Option<&'a str>,
    /// The answer: an HTTP status or a gRPC code.
    pub status: &'a str,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<&'a str>,
}

impl Entry<'_> {
    /// Log the line.
    pub fn log(&self) {
        let outcome = if self.error.is_none() { "ok" } else { "failed" };
        tracing::info!(
            target: TARGET,
            uid = %OrUnknown(self.peer.uid),
            pid = %OrUnknown(self.peer.pid),
            operation = self.operation,
            layer = self.layer,
            namespace = self.namespace,
            status = %self.status,
            outcome,
            error = self.error,
            "audit"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_is_the_process_at_the_other_end() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let peer = Peer::of(&ours);
        assert_eq!(peer.uid(), Some(nix::unistd::geteuid().as_raw()));
        assert_eq!(peer.pid(), Some(std::process::id() as i32));
        assert_eq!(OrUnknown(Peer::default().pid()).to_string(), "unknown");
    }
}
