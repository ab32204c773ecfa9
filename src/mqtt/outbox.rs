//! The outbox: everything edgeinfer publishes waits here until the broker
//! has it.
//!
//! Two lanes:
//! - **durable** ([`Outbox::send`]: results and errors) goes through the
//!   [`Spool`] — on disk when a directory is configured — and leaves it only
//!   once the broker acknowledged it (QoS 1) or it was written to the socket
//!   (QoS 0). A disconnect rewinds to the first unacknowledged record.
//! - **transient** ([`Outbox::offer`]: health, command replies): a small
//!   in-memory queue; full means dropped and counted.
//!
//! Every message is checked against what the broker takes
//! ([`PublishLimits`]) before it is queued: a topic too long or too deep,
//! or a packet too large, would make the broker or the client drop the
//! connection, and the outbox would resend it after every reconnect. Such a
//! message is refused (the caller reports it). A spooled record the broker
//! still drops the connection on is quarantined after
//! [`QUARANTINE_AFTER`] connections ended with it unacknowledged.
//!
//! Health and command replies have their own room in flight
//! ([`TRANSIENT_RESERVE`]): they never wait behind a window full of
//! unacknowledged results.
//!
//! Delivery tracking is shared by the publisher task (which hands messages
//! to the rumqttc client) and the poll loop (which sees the packet id each
//! publish got and the broker's PUBACKs): every QoS 1 publish of this
//! process goes through the publisher, in order, so the n-th
//! `Outgoing::Publish` event belongs to the n-th handed-out message.

use super::spool::{Spool, Spooled};
use crate::health::{BrokerStats, OutboxStats};
use crate::topic::{check_publishable, PublishLimits};
use rumqttc::{AsyncClient, ClientError, QoS, Request};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
}

/// QoS 1 publishes beyond the results window that health messages and
/// command replies may use. The MQTT client's own in-flight limit must be
/// above window + reserve, or it stops reading requests (acks included).
pub const TRANSIENT_RESERVE: usize = 16;

/// Connections in a row that may end with the same spooled record the
/// oldest unacknowledged before it is quarantined (dropped, reported).
pub const QUARANTINE_AFTER: u32 = 3;

/// What a handed-out QoS 1 publish was.
#[derive(Debug, Clone, Copy)]
enum Handed {
    Spooled(u64),
    Other,
}

pub struct State {
    spool: Spool,
    transient: VecDeque<Outgoing>,
    transient_cap: usize,
    connected: bool,
    /// Published first after each connect (the retained `online`).
    announce: Option<Outgoing>,
    /// QoS 1 publishes handed to the client that have no packet id yet.
    handed: VecDeque<Handed>,
    /// Packet id → publish, until the broker acknowledges it.
    by_pkid: HashMap<u16, Handed>,
    /// Counts disconnects: a `connected` from before one is stale.
    generation: u64,
    limits: PublishLimits,
    /// Where refused and quarantined records are reported.
    errors_topic: String,
    /// The spooled record that was the oldest unacknowledged when the last
    /// connections ended, and at how many ends in a row.
    suspect: Option<(u64, u32)>,
    /// A record to drop when it is handed out next.
    quarantine: Option<u64>,
}

impl State {
    fn in_flight(&self) -> usize {
        self.handed.len() + self.by_pkid.len()
    }
}

pub struct Shared {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    senders: AtomicUsize,
    stats: Arc<OutboxStats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side, held by workers and tasks. The publisher finishes once
/// every `Outbox` is dropped and what they sent is delivered.
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::SeqCst);
        Outbox {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.wake.notify_one();
        }
    }
}

/// The publisher's side (and the poll loop's, through [`Tracker`]).
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// The poll loop's view: packet ids, acknowledgements, connection changes.
#[derive(Clone)]
pub struct Tracker {
    shared: Arc<Shared>,
    broker: Arc<BrokerStats>,
}

