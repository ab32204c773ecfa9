//! The broker connection: options, the poll loop and the publisher.
//!
//! Design: rumqttc does nothing unless `EventLoop::poll` is driven, and
//! reconnects at once on the next poll after an error. The poll loop here
//! therefore (1) never awaits downstream work — incoming publishes are
//! handed to pipeline queues with `try_send`, drops counted; (2) sleeps a
//! jittered exponential backoff after each error; (3) resubscribes on every
//! ConnAck that has no session; (4) bounds rumqttc's `pending` queue, which
//! otherwise grows without limit while the broker is away.

use super::{Backoff, BrokerAddress, OutboxReceiver, TopicFilter};
use crate::config::Config;
use crate::health::BrokerStats;
use crate::pipeline::{Ingested, PipelineHandle};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Request};
use std::sync::atomic::Ordering;
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
    options.set_clean_session(true);
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

/// Routes each incoming publish to every pipeline whose filters match it,
/// and `{prefix}/cmd/NAME` to the command handler.
pub struct Router {
    pub pipelines: Vec<PipelineHandle>,
    pub commands: Option<(TopicFilter, flume::Sender<(String, Bytes)>)>,
}

impl Router {
    fn route(&self, topic: &str, payload: Bytes) {
        if let Some((filter, tx)) = &self.commands {
            if let Some(caps) = filter.captures(topic) {
                let _ = tx.try_send((caps[0].to_owned(), payload));
                return;
            }
        }
        let received = Instant::now();
        for p in self.pipelines.iter().filter(|p| p.matches(topic)) {
            p.offer(Ingested {
                topic: topic.to_owned(),
                payload: payload.clone(),
                received,
            });
        }
    }
}

pub struct ConnectionContext {
    pub subscriptions: Vec<(String, QoS)>,
    pub status_topic: String,
    pub backoff: Backoff,
    pub max_pending: usize,
    pub stats: Arc<BrokerStats>,
    /// Called once per successful connection (systemd readiness, for one).
    pub on_connect: Box<dyn FnMut() + Send>,
}

/// Drives the event loop until the publisher has sent DISCONNECT after
/// shutdown (or, once shutting down, until the connection fails).
/// Cancelling `shutdown` drops the router, which closes the pipelines' queues.
pub async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    router: Router,
    mut ctx: ConnectionContext,
    shutdown: CancellationToken,
) {
    let mut router = Some(router);
    let mut connected_once = false;
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if router.is_some() => {
                tracing::debug!("Stopping ingest");
                router = None;
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(r) = &router {
                    r.route(&p.topic, p.payload);
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                ctx.stats.connected.store(true, Ordering::Relaxed);
                if connected_once {
                    ctx.stats.reconnects.inc();
                }
                connected_once = true;
                ctx.backoff.reset();
                tracing::info!(session_present = ack.session_present, "Connected to broker");
                (ctx.on_connect)();
                // Subscribing and announcing go through the request channel,
                // which this loop drains: do it from a task, never inline.
                let client = client.clone();
                let subs = if ack.session_present {
                    Vec::new()
                } else {
                    ctx.subscriptions.clone()
                };
                let status = ctx.status_topic.clone();
                tokio::spawn(async move {
                    for (filter, qos) in subs {
                        if let Err(e) = client.subscribe(filter.clone(), qos).await {
                            tracing::warn!(%filter, error = %e, "Subscribe request failed");
                        }
                    }
                    let _ = client
                        .publish(status, QoS::AtLeastOnce, true, "online")
                        .await;
                });
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                tracing::info!("Disconnected from broker");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                let was = ctx.stats.connected.swap(false, Ordering::Relaxed);
                if router.is_none() {
                    tracing::warn!(error = %e, "Broker connection ended during shutdown");
                    break;
                }
                trim_pending(&mut eventloop, ctx.max_pending, &ctx.stats);
                let delay = ctx.backoff.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                let text = e.to_string();
                if text.contains("certificate") {
                    let hint = "check broker.ca_file (the broker's certificate must chain to it) and, for mutual TLS, cert_file/key_file";
                    tracing::warn!(error = %text, hint, retry_in_ms, "TLS handshake with the broker failed");
                } else if was {
                    tracing::warn!(error = %text, retry_in_ms, "Lost broker connection");
                } else {
                    tracing::warn!(error = %text, retry_in_ms, "Cannot reach broker");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        // Nothing can be delivered without a broker.
                        break;
                    }
                }
            }
        }
        ctx.stats
            .pending
            .store(eventloop.pending.len() as u64, Ordering::Relaxed);
    }
    ctx.stats.connected.store(false, Ordering::Relaxed);
}

/// Keeps rumqttc's replay queue within `max`: the oldest publishes go
/// first (subscriptions and acks are kept), each counted.
fn trim_pending(eventloop: &mut EventLoop, max: usize, stats: &BrokerStats) {
    let mut excess = eventloop.pending.len().saturating_sub(max);
    if excess == 0 {
        return;
    }
    eventloop.pending.retain(|r| {
        if excess > 0 && matches!(r, Request::Publish(_)) {
            excess -= 1;
            stats.pending_dropped.inc();
            false
        } else {
            true
        }
    });
}

/// Moves messages from the outbox to the client until every outbox sender
/// is gone, then publishes the retained `offline` and disconnects cleanly
/// (so the broker does not fire the Last Will).
pub async fn publish_loop(client: AsyncClient, outbox: OutboxReceiver, status_topic: String) {
    while let Some(m) = outbox.recv().await {
        if let Err(e) = client.publish(m.topic, m.qos, m.retain, m.payload).await {
            tracing::error!(error = %e, "MQTT client closed; results can no longer be published");
            return;
        }
    }
    let _ = client
        .publish(status_topic, QoS::AtLeastOnce, true, "offline")
        .await;
    let _ = client.disconnect().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{Publish, Subscribe};

    #[test]
    fn trim_pending_drops_the_oldest_publishes_and_keeps_subscriptions() {
        let mut el = EventLoop::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        el.pending
            .push_back(Request::Subscribe(Subscribe::new("a/#", QoS::AtLeastOnce)));
        for i in 0..10u8 {
            el.pending.push_back(Request::Publish(Publish::new(
                "r",
                QoS::AtLeastOnce,
                vec![i],
            )));
        }
        let stats = BrokerStats::default();
        trim_pending(&mut el, 4, &stats);
        assert_eq!(el.pending.len(), 4);
        assert_eq!(stats.pending_dropped.get(), 7);
        assert!(matches!(el.pending[0], Request::Subscribe(_)));
        // The newest three publishes survive, in order.
        let kept: Vec<u8> = el
            .pending
            .iter()
            .filter_map(|r| match r {
                Request::Publish(p) => Some(p.payload[0]),
                _ => None,
            })
            .collect();
        assert_eq!(kept, vec![7, 8, 9]);
        trim_pending(&mut el, 4, &stats);
        assert_eq!(stats.pending_dropped.get(), 7, "nothing more to drop");
    }
}
