//! A worker's handle on a model: the shared plan plus its own tract state.

use super::{chain, panic_message, Model, ModelError, ModelErrorKind, QuantParams};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tract_onnx::prelude::*;

/// One worker's handle on a model: the shared plan plus private state.
pub struct Session {
    pub(super) model: Arc<Model>,
    pub(super) state: TypedSimpleState,
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

    fn error(&self, kind: ModelErrorKind) -> ModelError {
        ModelError {
            model: self.model.name.clone(),
            kind,
        }
    }

    fn run_values(&mut self, input: Tensor, state: &[Tensor]) -> Result<TVec<TValue>, ModelError> {
        let model = &self.model;
        let mut fed: Vec<Option<TValue>> = vec![None; model.inputs.len()];
        fed[model.data_input] = Some(input.into_tvalue());
        for (k, (i, _)) in model.state_io.iter().enumerate() {
            fed[*i] = Some(state[k].clone().into_tvalue());
        }
        let inputs: TVec<TValue> = fed
            .into_iter()
            .map(|v| v.expect("every input is data or state"))
            .collect();
        let result = catch_unwind(AssertUnwindSafe(|| self.state.run(inputs)));
        match result {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(e)) => Err(self.error(ModelErrorKind::Inference(chain(&e)))),
            Err(panic) => {
                // The state may be half-updated: start from a fresh one.
                self.state = self.model.new_state()?;
                Err(self.error(ModelErrorKind::Panic {
                    stage: "running",
                    message: panic_message(panic),
                }))
            }
        }
    }
}

fn output_f32(value: &TValue, quant: Option<QuantParams>) -> Result<Vec<f32>, ModelErrorKind> {
    let dt = value.datum_type();
    let (scale, zp) = match (quant, dt.zp_scale()) {
        (Some(q), _) => (q.scale, q.zero_point as f32),
        (None, (z, s)) if dt.is_quantized() => (s, z as f32),
        _ => (1.0, 0.0),
    };
    let tensor: &Tensor = value;
    Ok(match dt.unquantized() {
        DatumType::F32 => plain::<f32>(tensor)?,
        DatumType::I8 => plain::<i8>(tensor)?
            .into_iter()
            .map(|q| (q as f32 - zp) * scale)
            .collect(),
        DatumType::U8 => plain::<u8>(tensor)?
            .into_iter()
            .map(|q| (q as f32 - zp) * scale)
            .collect(),
        _ => {
            let cast = tensor
                .cast_to::<f32>()
                .map_err(|e| ModelErrorKind::Inference(chain(&e)))?;
            plain::<f32>(&cast)?
        }
    })
}

/// The elements of a tensor as a vector, quantized types read as their
/// plain integers.
fn plain<T: Datum + Copy>(tensor: &Tensor) -> Result<Vec<T>, ModelErrorKind> {
    let bad = |e: TractError| ModelErrorKind::Inference(chain(&e));
    let unquantized = tensor
        .cast_to_dt(tensor.datum_type().unquantized())
        .map_err(bad)?;
    let values = unquantized
        .try_as_plain_ram()
        .map_err(bad)?
        .as_slice::<T>()
        .map_err(bad)?
        .to_vec();
    Ok(values)
}