/// Where the outbox reports what it refuses, and what the broker takes.
#[derive(Debug, Clone, Default)]
pub struct OutboxSettings {
    pub transient_cap: usize,
    pub limits: PublishLimits,
    pub errors_topic: String,
}

pub fn outbox(
    spool: Spool,
    settings: OutboxSettings,
    stats: Arc<OutboxStats>,
    broker: Arc<BrokerStats>,
) -> (Outbox, OutboxReceiver, Tracker) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            spool,
            transient: VecDeque::new(),
            transient_cap: settings.transient_cap,
            connected: false,
            announce: None,
            handed: VecDeque::new(),
            by_pkid: HashMap::new(),
            generation: 0,
            limits: settings.limits,
            errors_topic: settings.errors_topic,
            suspect: None,
            quarantine: None,
        }),
        wake: tokio::sync::Notify::new(),
        senders: AtomicUsize::new(1),
        stats,
    });
    (
        Outbox {
            shared: Arc::clone(&shared),
        },
        OutboxReceiver {
            shared: Arc::clone(&shared),
        },
        Tracker { shared, broker },
    )
}

/// A message the broker would not take (the reason names the limit). It
/// was counted (`outbox.unpublishable`) and not queued.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot be published: {0}")]
pub struct Unpublishable(pub String);

impl Outbox {
    /// Queues a result or an error in the spool. Never waits on the broker;
    /// a full spool drops its oldest records (counted). For worker threads:
    /// with a disk spool this writes to the file. A message the broker
    /// would not take is refused: the caller reports it.
    pub fn send(&self, msg: Outgoing) -> Result<(), Unpublishable> {
        let mut st = self.shared.lock();
        self.shared.check(&st, &msg)?;
        let appended = st.spool.append(&msg, crate::flow::unix_ms());
        drop(st);
        match appended {
            Ok(()) => self.shared.wake.notify_one(),
            Err(e) => {
                self.shared.stats.dropped.inc();
                tracing::error!(error = %e, topic = %msg.topic, "Cannot write to the outbox; message dropped");
            }
        }
        Ok(())
    }

    /// Queues a transient message (health, a command reply, a snapshot) if
    /// there is room, else drops and counts it.
    pub fn offer(&self, msg: Outgoing) -> Result<(), Unpublishable> {
        self.reporter().offer(msg)
    }

