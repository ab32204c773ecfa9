//! A worker's handle on a model: the shared model plus its own runner on
//! the model's engine.

use super::backend::{NodeTime, Runner};
use super::choice::dequantized;
use super::{Model, ModelError, ModelErrorKind, QuantParams};
use std::sync::Arc;
use tract_onnx::prelude::*;

/// One worker's handle on a model: the shared model plus a private runner.
pub struct Session {
    pub(super) model: Arc<Model>,
    pub(super) runner: Box<dyn Runner>,
}

impl Session {
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Runs the model on one input tensor and returns the output that
    /// postprocessing reads, as f32 (dequantized where it is int8/uint8).
    pub fn run(&mut self, input: Tensor) -> Result<Vec<f32>, ModelError> {
        let mut state = self.model.initial_state.clone();
        self.run_with_state(input, &mut state)
    }

    /// Like [`run`](Self::run) for streaming models: `state` (one tensor per
    /// `[[state]]`, from [`Model::initial_state`]) is fed in and replaced by
    /// the state outputs. On error it is left unchanged.
    pub fn run_with_state(
        &mut self,
        input: Tensor,
        state: &mut [Tensor],
    ) -> Result<Vec<f32>, ModelError> {
        let ix = self.model.output_index;
        let outputs = self.run_values(input, state)?;
        for (k, (_, o)) in self.model.state_io.iter().enumerate() {
            state[k] = outputs[*o].clone().into_tensor();
        }
        output_f32(&outputs[ix], self.model.output_quant[ix]).map_err(|kind| self.error(kind))
    }

    /// Runs the model and returns every output as f32, dequantized.
    pub fn run_all(&mut self, input: Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
        let state = self.model.initial_state.clone();
        let outputs = self.run_values(input, &state)?;
        outputs
            .iter()
            .zip(&self.model.output_quant)
            .map(|(v, q)| output_f32(v, *q).map_err(|kind| self.error(kind)))
            .collect()
    }

    /// Runs once, adding each node's time to `nodes`; false where the
    /// engine cannot time its nodes.
    pub fn profile(
        &mut self,
        input: Tensor,
        nodes: &mut Vec<NodeTime>,
    ) -> Result<bool, ModelError> {
        let state = self.model.initial_state.clone();
        let inputs = self.inputs(input, &state);
        self.runner
            .profile(inputs, nodes)
            .map_err(|kind| self.error(kind))
    }

    fn error(&self, kind: ModelErrorKind) -> ModelError {
        ModelError {
            model: self.model.name.clone(),
            kind,
        }
    }

    fn run_values(&mut self, input: Tensor, state: &[Tensor]) -> Result<TVec<TValue>, ModelError> {
        let inputs = self.inputs(input, state);
        self.runner.run(inputs).map_err(|kind| self.error(kind))
    }

    /// The data input and the state, in the graph's order of inputs.
    fn inputs(&self, input: Tensor, state: &[Tensor]) -> TVec<TValue> {
        let model = &self.model;
        let mut fed: Vec<Option<TValue>> = vec![None; model.inputs.len()];
        fed[model.data_input] = Some(input.into_tvalue());
        for (k, (i, _)) in model.state_io.iter().enumerate() {
            fed[*i] = Some(state[k].clone().into_tvalue());
        }
        fed.into_iter()
            .map(|v| v.expect("every input is data or state"))
            .collect()
    }
}

fn output_f32(value: &TValue, quant: Option<QuantParams>) -> Result<Vec<f32>, ModelErrorKind> {
    dequantized(value, quant)
}
