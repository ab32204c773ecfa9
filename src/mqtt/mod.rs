//! MQTT: the broker connection (poll loop, reconnect backoff,
//! resubscription), routing of incoming messages to pipelines, and the
//! outbox through which results, errors and health leave.

mod backoff;
mod connection;
mod outbox;
mod sink;
pub mod spool;
mod tls;

pub use crate::topic::{
    check_publishable, check_template, PublishLimits, TopicFilter, TopicTemplate,
};
pub use backoff::Backoff;
pub use connection::{
    connect_options, drive_connection, status_topic, CommandLanes, ConnectionContext, Router,
};
pub use outbox::{
    outbox, publish_loop, Outbox, OutboxReceiver, OutboxSettings, Outgoing, Reporter, Tracker,
    Unpublishable,
};
pub use sink::{LatestResults, PipelineSink, Route};

pub use rumqttc::QoS;

pub use crate::config::BrokerAddress;

/// The QoS for a configured level. 2 is served as 1: delivery is at least
/// once end to end (the outbox tracks PUBACKs), and consumers de-duplicate.
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}