    /// A handle for transient messages that does not keep the publisher
    /// running (the poll loop's reports).
    pub fn reporter(&self) -> Reporter {
        Reporter {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Offers transient messages without counting as a sender: the publisher
/// finishes once every [`Outbox`] is gone, whatever reporters are left.
#[derive(Clone)]
pub struct Reporter {
    shared: Arc<Shared>,
}

impl Reporter {
    pub fn offer(&self, msg: Outgoing) -> Result<(), Unpublishable> {
        self.try_offer(msg).map(|_| ())
    }

    /// [`Reporter::offer`], saying whether the message was queued (false:
    /// the transient queue was full; dropped and counted).
    pub fn try_offer(&self, msg: Outgoing) -> Result<bool, Unpublishable> {
        self.queue_within(msg, 1)
    }

    /// Queues `msg` only while the transient queue is less than half
    /// full, so that what is offered this way (answers to a flood) leaves
    /// room for health and replies. False: dropped and counted.
    pub fn offer_spare(&self, msg: Outgoing) -> Result<bool, Unpublishable> {
        self.queue_within(msg, 2)
    }

    /// Queues `msg` if the transient queue holds less than `cap / share`.
    fn queue_within(&self, msg: Outgoing, share: usize) -> Result<bool, Unpublishable> {
        let mut st = self.shared.lock();
        self.shared.check(&st, &msg)?;
        if st.transient.len() >= st.transient_cap / share || !st.push_transient(msg) {
            self.shared.stats.dropped.inc();
            return Ok(false);
        }
        drop(st);
        self.shared.wake.notify_one();
        Ok(true)
    }

    /// Reports a problem on the errors topic (kind, source topic, reason),
    /// in the errors topic's schema, as a transient message.
    pub fn error(&self, pipeline: &str, source: &str, kind: &str, reason: &str) {
        let topic = self.shared.lock().errors_topic.clone();
        let _ = self.offer(error_message(&topic, pipeline, source, kind, reason));
    }
}

/// An errors-topic entry: `pipeline`, `source`, `kind`, `reason`, `ts`
/// (the one place its schema is written).
pub(crate) fn error_message(
    topic: &str,
    pipeline: &str,
    source: &str,
    kind: &str,
    reason: &str,
) -> Outgoing {
    Outgoing {
        topic: topic.to_owned(),
        payload: serde_json::json!({
            "pipeline": pipeline,
            "source": source,
            "kind": kind,
            "reason": reason,
            "ts": crate::flow::unix_ms(),
        })
        .to_string()
        .into_bytes(),
        qos: QoS::AtLeastOnce,
        retain: false,
    }
}

impl State {
    fn push_transient(&mut self, msg: Outgoing) -> bool {
        if self.transient.len() >= self.transient_cap {
            return false;
        }
        self.transient.push_back(msg);
        true
    }
}

impl Shared {
    fn check(&self, st: &State, msg: &Outgoing) -> Result<(), Unpublishable> {
        check_publishable(
            &msg.topic,
            msg.payload.len(),
            msg.qos == QoS::AtMostOnce,
            &st.limits,
        )
        .map_err(|reason| {
            self.stats.unpublishable.inc();
            tracing::warn!(%reason, "Message refused: the broker would not take it");
            Unpublishable(reason)
        })
    }
}

impl Tracker {
    /// The current connection's generation, for [`Tracker::connected`].
    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// The connection of `generation` is ready (subscriptions requested):
    /// publishing may start, `announce` first. Ignored if that connection
    /// has been lost since.
    pub fn connected(&self, generation: u64, announce: Outgoing) {
        let mut st = self.shared.lock();
        if st.generation != generation {
            return;
        }
        st.connected = true;
        st.announce = Some(announce);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// The connection was lost. `purge` removes what the client still holds
    /// (unacknowledged publishes and queued requests); everything not
    /// acknowledged is sent again from the spool after the next connect.
    pub fn disconnected(&self, purge: impl FnOnce()) {
        let mut st = self.shared.lock();
        st.connected = false;
        st.generation += 1;
        // A record the broker drops the connection on stays the oldest
        // unacknowledged one, connection after connection.
        if let Some(seq) = st.spool.oldest_unacked() {
            let ends = match st.suspect {
                Some((s, n)) if s == seq => n + 1,
                _ => 1,
            };
            st.suspect = Some((seq, ends));
            if ends >= QUARANTINE_AFTER {
                st.quarantine = Some(seq);
                st.suspect = None;
            }
        }
        purge();
        st.handed.clear();
        st.by_pkid.clear();
        st.spool.rewind();
        self.broker.in_flight.store(0, Ordering::Relaxed);
    }

    /// The client sent a QoS 1 publish with this packet id.
    pub fn published(&self, pkid: u16) {
        let mut st = self.shared.lock();
        if st.by_pkid.contains_key(&pkid) {
            return; // a retransmission
        }
        if let Some(h) = st.handed.pop_front() {
            st.by_pkid.insert(pkid, h);
        }
        self.broker
            .in_flight
            .store(st.in_flight() as u64, Ordering::Relaxed);
    }

    /// The broker acknowledged this packet id.
    pub fn acknowledged(&self, pkid: u16) {
        let mut st = self.shared.lock();
        if let Some(Handed::Spooled(seq)) = st.by_pkid.remove(&pkid) {
            st.spool.ack(seq);
            if st.suspect.is_some_and(|(s, _)| s == seq) {
                st.suspect = None;
            }
        }
        self.broker
            .in_flight
            .store(st.in_flight() as u64, Ordering::Relaxed);
        drop(st);
        self.shared.wake.notify_one();
    }
}

/// What the publisher should do next.
enum Step {
    Publish(Outgoing, Option<Handed>, Option<u64>),
    Wait,
    Finish,
}

impl OutboxReceiver {
    fn step(&self, window: usize) -> Step {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let senders_gone = self.shared.senders.load(Ordering::SeqCst) == 0;
        if !st.connected {
            if senders_gone {
                return Step::Finish;
            }
            return Step::Wait;
        }
        if let Some(a) = st.announce.take() {
            let handed = (a.qos != QoS::AtMostOnce).then_some(Handed::Other);
            return Step::Publish(a, handed, None);
        }
        if st.in_flight() < window + TRANSIENT_RESERVE {
            if let Some(m) = st.transient.pop_front() {
                let handed = (m.qos != QoS::AtMostOnce).then_some(Handed::Other);
                return Step::Publish(m, handed, None);
            }
        }
        if st.in_flight() >= window {
            return Step::Wait;
        }
        while let Some(Spooled { seq, msg }) = st.spool.next(crate::flow::unix_ms()) {
            if let Some(report) = self.refuse_spooled(st, seq, &msg) {
                // Dropped: acknowledged in the spool, reported instead.
                st.spool.ack(seq);
                st.push_transient(report);
                continue;
            }
            let handed = (msg.qos != QoS::AtMostOnce).then_some(Handed::Spooled(seq));
            return Step::Publish(msg, handed, Some(seq));
        }
        if senders_gone && st.in_flight() == 0 && st.spool.in_flight() == 0 {
            return Step::Finish;
        }
        Step::Wait
    }

    /// A spooled record that must not go out again: quarantined, or (from
    /// an older run with other limits) one the broker would not take.
    /// Returns the errors-topic entry that reports it.
    fn refuse_spooled(&self, st: &mut State, seq: u64, msg: &Outgoing) -> Option<Outgoing> {
        let (kind, reason) = if st.quarantine == Some(seq) {
            st.quarantine = None;
            self.shared.stats.quarantined.inc();
            let reason = format!(
                "a {}-byte message to {:?} was dropped from the outbox: the broker ended {QUARANTINE_AFTER} connections in a row with it unacknowledged",
                msg.payload.len(),
                crate::topic::shorten(&msg.topic)
            );
            tracing::error!(topic = %msg.topic, bytes = msg.payload.len(), seq, "Outbox: record quarantined");
            ("quarantined", reason)
        } else {
            let reason = check_publishable(
                &msg.topic,
                msg.payload.len(),
                msg.qos == QoS::AtMostOnce,
                &st.limits,
            )
            .err()?;
            self.shared.stats.unpublishable.inc();
            tracing::warn!(%reason, seq, "Outbox: dropped a record the broker would not take");
            ("unpublishable", reason)
        };
        let topic = st.errors_topic.clone();
        // The report itself must be publishable: it names the topic only
        // in its reason, shortened by the check above where it is long.
        let source = if msg.topic.len() > 256 {
            ""
        } else {
            &msg.topic
        };
        Some(error_message(&topic, "", source, kind, &reason))
    }

    /// Hands `msg` to the client without waiting, recording it for packet-id
    /// tracking under the same lock (so the order of records is the order
    /// of requests in the client's channel). The message moves into the
    /// request (no copy); if the client's channel is full it is put back
    /// and `Ok(false)` returned. `Err` once the client is gone.
    fn hand(
        &self,
        client: &AsyncClient,
        msg: Outgoing,
        handed: Option<Handed>,
        seq: Option<u64>,
    ) -> Result<bool, ()> {
        let mut st = self.shared.lock();
        if !st.connected {
            // Lost the connection meanwhile: the spool rewound already.
            if let Some(Handed::Other) = handed {
                st.transient.push_front(msg);
            }
            return Ok(true);
        }
        let Outgoing {
            topic,
            payload,
            qos,
            retain,
        } = msg;
        match client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                match (handed, seq) {
                    (Some(h), _) => st.handed.push_back(h),
                    // QoS 0 from the spool: written is as good as it gets.
                    (None, Some(seq)) => st.spool.ack(seq),
                    (None, None) => {}
                }
                Ok(true)
            }
            Err(ClientError::TryRequest(request)) => {
                match (seq, request) {
                    (Some(_), _) => st.spool.rewind_one(),
                    (None, Request::Publish(p)) => st.transient.push_front(Outgoing {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: p.qos,
                        retain: p.retain,
                    }),
                    (None, _) => {}
                }
                Ok(false)
            }
            Err(ClientError::Request(_)) => Err(()),
        }
    }

    /// Syncs the spool: what to write is taken under the lock, the fsyncs,
    /// the commit file and removing delivered segments happen without it,
    /// so workers appending and the poll loop acknowledging never wait on
    /// the disk.
    fn sync(&self) {
        let job = self.shared.lock().spool.sync_job();
        if let Some(job) = job {
            if let Err(e) = job.run() {
                self.shared.lock().spool.sync_failed();
                tracing::error!(error = %e, "Cannot sync the outbox to disk");
            }
        }
    }

    /// Caps an in-memory spool at `bytes` (a disk spool keeps its own cap).
    pub fn limit_memory(&self, bytes: u64) {
        self.shared.lock().spool.limit_memory(bytes);
    }

    fn waiting(&self) -> u64 {
        self.shared.stats.queued_messages.load(Ordering::Relaxed)
    }
}

/// Moves messages from the outbox to the client, at most `window` QoS 1
/// publishes unacknowledged at a time, and syncs the spool every
/// `sync_every`. Ends once every [`Outbox`] is dropped and all was
/// delivered (or, when disconnected, left in the spool); then, once the
/// acknowledgements of handled input are in the client's queue
/// (`acks_done`), publishes the retained `offline` and disconnects cleanly
/// (so no Last Will fires, and no handled input is delivered again).
pub async fn publish_loop(
    client: AsyncClient,
    outbox: OutboxReceiver,
    window: usize,
    sync_every: Duration,
    status_topic: String,
    acks_done: tokio_util::sync::CancellationToken,
) {
    let mut sync = tokio::time::interval(sync_every);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match outbox.step(window) {
            Step::Publish(msg, handed, seq) => match outbox.hand(&client, msg, handed, seq) {
                Ok(true) => {}
                // The client's channel is full: retry shortly.
                Ok(false) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(()) => {
                    tracing::error!("MQTT client closed; results can no longer be published");
                    outbox.sync();
                    return;
                }
            },
            Step::Wait => {
                tokio::select! {
                    _ = outbox.shared.wake.notified() => {}
                    _ = sync.tick() => outbox.sync(),
                }
            }
            Step::Finish => break,
        }
    }
    outbox.sync();
    let left = outbox.waiting();
    if left > 0 {
        let persistent = outbox.shared.stats.persistent.load(Ordering::Relaxed);
        if persistent {
            tracing::info!(
                messages = left,
                "Undelivered results stay in the outbox for the next start"
            );
        } else {
            tracing::warn!(
                messages = left,
                "Undelivered results lost: the outbox is in memory (set outbox.dir)"
            );
        }
    }
    // Bounded: an ack waits on a pipeline that is itself finishing.
    let _ = tokio::time::timeout(Duration::from_secs(5), acks_done.cancelled()).await;
    let _ = client
        .publish(status_topic, QoS::AtLeastOnce, true, "offline")
        .await;
    let _ = client.disconnect().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::spool::SpoolLimits;

    fn msg(topic: &str, qos: QoS) -> Outgoing {
        Outgoing {
            topic: topic.into(),
            payload: vec![1, 2, 3],
            qos,
            retain: false,
        }
    }

    fn parts() -> (Outbox, OutboxReceiver, Tracker, Arc<OutboxStats>) {
        let stats = Arc::new(OutboxStats::default());
        let spool = Spool::in_memory(
            SpoolLimits {
                max_bytes: 1 << 20,
                ttl_ms: 0,
            },
            Arc::clone(&stats),
        );
        let settings = OutboxSettings {
            transient_cap: 2,
            limits: PublishLimits {
                max_topic_levels: 8,
                ..PublishLimits::default()
            },
            errors_topic: "p/errors".into(),
        };
        let (o, r, t) = outbox(spool, settings, Arc::clone(&stats), Arc::default());
        (o, r, t, stats)
    }

    fn next(r: &OutboxReceiver) -> Option<(String, Option<Handed>, Option<u64>)> {
        match r.step(10) {
            Step::Publish(m, h, s) => {
                // As `hand` does, without a client.
                let mut st = r.shared.lock();
                match (h, s) {
                    (Some(h), _) => st.handed.push_back(h),
                    (None, Some(seq)) => st.spool.ack(seq),
                    _ => {}
                }
                Some((m.topic, h, s))
            }
            _ => None,
        }
    }

    #[test]
    fn nothing_leaves_before_a_connect_and_online_goes_first() {
        let (o, r, t, _) = parts();
        o.send(msg("r/1", QoS::AtLeastOnce)).unwrap();
        assert!(matches!(r.step(10), Step::Wait));
        t.connected(t.generation(), msg("status", QoS::AtLeastOnce));
        assert_eq!(next(&r).unwrap().0, "status");
        assert_eq!(next(&r).unwrap().0, "r/1");
    }

    #[test]
    fn a_lost_connection_resends_everything_unacknowledged_in_order() {
        let (o, r, t, stats) = parts();
        for i in 0..4 {
            o.send(msg(&format!("r/{i}"), QoS::AtLeastOnce)).unwrap();
        }
        t.connected(t.generation(), msg("status", QoS::AtLeastOnce));
        for pkid in 1..=5u16 {
            next(&r).unwrap();
            t.published(pkid);
        }
        t.acknowledged(1); // status
        t.acknowledged(2); // r/0
        t.acknowledged(4); // r/2, out of order: r/1 is still owed
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 3);
        let mut purged = false;
        t.disconnected(|| purged = true);
        assert!(purged);
        assert!(matches!(r.step(10), Step::Wait), "nothing while offline");
        t.connected(t.generation(), msg("status", QoS::AtLeastOnce));
        let again: Vec<String> = std::iter::from_fn(|| next(&r).map(|n| n.0)).collect();
        assert_eq!(again, vec!["status", "r/1", "r/2", "r/3"]);
    }

