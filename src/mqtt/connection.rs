//! The broker connection: options, the poll loop and the publisher.
//!
//! Design: rumqttc does nothing unless `EventLoop::poll` is driven, and
//! reconnects at once on the next poll after an error. The poll loop here
//! therefore (1) never awaits downstream work — incoming publishes are
//! handed to pipeline queues with `try_send`, drops counted; (2) sleeps a
//! jittered exponential backoff after each error; (3) subscribes on every
//! ConnAck; (4) acknowledges each QoS 1 input only once it was handled
//! (manual acks, in arrival order); (5) reports packet ids and PUBACKs to
//! the outbox, which is the only replay queue: on a disconnect rumqttc's
//! own (unbounded) pending publishes are discarded and the outbox resends
//! from its first unacknowledged record; (6) once shutdown begins, stops
//! acknowledging: an input that no pipeline will handle is left to the
//! persistent session, which delivers it again on the next start.
//!
//! Oversize input: rumqttc checks each incoming packet's length against
//! its `max_incoming_packet_size` from the fixed header and, when it is
//! over, fails the whole connection (`PayloadSizeLimitExceeded`) without
//! reading the packet — so it can neither be acknowledged nor reported by
//! topic, and at QoS 1 the broker sends it again on every reconnect. The
//! daemon therefore reads packets up to a ceiling set by the memory budget
//! (above `broker.max_packet_bytes`), and the pipelines reject what is over
//! their own limits as `too_large` and acknowledge it. Only a packet over
//! that ceiling still costs the connection; it is counted and reported, and
//! the reconnect backoff keeps growing (see the README).

use super::outbox::{Reporter, TRANSIENT_RESERVE};
use super::sink::Route;
use super::{Backoff, BrokerAddress, Outgoing, TopicFilter, Tracker};
use crate::config::Config;
use crate::flow::{AckHandle, Inlet, Input};
use crate::health::BrokerStats;
use bytes::Bytes;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS, Request,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Builds the client options: identity, keep-alive, packet limits, the
/// retained `offline` Last Will, credentials (password read from its file).
pub fn connect_options(config: &Config) -> Result<MqttOptions, String> {
    let addr = BrokerAddress::parse(&config.broker.url)?;
    let mut options = MqttOptions::new(config.client_id(), addr.host, addr.port);
    options.set_keep_alive(Duration::from_secs(config.broker.keep_alive_s.max(5)));
    options.set_max_packet_size(
        config.broker.max_packet_bytes,
        config.broker.max_packet_bytes,
    );
    options.set_last_will(LastWill::new(
        status_topic(config),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    // A persistent session: the broker keeps the subscriptions and queues
    // QoS 1 input while edgeinfer is away; inputs are acknowledged only once
    // handled (manual acks), so a crash makes the broker send them again.
    options.set_clean_session(config.broker.clean_session);
    options.set_manual_acks(true);
    // Above what the publisher puts in flight (results window plus the
    // health and replies reserve): at its limit rumqttc stops reading the
    // request channel, and the acks of incoming messages would wait too.
    options.set_inflight(
        config
            .broker
            .inflight
            .saturating_add(TRANSIENT_RESERVE as u16 + 1),
    );
    if let Some(user) = &config.broker.username {
        options.set_credentials(user.clone(), password(config)?);
    }
    if addr.tls {
        let tls = super::tls::client_config(config)?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
    }
    Ok(options)
}

/// The broker password: the first line of `password_file`, or of the
/// systemd credential `password_credential` (`$CREDENTIALS_DIRECTORY/NAME`).
fn password(config: &Config) -> Result<String, String> {
    let b = &config.broker;
    let (path, key) = match (&b.password_file, &b.password_credential) {
        (Some(file), _) => (config.base_dir.join(file), "broker.password_file"),
        (None, Some(name)) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!("broker.password_credential {name:?}: $CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)")
            })?;
            (
                std::path::Path::new(&dir).join(name),
                "broker.password_credential",
            )
        }
        (None, None) => return Ok(String::new()),
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("{key} {}: {e}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").to_owned())
}

pub fn status_topic(config: &Config) -> String {
    format!("{}/status", config.prefix())
}

/// Where `{prefix}/cmd/NAME` requests go: two bounded lanes, so that a
/// flood of one kind cannot starve `ping` and `health` (their own lane),
/// each bounded by count and by the bytes its payloads hold. The poll loop
/// never waits on the operations: when a lane is full, a small request
/// (up to [`BUSY_SCAN_BYTES`]) with a valid id is answered `busy` from
/// here; any other is dropped, counted (health: `operations.overflowed`)
/// and logged.
pub struct CommandLanes {
    pub filter: TopicFilter,
    pub priority: flume::Sender<(String, Bytes)>,
    pub general: flume::Sender<(String, Bytes)>,
    /// Most bytes the lanes hold (one request is always admitted).
    pub max_bytes: u64,
    pub stats: Arc<crate::health::OpsStats>,
    /// Where a `busy` answer from the poll loop goes.
    pub reporter: Reporter,
    /// `{prefix}/cmd/`: reply topics are `{prefix}/cmd/{op}/reply`.
    pub reply_prefix: String,
}

