//! The two routes whose bodies are layer streams of any size: `GET .../export` answers with
//! the stream as the engine writes it, and `POST .../import` hands the engine the request
//! body as it arrives. Neither holds a stream in memory: a bounded channel joins the blocking
//! engine call to hyper's body on each side, so a slow peer slows the engine instead.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::in_flight::InFlight;
use super::routes::{self, Call};
use super::Daemon;
use crate::api;
use crate::engine::ImportLayer;
use crate::error::{Error, ErrorKind, Result};
use crate::units::Timeout;

/// A response body that may fail midway: the connection is then cut, so the client sees a
/// stream that did not end, never a short one that looks whole.
pub type StreamedBody = BoxBody<Bytes, BodyError>;

/// Why a streamed body failed.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes gathered before they are handed to hyper as one frame.
const FRAME_BYTES: usize = 256 << 10;

/// Frames in flight between the engine and hyper, each way.
const FRAMES_QUEUED: usize = 8;

type Item = std::result::Result<Frame<Bytes>, BodyError>;

/// `GET /v1/layers/{name}/export[?from=ANCESTOR][&compress=true]`: the stream, once every
/// check passed (until then, an error is answered as any other). The export runs on a
/// blocking thread that holds its place in flight, so a stop waits for it.
pub async fn export(
    daemon: Arc<Daemon>,
    in_flight: &InFlight,
    name: String,
    query: Vec<(String, String)>,
) -> Result<StreamedBody> {
    let call = Call {
        name: Some(&name),
        query,
        body: &[],
    };
    routes::only_query(&call, &["from", "compress"])?;
    let from = routes::query_value(&call, "from").map(str::to_string);
    let compress = routes::flag(&call, "compress")?;
    let place = in_flight.enter().ok_or_else(stopping)?;
    let (ready, checked) = oneshot::channel::<Result<()>>();
    let (frames, body) = mpsc::channel::<Item>(FRAMES_QUEUED);
    tokio::task::spawn_blocking(move || {
        let _place = place;
        let mut ready = Some(ready);
        let writer = FrameWriter::new(frames.clone());
        let exported = daemon.engine.export(&name, from.as_deref(), compress, || {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Ok(()));
            }
            Ok(writer)
        });
        let failed = match exported {
            Ok((mut writer, _)) => writer
                .flush()
                .err()
                .map(|e| Error::io("sending the stream", e)),
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            match ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(e));
                }
                None => {
                    tracing::warn!(layer = %name, error = %e, "an export failed midway; its stream was cut");
                    let _ = frames.blocking_send(Err(e.into()));
                }
            }
        }
    });
    match checked.await {
        Ok(Ok(())) => Ok(StreamBody::new(ReceiverStream::new(body)).boxed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::inconsistent(
            "the export's thread ended without an answer",
        )),
    }
}

/// `POST /v1/layers/{name}/import[?parent=P]`: the body is the stream. Each piece of it must
/// arrive within `timeout` of the last (`daemon.request_timeout`), so a stalled sender
/// cannot hold the layer's lock. Returns the new layer and whether the body was read whole
/// (if not, the connection is closed after the answer).
pub async fn import(
    daemon: Arc<Daemon>,
    name: String,
    query: Vec<(String, String)>,
    body: Incoming,
    timeout: Timeout,
) -> (Result<api::Layer>, bool) {
    let call = Call {
        name: Some(&name),
        query,
        body: &[],
    };
    let checked = routes::refuse_once_destroyed(&daemon, "POST")
        .and_then(|()| routes::only_query(&call, &["parent"]));
    if let Err(e) = checked {
        return (Err(e), false);
    }
    let parent = routes::query_value(&call, "parent").map(str::to_string);
    let (pieces, received) = mpsc::channel(FRAMES_QUEUED);
    let pump = tokio::spawn(pump_body(body, pieces, timeout));
    let request = ImportLayer { name, parent };
    let imported = tokio::task::spawn_blocking(move || {
        let reader = BodyReader::new(received);
        daemon.engine.import(&request, reader)
    })
    .await;
    let read_whole = matches!(pump.await, Ok(true));
    let result = match imported {
        Ok(Ok((layer, _))) => Ok(api::Layer::from(layer)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::inconsistent(
            "the import's thread panicked; see the log",
        )),
    };
    (result, read_whole)
}

fn stopping() -> Error {
    Error::new(ErrorKind::Busy, super::in_flight::STOPPING)
}

/// Feed the request body's data to `pieces` until it ends (true), the reader goes away, or a
/// piece fails to come in time (both false: the body was not read whole).
async fn pump_body(
    mut body: Incoming,
    pieces: mpsc::Sender<io::Result<Bytes>>,
    timeout: Timeout,
) -> bool {
    loop {
        let piece = match tokio::time::timeout(timeout.duration(), body.frame()).await {
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue, // trailers carry nothing for us
            },
            Ok(Some(Err(e))) => Err(io::Error::other(format!("the request body broke: {e}"))),
            Ok(None) => return true,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no part of the stream arrived within {timeout} (daemon.request_timeout)"),
            )),
        };
        let failed = piece.is_err();
        if pieces.send(piece).await.is_err() || failed {
            return false;
        }
    }
}

/// The request body as a blocking reader, for the engine's thread.
struct BodyReader {
    pieces: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl BodyReader {
    fn new(pieces: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        BodyReader {
            pieces,
            current: Bytes::new(),
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.pieces.blocking_recv() {
                Some(piece) => self.current = piece?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The engine's side of an export's body: bytes gathered into frames and sent, blocking
/// while hyper's side is full. A client that went away fails the next write.
struct FrameWriter {
    frames: mpsc::Sender<Item>,
    gathered: Vec<u8>,
}

impl FrameWriter {
    fn new(frames: mpsc::Sender<Item>) -> Self {
        FrameWriter {
            frames,
            gathered: Vec::with_capacity(FRAME_BYTES),
        }
    }

    fn send_gathered(&mut self) -> io::Result<()> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let frame = std::mem::replace(&mut self.gathered, Vec::with_capacity(FRAME_BYTES));
        self.frames
            .blocking_send(Ok(Frame::data(Bytes::from(frame))))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.gathered.extend_from_slice(buf);
        if self.gathered.len() >= FRAME_BYTES {
            self.send_gathered()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_gathered()
    }
}
