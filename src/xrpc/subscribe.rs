//! `com.atproto.sync.subscribeRepos`: the firehose over WebSocket.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::error::{XrpcError, XrpcResult};
use super::extract::XrpcQuery;
use crate::app::AppState;
use crate::atp::event;
use crate::sequencer::SubscriberSlot;

/// A send that takes longer than this means the consumer is not reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// The closing error frame (e.g. `ConsumerTooSlow`) goes to a consumer that is
/// probably not reading: try briefly, never hold the connection for long.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);
/// Clients only send control frames, so the read buffer can be small: with
/// tungstenite's 128 KiB default, 1,000 idle subscribers held ~120 MiB.
const READ_BUFFER: usize = 4 * 1024;
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// Events read from the log per query while replaying.
const REPLAY_PAGE: i64 = 500;
/// Clients only send control frames; anything bigger is refused.
const MAX_INCOMING_MESSAGE: usize = 16 * 1024;

#[derive(Deserialize)]
pub struct Params {
    cursor: Option<String>,
}

/// # `com.atproto.sync.subscribeRepos`
pub async fn subscribe_repos(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    XrpcQuery(p): XrpcQuery<Params>,
    ws: WebSocketUpgrade,
) -> XrpcResult<Response> {
    let cursor = match p.cursor.as_deref() {
        None => None,
        Some(c) => match c.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                return Err(XrpcError::invalid_request("cursor must be a non-negative integer"));
            }
        },
    };
    let slot = state
        .sequencer
        .admit(crate::ratelimit::client_ip(peer.ip(), &headers, state.config.trusted_proxies))
        .ok_or_else(|| {
            metrics::counter!("roost_rate_limited_total", "limit" => "firehose").increment(1);
            XrpcError::rate_limited("Too many firehose subscribers")
        })?;
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_INCOMING_MESSAGE)
        .max_frame_size(MAX_INCOMING_MESSAGE)
        .on_upgrade(move |socket| serve(state, socket, cursor, slot)))
}

/// Why a stream ended early: an error frame to send before closing.
struct Stop(Option<Bytes>);

impl Stop {
    fn error(name: &str, message: &str) -> Stop {
        Stop(event::error_frame(name, message).ok().map(Bytes::from))
    }
}

async fn serve(state: AppState, socket: WebSocket, cursor: Option<i64>, _slot: SubscriberSlot) {
    let (mut sink, mut source) = socket.split();
    // Read (and drop) whatever the client sends, so pings are answered and a
    // close is noticed.
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    let mut shutdown = state.shutdown.subscribe();
    let outcome =
        pump(&state, &mut Out { sink: &mut sink, shutdown: &mut shutdown }, cursor, &mut closed_rx).await;
    if let Err(Stop(Some(frame))) = outcome {
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, sink.send(Message::Binary(frame))).await;
    }
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, sink.send(Message::Close(None))).await;
    reader.abort();
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// The sending half of a stream, with the shutdown signal that interrupts a
/// send blocked on a consumer that is not reading.
struct Out<'a> {
    sink: &'a mut Sink,
    shutdown: &'a mut tokio::sync::watch::Receiver<bool>,
}

impl Out<'_> {
    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sends one message; `Err(Stop(None))` when the server is shutting down.
    async fn send_message(&mut self, message: Message) -> Result<Result<(), axum::Error>, Stop> {
        let shutdown = &mut *self.shutdown;
        tokio::select! {
            sent = tokio::time::timeout(SEND_TIMEOUT, self.sink.send(message)) => sent.map_err(|_| too_slow()),
            _ = stopping(shutdown) => Err(Stop(None)),
        }
    }
}

/// Resolves once the server starts shutting down (the guard `wait_for` returns
/// is not `Send`, so it must not live in a `select!` output).
async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

async fn send(out: &mut Out<'_>, frame: Bytes) -> Result<(), Stop> {
    let len = frame.len() as u64;
    match out.send_message(Message::Binary(frame)).await? {
        Ok(()) => {
            metrics::counter!("roost_firehose_frames_sent_total").increment(1);
            metrics::counter!("roost_firehose_bytes_sent_total").increment(len);
            Ok(())
        }
        Err(_) => Err(Stop(None)),
    }
}

fn too_slow() -> Stop {
    metrics::counter!("roost_firehose_slow_consumer_disconnects_total").increment(1);
    Stop::error("ConsumerTooSlow", "Stream consumer too slow")
}

async fn pump(
    state: &AppState,
    sink: &mut Out<'_>,
    cursor: Option<i64>,
    closed: &mut tokio::sync::oneshot::Receiver<()>,
) -> Result<(), Stop> {
    // Subscribe before reading the log: anything committed from here on is
    // in `live`, anything before is in the log; `last` removes the overlap.
    let mut live = state.sequencer.subscribe();
    let mut last = 0;
    if let Some(cursor) = cursor {
        let internal = |e: sqlx::Error| {
            tracing::error!(error = %e, "firehose replay failed");
            Stop::error("InternalError", "Could not read the event log")
        };
        let bounds = state.db.seq_bounds().await.map_err(internal)?;
        if cursor > bounds.highest_assigned {
            return Err(Stop::error("FutureCursor", "Cursor in the future."));
        }
        let oldest = bounds.oldest.unwrap_or(bounds.highest_assigned + 1);
        if cursor + 1 < oldest {
            let info = event::info_frame(
                "OutdatedCursor",
                "Requested cursor exceeded limit. Possibly missing events",
            )
            .map_err(|_| Stop(None))?;
            send(sink, Bytes::from(info)).await?;
        }
        last = cursor;
        loop {
            if sink.shutting_down() {
                return Ok(());
            }
            let page = state.db.events_after(last, REPLAY_PAGE).await.map_err(internal)?;
            if page.is_empty() {
                break;
            }
            for (seq, frame) in page {
                // A long replay must not hold up shutdown (or outlive a client).
                if sink.shutting_down() || closed.try_recv().is_ok() {
                    return Ok(());
                }
                send(sink, Bytes::from(frame)).await?;
                last = seq;
            }
        }
    }
    let mut stop = sink.shutdown.clone();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(frame) if frame.seq > last => {
                    send(sink, frame.frame).await?;
                    last = frame.seq;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return Err(too_slow()),
                Err(RecvError::Closed) => return Ok(()),
            },
            _ = ping.tick() => {
                if sink.send_message(Message::Ping(Bytes::new())).await?.is_err() {
                    return Err(Stop(None));
                }
            }
            _ = &mut *closed => return Ok(()),
            _ = stopping(&mut stop) => return Ok(()),
        }
    }
}
