//! Pipelines: input → decode → window → preprocess → inference →
//! postprocess → result. Each pipeline has `workers` dedicated OS threads
//! (never tokio workers); a source topic always goes to the same worker, so
//! its samples stay in order, and each worker owns its tract state.

pub mod camera;
pub mod control;
pub mod frame;
pub mod post;
pub mod pre;
pub mod result;
mod runner;
pub mod sensor;
mod spec;

pub use runner::{start, PipelineHandle};
pub use spec::{engine_options, CameraSpec, Kind, PipelineSpec, SensorPayload, SensorSpec};

#[cfg(test)]
mod tests;