    /// Queues 20 results, connects, and hands out all that the window
    /// allows; returns how many were handed out (the QoS 0 status included).
    fn fill_the_window(o: &Outbox, r: &OutboxReceiver, t: &Tracker) -> usize {
        for i in 0..20 {
            o.send(msg(&format!("r/{i}"), QoS::AtLeastOnce)).unwrap();
        }
        t.connected(t.generation(), msg("status", QoS::AtMostOnce));
        std::iter::from_fn(|| next(r)).count()
    }

    #[test]
    fn the_window_bounds_unacknowledged_publishes() {
        let (o, r, t, _) = parts();
        let n = fill_the_window(&o, &r, &t);
        assert_eq!(n, 1 + 10, "QoS 0 status plus a window of 10");
        t.published(1);
        t.acknowledged(1);
        assert!(next(&r).is_some(), "an acknowledgement frees a slot");
    }

    #[test]
    fn health_and_replies_do_not_wait_behind_unacknowledged_results() {
        let (o, r, t, _) = parts();
        let n = fill_the_window(&o, &r, &t);
        assert_eq!(n, 1 + 10, "the window is full of results");
        o.offer(msg("health", QoS::AtMostOnce)).unwrap();
        o.offer(msg("cmd/ping/reply", QoS::AtLeastOnce)).unwrap();
        assert_eq!(next(&r).unwrap().0, "health");
        assert_eq!(next(&r).unwrap().0, "cmd/ping/reply");
        assert!(next(&r).is_none(), "results still wait for the window");
    }

