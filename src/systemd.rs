//! systemd integration: readiness and watchdog notifications, and logging
//! to the journal when systemd started us.
//!
//! One log backend is chosen at start. Under systemd (`JOURNAL_STREAM` set
//! and the journal reachable) tracing-journald writes each event with its
//! fields, and those of the spans it is in, as journal fields (a pipeline's
//! worker threads run in a span with `pipeline` and `model`, so their
//! events carry `PIPELINE=` and `MODEL=`); otherwise tracing-subscriber
//! writes text to stderr. Dependencies' `log` records join either way.

use std::time::Duration;

/// Installs the process's one logger. `RUST_LOG` overrides the default level.
/// Under systemd (stderr is the journal's stream, `JOURNAL_STREAM`), or
/// with `EDGEINFER_LOG=journal`, events go to the journal with their fields
/// as journal fields, upper-cased (`pipeline` → `PIPELINE=`); otherwise to
/// stderr as text.
pub fn init_logging(verbose: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if verbose { "debug" } else { "info" };
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{default},rumqttd=off,tract=warn"))
        })
    };
    if journal_wanted() {
        if let Ok(journal) = tracing_journald::layer() {
            let journal = journal
                .with_field_prefix(None)
                .with_syslog_identifier("edgeinfer".into());
            if tracing_subscriber::registry()
                .with(filter())
                .with(journal)
                .try_init()
                .is_ok()
            {
                return;
            }
        }
    }
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Whether logs belong in the journal: `EDGEINFER_LOG=journal`, or stderr
/// is the stream systemd names in `JOURNAL_STREAM` (`device:inode`).
fn journal_wanted() -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::env::var("EDGEINFER_LOG").as_deref() {
        Ok("journal") => return true,
        Ok("stderr") => return false,
        _ => {}
    }
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream == format!("{}:{}", stderr.dev(), stderr.ino())
}

pub fn notify_ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=` in the same message: systemd 253
/// and newer (`Type=notify-reload`) fail a reload notified without it.
/// `notify_ready` ends the reload.
pub fn notify_reloading() {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    let _ = sd_notify::notify(&states);
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
