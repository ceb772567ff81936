//! `GET /v1/events` as an HTTP body: one JSON object a line, as events happen, until the
//! client goes away, `count` events were sent, or thinstackd stops. The first line,
//! `subscribed`, says the stream is live, so a script can start the change it waits for.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::api;
use crate::engine::Event;

/// The `Content-Type` of the stream: newline-delimited JSON.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// The body that streams `events` (at most `count` of them), ending when `closing` turns
/// true.
pub fn body(
    events: broadcast::Receiver<Event>,
    count: Option<u64>,
    closing: watch::Receiver<bool>,
) -> super::layer_stream::StreamedBody {
    let (lines, body) = mpsc::channel(64);
    tokio::spawn(forward(events, count, closing, lines));
    StreamBody::new(ReceiverStream::new(body))
        .map_err(|never| match never {})
        .boxed()
}

type Line = Result<Frame<Bytes>, Infallible>;

async fn forward(
    mut events: broadcast::Receiver<Event>,
    count: Option<u64>,
    mut closing: watch::Receiver<bool>,
    lines: mpsc::Sender<Line>,
) {
    if send(&lines, &api::Event::subscribed(crate::engine::now_ns()))
        .await
        .is_err()
    {
        return;
    }
    let mut sent = 0u64;
    while count.is_none_or(|count| sent < count) {
        let event = tokio::select! {
            received = events.recv() => match received {
                Ok(event) => api::Event::from(event),
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    api::Event::lost(crate::engine::now_ns(), lost)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = closing.wait_for(|closing| *closing) => return,
            () = lines.closed() => return,
        };
        if send(&lines, &event).await.is_err() {
            return;
        }
        sent += 1;
    }
}

/// Send `event` as one line; an error when the client went away.
async fn send(lines: &mpsc::Sender<Line>, event: &api::Event) -> Result<(), ()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    lines
        .send(Ok(Frame::data(Bytes::from(line))))
        .await
        .map_err(|_| ())
}