    #[test]
    fn what_the_broker_would_not_take_is_refused_before_it_is_queued() {
        let (o, r, t, stats) = parts();
        let deep = "a/".repeat(8) + "b";
        let e = o.send(msg(&deep, QoS::AtLeastOnce)).unwrap_err();
        assert!(e.0.contains("9 levels"), "{e}");
        assert_eq!(stats.unpublishable.get(), 1);
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 0);
        o.send(msg("r/ok", QoS::AtLeastOnce)).unwrap();
        t.connected(t.generation(), msg("status", QoS::AtMostOnce));
        next(&r).unwrap();
        assert_eq!(next(&r).unwrap().0, "r/ok");
    }

    #[test]
    fn a_record_the_broker_keeps_dropping_the_connection_on_is_quarantined() {
        let (o, r, t, stats) = parts();
        o.send(msg("r/poison", QoS::AtLeastOnce)).unwrap();
        o.send(msg("r/next", QoS::AtLeastOnce)).unwrap();
        let mut pkid = 0;
        let mut round = |r: &OutboxReceiver, t: &Tracker| -> Vec<String> {
            t.connected(t.generation(), msg("status", QoS::AtMostOnce));
            let sent: Vec<String> = std::iter::from_fn(|| next(r).map(|n| n.0)).collect();
            for _ in 1..sent.len() {
                pkid += 1;
                t.published(pkid);
            }
            // The broker drops the connection on the first result each time.
            t.disconnected(|| {});
            sent
        };
        for _ in 0..QUARANTINE_AFTER {
            assert_eq!(round(&r, &t), vec!["status", "r/poison", "r/next"]);
        }
        assert_eq!(stats.quarantined.get(), 0);
        let after = round(&r, &t);
        assert_eq!(after, vec!["status", "r/next", "p/errors"]);
        assert_eq!(stats.quarantined.get(), 1);
    }

    #[test]
    fn a_flapping_broker_quarantines_nothing_while_records_get_through() {
        let (o, r, t, stats) = parts();
        for i in 0..8 {
            o.send(msg(&format!("r/{i}"), QoS::AtLeastOnce)).unwrap();
        }
        let mut pkid = 0u16;
        // Each connection gets one record acknowledged, then drops.
        for _ in 0..8 {
            t.connected(t.generation(), msg("status", QoS::AtMostOnce));
            let mut sent = 0;
            while next(&r).is_some() {
                sent += 1;
            }
            for i in 1..sent {
                pkid += 1;
                t.published(pkid);
                if i == 1 {
                    t.acknowledged(pkid);
                }
            }
            t.disconnected(|| {});
        }
        assert_eq!(stats.quarantined.get(), 0);
        assert_eq!(stats.queued_messages.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn transient_messages_are_bounded_and_finish_waits_for_senders() {
        let (o, r, t, stats) = parts();
        for _ in 0..3 {
            o.offer(msg("health", QoS::AtMostOnce)).unwrap();
        }
        assert_eq!(stats.dropped.get(), 1);
        t.connected(t.generation(), msg("status", QoS::AtMostOnce));
        assert!(next(&r).unwrap().1.is_none());
        assert_eq!(next(&r).unwrap().0, "health");
        assert_eq!(next(&r).unwrap().0, "health");
        assert!(matches!(r.step(10), Step::Wait), "a sender is alive");
        drop(o);
        assert!(matches!(r.step(10), Step::Finish));
    }
}
