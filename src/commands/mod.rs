//! The one-shot commands, each in its own file: `infer` (one input through
//! a model), `bench` (latency and memory of a model) and `models` (what
//! each model is, or why it does not load).

mod bench;
mod infer;
mod models;

pub use bench::{bench, BenchReport};
pub use infer::{infer, InferInput};
pub use models::{check_table, describe, onnx_files, ModelRow};

use crate::model::ModelError;
use crate::pipeline::sensor::InputError;

#[derive(Debug, thiserror::Error)]
pub enum OneShotError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The input was unusable (exit status 65).
    #[error("bad input: {0}")]
    Input(String),
    #[error("{0}")]
    Other(String),
}

impl From<InputError> for OneShotError {
    fn from(e: InputError) -> Self {
        OneShotError::Input(e.to_string())
    }
}
