//! A blocking client for thinstackd's API, used by the `thinstack` command, benchmarks and
//! tests. It keeps one connection open across requests.
//!
//! HTTP/1.1 over a plain `UnixStream`, with `httparse` reading the response head: a command
//! makes one or two requests, and an async runtime and a full HTTP client cost more to start
//! than the request itself (under emulation, tens of milliseconds per command; BENCHMARKS.md).
//! The daemon always answers with a `Content-Length` body.

use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;
use crate::error::ErrorKind;

mod transfer;

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
    /// Reading or writing a local file or pipe failed (a stream's input or output).
    #[error("{0}")]
    Local(String),
}

/// The `thinstack` command's exit code for a failure of `kind` (`None`: the daemon was
/// unreachable). Stable: scripts branch on it (README, "Exit codes").
pub fn exit_code_of(kind: Option<ErrorKind>) -> u8 {
    match kind {
        None => 7,
        Some(ErrorKind::NotFound) => 3,
        Some(ErrorKind::AlreadyExists) => 4,
        Some(ErrorKind::Busy) => 5,
        Some(ErrorKind::NoSpace) => 6,
        Some(ErrorKind::Permission) => 8,
        Some(
            ErrorKind::Invalid
            | ErrorKind::Unsupported
            | ErrorKind::Inconsistent
            | ErrorKind::Kernel
            | ErrorKind::Command
            | ErrorKind::Io,
        ) => 1,
    }
}

impl ClientError {
    /// The error's kind, for exit codes; `None` when the daemon was unreachable.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { kind, .. } => Some(*kind),
            ClientError::Unreachable { .. } => None,
            ClientError::Protocol(_) | ClientError::Local(_) => Some(ErrorKind::Io),
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
    connection: Option<UnixStream>,
}

/// Most header lines a response may carry.
const MAX_HEADERS: usize = 32;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

impl Client {
    /// A client for the daemon at `socket` (connected at the first request).
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
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

    /// `GET path` of a route that answers with text (`/metrics`).
    pub fn get_text(&mut self, path: &str) -> Result<String, ClientError> {
        let (status, bytes) = self.exchange("GET", path, &[])?;
        if (200..300).contains(&status) {
            return String::from_utf8(bytes)
                .map_err(|e| ClientError::Protocol(format!("GET {path}: {e}")));
        }
        Err(error_of("GET", path, status, &bytes))
    }

    /// `GET path` of a route that streams lines (`/v1/events`): `line` is called with each,
    /// as it comes, until it returns false or the daemon ends the stream.
    pub fn stream_lines(
        &mut self,
        path: &str,
        mut line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let mut chunks = self.get_chunked(path)?;
        let mut pending = Vec::new();
        while let Some(data) = chunks.next_chunk().map_err(|e| self.broke(&e))? {
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let text: Vec<u8> = pending.drain(..=end).collect();
                if !line(String::from_utf8_lossy(&text[..end]).as_ref()) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// `GET path` on a new connection, for a route that answers with a chunked stream: the
    /// stream once the daemon accepted, or its error.
    fn get_chunked(&mut self, path: &str) -> Result<Chunks<UnixStream>, ClientError> {
        let mut stream = self.connect()?;
        stream
            .write_all(&request_bytes("GET", path, &[]))
            .map_err(|e| self.broke(&e.to_string()))?;
        let head = read_head(&mut stream).map_err(|e| self.broke(&e))?;
        if !(200..300).contains(&head.status) || !head.chunked {
            let (status, body, _) = read_body(head, &mut stream).map_err(|e| self.broke(&e))?;
            return Err(error_of("GET", path, status, &body));
        }
        Ok(Chunks::new(stream, head.rest))
    }

    /// Send one request and decode the answer (or the error).
    pub fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.exchange(method, path, body.as_deref().unwrap_or_default())?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("{method} {path}: {e}")));
        }
        Err(error_of(method, path, status, &bytes))
    }

    /// Status and body of one request. A kept-alive connection the daemon closed meanwhile
    /// refuses the request as it is written (EPIPE): that one is replaced, once.
    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let request = request_bytes(method, path, body);
        let reused = self.connection.is_some();
        let mut stream = match self.connection.take() {
            Some(stream) => stream,
            None => self.connect()?,
        };
        if let Err(e) = stream.write_all(&request) {
            if !reused {
                return Err(self.broke(&e.to_string()));
            }
            stream = self.connect()?;
            stream
                .write_all(&request)
                .map_err(|e| self.broke(&e.to_string()))?;
        }
        // Once sent, a broken connection is not retried: the operation may have happened.
        let (status, response, keep_alive) =
            read_response(&mut stream).map_err(|e| self.broke(&e))?;
        if keep_alive {
            self.connection = Some(stream);
        }
        Ok((status, response))
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|e| ClientError::Unreachable {
            socket: self.socket.clone(),
            reason: e.to_string(),
        })
    }

    fn broke(&self, reason: &str) -> ClientError {
        ClientError::Protocol(format!(
            "the connection to thinstackd broke during the request ({reason}); it may or may not have been carried out: check with `thinstack layer inspect` or `layer list`"
        ))
    }
}

/// The error a failed request's answer gives.
fn error_of(method: &str, path: &str, status: u16, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            status,
            kind: body.error.kind,
            message: body.error.message,
        },
        Err(_) => ClientError::Protocol(format!(
            "{method} {path}: status {status}: {}",
            String::from_utf8_lossy(bytes)
        )),
    }
}