/// Largest request the poll loop parses to answer it `busy`.
pub const BUSY_SCAN_BYTES: usize = 1024;

impl CommandLanes {
    fn offer(&self, op: &str, payload: Bytes) {
        // Our own replies come back on cmd/#.
        if op == "reply" || op.ends_with("/reply") {
            return;
        }
        let lane = if matches!(op, "ping" | "health") {
            &self.priority
        } else {
            &self.general
        };
        let size = payload.len() as u64;
        let held = self.stats.lane_bytes.load(Ordering::Relaxed);
        let admitted = (held == 0 || held + size <= self.max_bytes)
            && lane.try_send((op.to_owned(), payload.clone())).is_ok();
        if admitted {
            self.stats.lane_bytes.fetch_add(size, Ordering::Relaxed);
            return;
        }
        if self.answer_busy(op, &payload) {
            self.stats.busy.inc();
            return;
        }
        self.stats.overflowed.inc();
        let n = self.stats.overflowed.get();
        // Logged at 1, 2, 4, 8, …: a flood does not flood the journal.
        if n.is_power_of_two() {
            tracing::warn!(
                op = %op.chars().take(64).collect::<String>(),
                overflowed = n,
                "Operation requests arrive faster than they are taken; request dropped unanswered"
            );
        }
    }

    /// A `busy` reply to a small, known request with a valid id.
    fn answer_busy(&self, op: &str, payload: &[u8]) -> bool {
        if payload.len() > BUSY_SCAN_BYTES || !crate::config::OPERATIONS.contains(&op) {
            return false;
        }
        #[derive(serde::Deserialize)]
        struct Head {
            id: String,
        }
        let Ok(head) = serde_json::from_slice::<Head>(payload) else {
            return false;
        };
        if !crate::topic::valid_id(&head.id) {
            return false;
        }
        let body = serde_json::json!({
            "id": head.id, "op": op, "ok": false, "busy": true, "ts": crate::flow::unix_ms(),
            "error": "busy: requests arrive faster than they are taken; nothing was done, send it again later",
        });
        // Not queued (the transient queue is half full: the rest is kept
        // for health and replies): unanswered, counted.
        self.reporter
            .offer_spare(Outgoing {
                topic: format!("{}{op}/reply", self.reply_prefix),
                payload: body.to_string().into_bytes(),
                qos: QoS::AtLeastOnce,
                retain: false,
            })
            .unwrap_or(false)
    }
}

/// Routes each incoming publish to every pipeline whose filters match it,
/// and `{prefix}/cmd/NAME` to the command handler.
pub struct Router {
    pub pipelines: Vec<(std::sync::Arc<Route>, Arc<dyn Inlet>)>,
    pub commands: Option<CommandLanes>,
    /// Other exact topics the daemon listens to (Home Assistant's birth
    /// message, say): (topic, payload) to the channel, never to pipelines.
    pub side: Vec<(String, flume::Sender<(String, Bytes)>)>,
}

impl Router {
    fn route(&self, topic: &str, payload: Bytes, ack: Option<AckHandle>) {
        if let Some(lanes) = &self.commands {
            if let Some(caps) = lanes.filter.captures(topic) {
                lanes.offer(caps[0], payload);
                return;
            }
        }
        if let Some((_, tx)) = self.side.iter().find(|(t, _)| t == topic) {
            let _ = tx.try_send((topic.to_owned(), payload));
            return;
        }
        let received = Instant::now();
        for (_, inlet) in self.pipelines.iter().filter(|(r, _)| r.matches(topic)) {
            inlet.offer(Input {
                source: topic.to_owned(),
                size: payload.len(),
                payload: payload.clone(),
                received,
                ack: ack.clone(),
            });
        }
    }
}

pub struct ConnectionContext {
    pub subscriptions: Vec<(String, QoS)>,
    pub status_topic: String,
    pub backoff: Backoff,
    pub stats: Arc<BrokerStats>,
    pub tracker: Tracker,
    /// Called once per successful connection (systemd readiness, for one).
    pub on_connect: Box<dyn FnMut() + Send>,
    /// Where connection-level rejections (an oversize packet) are reported.
    pub reporter: Option<Reporter>,
    /// Cancelled once the last acknowledgement was handed to the client
    /// after shutdown: the publisher disconnects only then.
    pub acks_done: CancellationToken,
}

