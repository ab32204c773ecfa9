//! MQTT: the broker connection (poll loop, reconnect backoff,
//! resubscription), routing of incoming messages to pipelines, and the
//! outbox through which results, errors and health leave.

mod backoff;
mod connection;
mod outbox;
pub mod spool;
mod tls;
pub mod topic;

pub use backoff::Backoff;
pub use connection::{connect_options, drive, status_topic, AckToken, ConnectionContext, Router};
pub use outbox::{
    outbox, publish_loop, Outbox, OutboxReceiver, OutboxSettings, Outgoing, Reporter, Tracker,
    Unpublishable,
};
pub use topic::{check_publishable, check_template, PublishLimits, TopicFilter, TopicTemplate};

pub use rumqttc::QoS;

/// Host, port and transport of a broker URL: `mqtt://HOST[:PORT]` (1883)
/// or `mqtts://HOST[:PORT]` (8883, TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    pub fn parse(url: &str) -> Result<BrokerAddress, String> {
        let (rest, tls) = if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (r, false)
        } else if let Some(r) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (r, true)
        } else {
            return Err(format!(
                "{url:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '?', '@']) {
            return Err(format!(
                "{url:?}: expected a host and port, with no path, query or credentials"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            (h, p.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
        };
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

/// The QoS for a configured level. 2 is served as 1: delivery is at least
/// once end to end (the outbox tracks PUBACKs), and consumers de-duplicate.
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = |u| BrokerAddress::parse(u);
        let addr = |host: &str, port, tls| BrokerAddress {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(
            a("mqtt://127.0.0.1:1884").unwrap(),
            addr("127.0.0.1", 1884, false)
        );
        assert_eq!(
            a("mqtt://broker.local").unwrap(),
            addr("broker.local", 1883, false)
        );
        assert_eq!(a("tcp://[::1]:2000").unwrap(), addr("::1", 2000, false));
        assert_eq!(
            a("mqtts://broker.local").unwrap(),
            addr("broker.local", 8883, true)
        );
        assert_eq!(
            a("ssl://10.0.0.1:9000").unwrap(),
            addr("10.0.0.1", 9000, true)
        );
        assert!(a("http://x").is_err());
        assert!(a("mqtt://:1883").is_err());
        assert!(a("mqtt://x:0").is_err());
        assert!(a("mqtt://x:99999").is_err());
        assert!(a("mqtt://user:pw@x").is_err());
    }
}
