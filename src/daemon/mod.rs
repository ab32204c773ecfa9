//! The daemon's wiring: loads the models, starts the pipelines, joins them
//! to the MQTT transport (routes in, sinks out), runs the health and
//! command loops, and shuts it all down in order.

use crate::config::{self, Config, Problem};
use crate::health::{self, SystemSampler, Telemetry};
use crate::model::Registry;
use crate::mqtt::{self, Backoff, ConnectionContext, Outbox, Outgoing, Router, TopicFilter};
use crate::{flow, pipeline, systemd};
use rumqttc::{AsyncClient, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod parts;
mod reload;
mod start;

pub use parts::memory_budget;
use parts::*;
use reload::*;

/// How long shutdown may take to drain queues and say `offline`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<Problem>),
    #[error("MQTT setup failed: {0}")]
    Mqtt(String),
}

/// Provider names the engine does not know, keyed like the config.
fn check_providers(config: &Config) -> Vec<Problem> {
    let known = crate::model::backend::provider_names();
    let lists = std::iter::once((
        "engine.providers".to_string(),
        Some(&config.engine.providers),
    ))
    .chain(
        config
            .pipelines
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("pipeline[{i}].providers"), p.providers.as_ref())),
    );
    let mut problems = Vec::new();
    for (key, list) in lists {
        for p in list.into_iter().flatten() {
            let name = p.split(':').next().unwrap_or("");
            if !known.contains(&name) {
                problems.push(Problem {
                    key: key.clone(),
                    message: format!("unknown provider {p:?} (known: {})", known.join(", ")),
                });
            }
        }
    }
    problems
}

/// Loads every model the config names and checks each pipeline against its
/// model. Returns every problem, keyed like the config (`pipeline[0].model`).
pub fn check(config: &Config) -> Vec<Problem> {
    let mut problems = config.validate();
    problems.extend(check_providers(config));
    if problems.iter().any(|p| p.key.starts_with("pipeline")) {
        return problems;
    }
    if problems.is_empty() {
        // Reads the password and the TLS files, as `run` will.
        if let Err(message) = mqtt::connect_options(config) {
            problems.push(Problem {
                key: "broker".into(),
                message,
            });
        }
    }
    let mut registry = Registry::default();
    for (i, p) in config.pipelines.iter().enumerate() {
        match registry.get_or_load(
            &config.model_path(p),
            &crate::pipeline::engine_options(config, p),
        ) {
            Ok(model) => {
                if let Err(message) = pipeline::PipelineSpec::new(config, p, model)
                    .and_then(|_| mqtt::Route::new(config, p).map(|_| ()))
                {
                    problems.push(Problem {
                        key: format!("pipeline[{i}]"),
                        message,
                    });
                }
            }
            Err(e) => problems.push(Problem {
                key: format!("pipeline[{i}].model"),
                message: e.to_string(),
            }),
        }
    }
    problems
}

/// Runs the daemon until `shutdown` is cancelled, then stops ingest,
/// finishes queued work, publishes `offline` and returns.
///
/// The configuration is validated first (no network I/O happens when it is
/// invalid). A pipeline whose model fails to load is reported (log, health)
/// and the others keep serving.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    run_reloading(config, shutdown, None).await
}

/// [`run`], reloading the configuration file (`Config::source`) on each
/// message of `reloads` (SIGHUP) and on the `reload` operation. A reload
/// that touches only pipelines' models and model settings is applied in
/// place (see [`reload`]); any other change restarts the daemon's parts in
/// order, as a stop and a start would.
pub async fn run_reloading(
    mut config: Config,
    shutdown: CancellationToken,
    reloads: Option<flume::Receiver<()>>,
) -> Result<(), RunError> {
    let mut restarting = false;
    loop {
        match run_one_configuration(config, shutdown.clone(), reloads.clone(), restarting).await? {
            Some(next) => config = next,
            None => return Ok(()),
        }
        restarting = true;
    }
}

/// One configuration, from its start until shutdown (None) or a reload
/// that needs the parts restarted (the new configuration).
async fn run_one_configuration(
    config: Config,
    shutdown: CancellationToken,
    reloads: Option<flume::Receiver<()>>,
    restarting: bool,
) -> Result<Option<Config>, RunError> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(RunError::Config(problems));
    }
    let running = start::start(config, &shutdown, reloads, restarting).await?;
    let restart = tokio::select! {
        _ = shutdown.cancelled() => None,
        next = running.restart.recv_async() => next.ok(),
    };
    // A restart for a reload stops everything but the process, in order.
    if restart.is_some() {
        tracing::info!("Restarting to apply the new configuration");
    } else {
        systemd::notify_stopping();
        tracing::info!("Shutting down");
    }
    running.stop().await;
    Ok(restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tighter_cgroup_limit_lowers_the_budget() {
        assert_eq!(memory_budget(128 << 20, None), 128 << 20);
        assert_eq!(memory_budget(128 << 20, Some(192 << 20)), 128 << 20);
        // 256 MiB configured under a 192 MiB MemoryMax: 80 % of 192.
        assert_eq!(
            memory_budget(256 << 20, Some(192 << 20)),
            (192 << 20) / 5 * 4
        );
    }

    #[test]
    fn shared_filters_subscribe_once_at_the_highest_qos() {
        let subs = subscriptions([
            ("a/+", QoS::AtMostOnce),
            ("b/#", QoS::AtLeastOnce),
            ("a/+", QoS::AtLeastOnce),
            ("b/#", QoS::AtMostOnce),
        ]);
        assert_eq!(
            subs,
            vec![
                ("a/+".to_string(), QoS::AtLeastOnce),
                ("b/#".to_string(), QoS::AtLeastOnce)
            ]
        );
    }
}
