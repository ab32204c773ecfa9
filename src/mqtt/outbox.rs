//! The outbox: a bounded queue of messages waiting for the MQTT client.
//! Worker threads block on it when it is full (backpressure that ends in
//! counted drops at the pipeline's input queue, never in unbounded memory).

use crate::health::OutboxStats;
use rumqttc::QoS;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
}

#[derive(Clone)]
pub struct Outbox {
    tx: flume::Sender<Outgoing>,
    stats: Arc<OutboxStats>,
}

pub struct OutboxReceiver {
    rx: flume::Receiver<Outgoing>,
    stats: Arc<OutboxStats>,
}

pub fn outbox(capacity: usize, stats: Arc<OutboxStats>) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = flume::bounded(capacity);
    (
        Outbox {
            tx,
            stats: Arc::clone(&stats),
        },
        OutboxReceiver { rx, stats },
    )
}

impl Outbox {
    fn account(&self, msg: &Outgoing) {
        self.stats.queued_messages.fetch_add(1, Ordering::Relaxed);
        self.stats
            .queued_bytes
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
    }

    fn unaccount(stats: &OutboxStats, msg: &Outgoing) {
        stats.queued_messages.fetch_sub(1, Ordering::Relaxed);
        stats
            .queued_bytes
            .fetch_sub(msg.payload.len() as u64, Ordering::Relaxed);
    }

    /// Queues a message, waiting while the outbox is full. For worker threads.
    pub fn send(&self, msg: Outgoing) {
        self.account(&msg);
        if let Err(flume::SendError(msg)) = self.tx.send(msg) {
            Self::unaccount(&self.stats, &msg);
            self.stats.dropped.inc();
        }
    }

    /// Queues a message if there is room, else drops and counts it. For async tasks.
    pub fn offer(&self, msg: Outgoing) {
        self.account(&msg);
        if let Err(e) = self.tx.try_send(msg) {
            let msg = match e {
                flume::TrySendError::Full(m) | flume::TrySendError::Disconnected(m) => m,
            };
            Self::unaccount(&self.stats, &msg);
            self.stats.dropped.inc();
        }
    }
}

impl OutboxReceiver {
    /// The next message; `None` once every [`Outbox`] is dropped and the queue is empty.
    pub async fn recv(&self) -> Option<Outgoing> {
        let msg = self.rx.recv_async().await.ok()?;
        Outbox::unaccount(&self.stats, &msg);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Outgoing {
        Outgoing {
            topic: "t".into(),
            payload: vec![0; n],
            qos: QoS::AtMostOnce,
            retain: false,
        }
    }

    #[tokio::test]
    async fn counts_queued_bytes_and_drops_when_full() {
        let stats = Arc::new(OutboxStats::default());
        let (tx, rx) = outbox(2, Arc::clone(&stats));
        tx.offer(msg(10));
        tx.offer(msg(5));
        tx.offer(msg(7)); // full: dropped
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 2);
        assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 15);
        assert_eq!(stats.dropped.get(), 1);
        assert_eq!(rx.recv().await.unwrap().payload.len(), 10);
        assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 5);
        drop(tx);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 0);
    }
}