/// A connection that lasted this long resets the reconnect backoff; one
/// that ends sooner (a broker that drops us on something we send or
/// receive) keeps it growing.
const STABLE: Duration = Duration::from_secs(5);

struct PendingAck {
    pkid: u16,
    qos: QoS,
    generation: u64,
    done: tokio::sync::oneshot::Receiver<()>,
}

async fn ack_loop(
    client: AsyncClient,
    rx: flume::Receiver<PendingAck>,
    generation: Arc<AtomicU64>,
    done: CancellationToken,
) {
    // Also when aborted: the publisher must not wait for it then.
    let _done = done.drop_guard();
    while let Ok(p) = rx.recv_async().await {
        let _ = p.done.await;
        if generation.load(Ordering::Relaxed) != p.generation {
            // From an earlier connection: the broker sends it again.
            continue;
        }
        let mut stub = Publish::new("", p.qos, Vec::new());
        stub.pkid = p.pkid;
        if client.ack(&stub).await.is_err() {
            break;
        }
    }
}

/// Drives the event loop until the publisher has sent DISCONNECT after
/// shutdown (or, once shutting down, until the connection fails).
/// Cancelling `shutdown` drops the router, which closes the pipelines' queues.
pub async fn drive_connection(
    mut eventloop: EventLoop,
    client: AsyncClient,
    router: Router,
    mut ctx: ConnectionContext,
    shutdown: CancellationToken,
) {
    let mut router = Some(router);
    let mut connected_once = false;
    let manual_acks = eventloop.mqtt_options.manual_acks();
    let generation = Arc::new(AtomicU64::new(0));
    // One entry per QoS 1 input the pipelines hold. MQTT's packet ids bound
    // the unacknowledged messages a broker can have sent to 65,535 (and
    // brokers send far fewer: mosquitto 20), so this never fills.
    let (ack_tx, ack_rx) = flume::bounded(u16::MAX as usize);
    let mut ack_tx = Some(ack_tx).filter(|_| manual_acks);
    let acker = tokio::spawn(ack_loop(
        client.clone(),
        ack_rx,
        Arc::clone(&generation),
        ctx.acks_done.clone(),
    ));
    let mut connected_at: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if router.is_some() => {
                tracing::debug!("Stopping ingest");
                // From here on nothing is acknowledged that was not routed
                // before: the ack loop ends once the pipelines are done.
                router = None;
                ack_tx = None;
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // No router: shutting down. The input is not acknowledged,
                // so the broker keeps it for the next session.
                if let Some(r) = &router {
                    let token = ack_token(ack_tx.as_ref(), &p, &generation);
                    r.route(&p.topic, p.payload, token);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => ctx.tracker.acknowledged(ack.pkid),
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if pkid != 0 => {
                ctx.tracker.published(pkid)
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                generation.fetch_add(1, Ordering::Relaxed);
                if connected_once {
                    ctx.stats.reconnects.inc();
                }
                connected_once = true;
                connected_at = Some(Instant::now());
                let max = eventloop.mqtt_options.max_packet_size() as u64;
                on_connected(&mut ctx, &client, ack.session_present, max);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                tracing::info!("Disconnected from broker");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                let was = ctx.stats.connected.swap(false, Ordering::Relaxed);
                // The spool is the only replay queue: what the client still
                // holds (unacknowledged publishes, queued requests) goes, and
                // the spool resends from its first unacknowledged record.
                ctx.tracker.disconnected(|| {
                    eventloop.clean();
                    eventloop
                        .pending
                        .retain(|r| !matches!(r, Request::Publish(_)));
                });
                if router.is_none() {
                    tracing::warn!(error = %e, "Broker connection ended during shutdown");
                    break;
                }
                if connected_at.take().is_some_and(|t| t.elapsed() >= STABLE) {
                    ctx.backoff.reset();
                }
                let delay = ctx.backoff.next_delay();
                let limit = eventloop.mqtt_options.max_packet_size();
                report_disconnect(&ctx, &e, was, delay, limit);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        // Nothing can be delivered without a broker.
                        break;
                    }
                }
            }
        }
    }
    ctx.stats.connected.store(false, Ordering::Relaxed);
    acker.abort();
}

/// The acknowledgement of a QoS 1 or 2 input, handed to the pipelines with
/// it when acks are manual; it goes to the broker once the last handle is
/// dropped (the input handled, its results in the outbox).
fn ack_token(
    ack_tx: Option<&flume::Sender<PendingAck>>,
    p: &rumqttc::Publish,
    generation: &AtomicU64,
) -> Option<AckHandle> {
    let ack_tx = ack_tx.filter(|_| p.qos != QoS::AtMostOnce)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Never waits (see the capacity in `drive_connection`); were it full, the input
    // would go unacknowledged and come again on the next connection.
    let _ = ack_tx.try_send(PendingAck {
        pkid: p.pkid,
        qos: p.qos,
        generation: generation.load(Ordering::Relaxed),
        done: rx,
    });
    Some(AckHandle::new(tx))
}

