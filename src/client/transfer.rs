//! Requests whose bodies are byte streams of any length (a layer's export and import): the
//! body goes through as it comes, in chunks, never held whole in memory.

use std::io::{ErrorKind as IoErrorKind, Read, Write};

use serde::de::DeserializeOwned;

use super::{error_of, read_body, read_head, Client, ClientError};

/// Bytes sent in one chunk of a streamed request body.
const CHUNK: usize = 1 << 20;

impl Client {
    /// `GET path` of a route that answers with bytes: the body is copied to `out` as it
    /// comes. Returns the bytes copied. A refusal is the daemon's error; a body that ends
    /// before the daemon ended it (it failed midway) is an error too, so a cut stream is
    /// never taken for a whole one.
    pub fn get_to(&mut self, path: &str, out: &mut dyn Write) -> Result<u64, ClientError> {
        let mut chunks = self.get_chunked(path)?;
        let mut copied = 0u64;
        while let Some(data) = chunks.next_chunk().map_err(|e| self.broke(&e))? {
            out.write_all(&data)
                .map_err(|e| ClientError::Local(format!("writing the stream: {e}")))?;
            copied += data.len() as u64;
        }
        if !chunks.finished {
            return Err(ClientError::Protocol(format!(
                "GET {path}: the stream ended after {copied} bytes, before thinstackd finished it (it failed midway; its log says why)"
            )));
        }
        out.flush()
            .map_err(|e| ClientError::Local(format!("writing the stream: {e}")))?;
        Ok(copied)
    }

    /// `POST path` with `input` as the body, sent in chunks as it is read; the JSON answer
    /// decoded. The daemon may refuse before it has read the whole body (a stream for
    /// another base, say): its answer is read and returned as soon as it stops reading.
    pub fn post_from<T: DeserializeOwned>(
        &mut self,
        path: &str,
        input: &mut dyn Read,
    ) -> Result<T, ClientError> {
        let mut stream = self.connect()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let mut sent = stream.write_all(head.as_bytes()).is_ok();
        let mut buf = vec![0u8; CHUNK];
        while sent {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(e) => {
                    // The body is left unfinished, so the daemon refuses what it received.
                    return Err(ClientError::Local(format!(
                        "reading the stream to send: {e}"
                    )));
                }
            };
            let mut chunk = format!("{n:x}\r\n").into_bytes();
            chunk.extend_from_slice(&buf[..n]);
            // The last chunk, of size 0, ends the body ("0\r\n\r\n").
            chunk.extend_from_slice(b"\r\n");
            sent = stream.write_all(&chunk).is_ok();
            if n == 0 {
                break;
            }
        }
        // Sent whole, or the daemon stopped reading (it answered already, or went away).
        let head = read_head(&mut stream).map_err(|e| self.broke(&e))?;
        let (status, body, _) = read_body(head, &mut stream).map_err(|e| self.broke(&e))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("POST {path}: {e}")));
        }
        Err(error_of("POST", path, status, &body))
    }
}
