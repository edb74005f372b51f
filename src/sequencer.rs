//! The firehose: the durable `seq_event` log is the source of truth; the
//! in-memory broadcast channel is only a wake-up that carries the frame so
//! live subscribers need no database read.
//!
//! Writers take [`Sequencer::write_lock`] around "append event + commit
//! transaction + publish", so frames are published in sequence order. A
//! subscriber subscribes to the broadcast *before* replaying the log, then
//! skips live frames it already replayed: no gap and no duplicate at the
//! cutover.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Mutex, MutexGuard, broadcast};

/// Frames kept for live subscribers; one that falls further behind is
/// disconnected with `ConsumerTooSlow` (it can reconnect with a cursor).
pub const LIVE_BUFFER: usize = 4096;

#[derive(Debug, Clone)]
pub struct SeqFrame {
    pub seq: i64,
    pub frame: Bytes,
}

pub struct Sequencer {
    live: broadcast::Sender<SeqFrame>,
    write: Mutex<()>,
    subscribers: AtomicUsize,
    per_ip: std::sync::Mutex<HashMap<IpAddr, usize>>,
    activity: Arc<tokio::sync::Notify>,
    pub max_subscribers: usize,
    pub max_per_ip: usize,
}

impl Sequencer {
    pub fn new(max_subscribers: usize, max_per_ip: usize) -> Self {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Sequencer {
            live,
            write: Mutex::new(()),
            subscribers: AtomicUsize::new(0),
            per_ip: std::sync::Mutex::new(HashMap::new()),
            activity: Arc::new(tokio::sync::Notify::new()),
            max_subscribers,
            max_per_ip,
        }
    }

    /// Held from before an event is appended until it is published.
    pub async fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.write.lock().await
    }

    /// Publishes committed frames (call with the write lock held).
    pub fn publish(&self, frames: Vec<(i64, Vec<u8>)>) {
        for (seq, frame) in frames {
            metrics::counter!("roost_firehose_events_total").increment(1);
            // No receivers is fine: the log has it.
            let _ = self.live.send(SeqFrame { seq, frame: Bytes::from(frame) });
        }
        self.activity.notify_waiters();
    }

    /// Notified whenever events are published (wakes the crawl requester).
    pub fn activity(&self) -> Arc<tokio::sync::Notify> {
        self.activity.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SeqFrame> {
        self.live.subscribe()
    }

    /// Counts a subscriber in; None when the global or per-IP limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SubscriberSlot> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip || self.subscribers.load(Ordering::SeqCst) >= self.max_subscribers {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *count += 1;
        metrics::gauge!(crate::telemetry::metrics::FIREHOSE_SUBSCRIBERS_BY_REMOTE, "remote" => ip.to_string())
            .set(*count as f64);
        let n = self.subscribers.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!("roost_firehose_subscribers").set(n as f64);
        Some(SubscriberSlot(self.clone(), ip))
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load(Ordering::SeqCst)
    }
}

/// Releases a subscriber's slot when dropped.
pub struct SubscriberSlot(Arc<Sequencer>, IpAddr);

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        let n = self.0.subscribers.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!("roost_firehose_subscribers").set(n as f64);
        let mut per_ip = self.0.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.1) {
            *count -= 1;
            // Per remote (relays are few); label sets are bounded by the
            // subscriber limits, and a departed remote reads 0.
            metrics::gauge!(crate::telemetry::metrics::FIREHOSE_SUBSCRIBERS_BY_REMOTE, "remote" => self.1.to_string())
                .set(*count as f64);
            if *count == 0 {
                per_ip.remove(&self.1);
            }
        }
    }
}