/// A CONNACK: counted, announced, subscriptions sent and `online` queued.
fn on_connected(ctx: &mut ConnectionContext, client: &AsyncClient, session: bool, max: u64) {
    ctx.stats.connected.store(true, Ordering::Relaxed);
    ctx.stats.max_incoming_bytes.store(max, Ordering::Relaxed);
    tracing::info!(session_present = session, "Connected to broker");
    (ctx.on_connect)();
    // Subscribing goes through the request channel, which the poll loop
    // drains: do it from a task, never inline. Always subscribe, session or
    // not: the config may have changed. `online` (and any result) follows
    // the SUBSCRIBEs in the channel, so whoever sees `online` can rely on
    // them.
    let client = client.clone();
    let subs = ctx.subscriptions.clone();
    let tracker = ctx.tracker.clone();
    let generation = tracker.generation();
    let online = Outgoing {
        topic: ctx.status_topic.clone(),
        payload: b"online".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: true,
    };
    tokio::spawn(async move {
        for (filter, qos) in subs {
            if let Err(e) = client.subscribe(filter.clone(), qos).await {
                tracing::warn!(%filter, error = %e, "Subscribe request failed");
            }
        }
        tracker.connected(generation, online);
    });
}

/// Says why the connection ended and when it is tried again; an incoming
/// packet too large to read is also reported on the errors topic.
fn report_disconnect(
    ctx: &ConnectionContext,
    e: &rumqttc::ConnectionError,
    was: bool,
    delay: Duration,
    limit: usize,
) {
    let retry_in_ms = delay.as_millis() as u64;
    let text = e.to_string();
    if let Some(size) = oversize_packet(e) {
        ctx.stats.oversize_packets.inc();
        let reason = format!(
            "an incoming MQTT packet of {size} bytes is over the {limit} bytes edgeinfer reads within limits.memory_mb; the connection was dropped without reading it. At QoS 1 the broker sends it again on every connect: cap message sizes at the broker (mosquitto: max_packet_size)"
        );
        tracing::error!(
            size,
            limit,
            retry_in_ms,
            "Incoming packet too large to read; reconnecting"
        );
        if let Some(r) = &ctx.reporter {
            r.error("", "", "too_large", &reason);
        }
    } else if let Some(hint) = tls_hint(&text) {
        tracing::warn!(error = %text, hint, retry_in_ms, "TLS handshake with the broker failed");
    } else if was {
        tracing::warn!(error = %text, retry_in_ms, "Lost broker connection");
    } else {
        tracing::warn!(error = %text, retry_in_ms, "Cannot reach broker");
    }
}

/// The size of an incoming packet rumqttc refused to read, if that is what
/// ended the connection.
fn oversize_packet(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

/// What to check when a TLS connection fails, from rustls' error text.
fn tls_hint(error: &str) -> Option<&'static str> {
    let has = |s: &str| error.contains(s);
    Some(if has("NotValidForName") {
        "the broker's certificate does not name the host in broker.url: connect by a name (or IP address) that its certificate lists"
    } else if has("Expired") || has("NotValidYet") {
        "the broker's certificate is expired or not valid yet (check the gateway's clock)"
    } else if has("UnknownIssuer") || has("BadSignature") {
        "check broker.ca_file: the broker's certificate must chain to it"
    } else if has("CertificateRequired") || has("BadCertificate") || has("UnknownCA") {
        "the broker refused our client certificate: set broker.cert_file and key_file to one signed by a CA the broker trusts"
    } else if has("certificate") || has("tls") || has("Tls") {
        "check broker.ca_file (the broker's certificate must chain to it) and, for mutual TLS, cert_file/key_file"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_hints_say_what_failed() {
        let mismatch = "Tls: invalid peer certificate: NotValidForName { expected: DnsName(\"localhost\"), presented: [] }";
        assert!(tls_hint(mismatch)
            .unwrap()
            .contains("does not name the host"));
        let issuer = "Tls: invalid peer certificate: UnknownIssuer";
        assert!(tls_hint(issuer).unwrap().contains("ca_file"));
        assert!(tls_hint("I/O: Connection refused (os error 111)").is_none());
    }

    #[test]
    fn an_oversize_packet_is_told_apart_from_other_errors() {
        let e = rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(5_000_000),
        ));
        assert_eq!(oversize_packet(&e), Some(5_000_000));
        assert_eq!(
            oversize_packet(&rumqttc::ConnectionError::NetworkTimeout),
            None
        );
    }
}
