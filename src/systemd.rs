//! systemd integration: readiness and watchdog notifications, and logging
//! to the journal when systemd started us.
//!
//! One log backend is chosen at start. Under systemd (`JOURNAL_STREAM` set
//! and the journal reachable) tracing events go through the `log` facade to
//! systemd-journal-logger (structured fields are flattened into the message
//! text); otherwise tracing-subscriber writes to stderr.

use std::time::Duration;

/// Installs the process's one logger. `RUST_LOG` overrides the default level.
pub fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            if journal.install().is_ok() {
                let level = std::env::var("RUST_LOG")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(if verbose {
                        log::LevelFilter::Debug
                    } else {
                        log::LevelFilter::Info
                    });
                log::set_max_level(level);
                return;
            }
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},rumqttd=off,tract=warn"))
    });
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn notify_ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

pub fn notify_reloading() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// How often to ping the watchdog (half its timeout), when the unit has one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

pub fn notify_watchdog() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
}
