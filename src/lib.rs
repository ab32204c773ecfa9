//! edgeinfer: MQTT sensor streams in, quantized ONNX inference (tract) on
//! dedicated threads, results and health out.
//!
//! The daemon is one library call, [`run`], which tests drive directly:
//!
//! ```text
//! broker ──► mqtt::drive_connection (poll loop) ──try_send──► pipeline queue (bounded, drops counted)
//!                 │                                     │
//!                 │ ConnAck: subscribe, "online"        ▼ worker thread(s): decode → window
//!                 │                                       → preprocess → tract → postprocess
//!                 ▼                                     │
//!           rumqttc client ◄── mqtt::publish_loop ◄── outbox (bounded) ◄── health task
//! ```
// Denied, not forbidden: two loops of our tract ops (kernels/depthwise.rs,
// kernels/fakequant.rs) call their AVX builds after checking the CPU has
// AVX, the one thing safe Rust cannot say (README "Engines"); pageout.rs
// unmaps the executable's read-only pages once the daemon serves (README
// "Memory").
#![deny(unsafe_code)]

pub mod bundled;
pub mod commands;
pub mod config;
mod daemon;
pub mod demo;
pub mod flow;
pub mod health;
pub mod homeassistant;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod ops;
pub mod pageout;
pub mod pipeline;
pub mod systemd;
pub mod topic;

pub use daemon::{check, memory_budget, run, run_reloading, RunError, SHUTDOWN_GRACE};
pub use pipeline::engine_options;