fn request_bytes(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A response's head, as far as thinstack reads it, and what was read of the body already.
struct Head {
    status: u16,
    chunked: bool,
    content_length: Option<String>,
    keep_alive: bool,
    rest: Vec<u8>,
}

/// Read a response's head.
fn read_head(stream: &mut impl Read) -> Result<Head, String> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let read = match stream.read(&mut chunk) {
            Ok(0) => return Err("the daemon closed the connection without answering".into()),
            Ok(n) => n,
            Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        buffer.extend_from_slice(&chunk[..read]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&buffer) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("malformed response: {e}")),
        };
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        return Ok(Head {
            status: response.code.unwrap_or_default(),
            chunked: header("transfer-encoding").is_some_and(|t| t.contains("chunked")),
            content_length: header("content-length"),
            keep_alive: header("connection").as_deref() != Some("close"),
            rest: buffer.split_off(head_len),
        });
    }
}

/// A chunked body (RFC 9112, section 7.1), read a chunk at a time.
struct Chunks<R> {
    stream: R,
    buffer: Vec<u8>,
    /// The last chunk (size 0) was read: the sender ended the body itself, rather than the
    /// connection ending under it.
    finished: bool,
}

impl<R: Read> Chunks<R> {
    fn new(stream: R, already: Vec<u8>) -> Self {
        Chunks {
            stream,
            buffer: already,
            finished: false,
        }
    }

    /// Read until `buffer` holds at least `n` bytes; false at the end of the stream.
    fn fill(&mut self, n: usize) -> Result<bool, String> {
        let mut chunk = [0u8; 64 * 1024];
        while self.buffer.len() < n {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(true)
    }

    /// The next chunk's data; `None` after the last chunk, or where the stream ends.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let size_line = loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                break end;
            }
            if self.buffer.len() > MAX_HEAD {
                return Err("a chunk size line that never ends".into());
            }
            let want = self.buffer.len() + 1;
            if !self.fill(want)? {
                return Ok(None);
            }
        };
        let line = String::from_utf8_lossy(&self.buffer[..size_line]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("a bad chunk size {line:?}"))?;
        if size == 0 {
            self.finished = true;
            return Ok(None);
        }
        let start = size_line + 2;
        if !self.fill(start + size + 2)? {
            return Err("the stream ended inside a chunk".into());
        }
        let data = self.buffer[start..start + size].to_vec();
        self.buffer.drain(..start + size + 2);
        Ok(Some(data))
    }
}

/// Read one response: its status, its body, and whether the connection stays open.
fn read_response(stream: &mut impl Read) -> Result<(u16, Vec<u8>, bool), String> {
    let head = read_head(stream)?;
    read_body(head, stream)
}

/// The rest of a response whose `head` was read: its status, its body, and whether the
/// connection stays open.
fn read_body(head: Head, stream: &mut impl Read) -> Result<(u16, Vec<u8>, bool), String> {
    if head.chunked {
        return Err("a response without Content-Length is not expected from thinstackd".into());
    }
    let length: usize = head
        .content_length
        .ok_or("the response has no Content-Length")?
        .parse()
        .map_err(|e| format!("bad Content-Length: {e}"))?;
    let mut body = head.rest;
    if body.len() < length {
        let start = body.len();
        body.resize(length, 0);
        stream
            .read_exact(&mut body[start..])
            .map_err(|e| format!("reading the response body: {e}"))?;
    }
    body.truncate(length);
    Ok((head.status, body, head.keep_alive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_split_anywhere_is_read_whole() {
        let text = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"a\": true}";
        // A reader that hands out three bytes at a time.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(3).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let (status, body, keep_alive) = read_response(&mut Trickle(text)).unwrap();
        assert_eq!(
            (status, body.as_slice(), keep_alive),
            (404, &b"{\"a\": true}"[..], true)
        );
    }

    #[test]
    fn connection_close_and_bad_answers_are_noticed() {
        let text = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}";
        let (_, _, keep_alive) = read_response(&mut &text[..]).unwrap();
        assert!(!keep_alive);
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert!(read_response(&mut &chunked[..]).is_err());
        let short = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}";
        assert!(read_response(&mut &short[..]).unwrap_err().contains("body"));
        assert!(read_response(&mut &b""[..]).unwrap_err().contains("closed"));
        assert!(read_response(&mut &b"garbage\r\n\r\n"[..]).is_err());
    }

    #[test]
    fn a_chunked_stream_is_read_a_chunk_at_a_time() {
        let body = b"5\r\nhello\r\n3;x=y\r\n an\r\n0\r\n\r\n";
        let mut chunks = Chunks::new(&body[2..], body[..2].to_vec());
        assert_eq!(chunks.next_chunk().unwrap().unwrap(), b"hello");
        assert_eq!(chunks.next_chunk().unwrap().unwrap(), b" an");
        assert_eq!(chunks.next_chunk().unwrap(), None);
        let cut = b"5\r\nhel";
        assert!(Chunks::new(&cut[..], Vec::new()).next_chunk().is_err());
        assert!(Chunks::new(&b"zz\r\n"[..], Vec::new())
            .next_chunk()
            .is_err());
    }

    #[test]
    fn requests_carry_their_length() {
        let bytes = request_bytes("POST", "/v1/layers", b"{}");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("POST /v1/layers HTTP/1.1\r\n"));
        assert!(text.contains("content-length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }
}
