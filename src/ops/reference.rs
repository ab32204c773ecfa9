//! A bundle's reference cases: raw inputs as the pipeline's preprocessing
//! takes them, and the output the publisher's edgeinfer gave.

use super::bundle::{Reference, ReferenceCase};
use crate::model::Model;
use crate::pipeline::frame::ImageInput;
use crate::pipeline::pre::Preprocessor;
use std::sync::Arc;

/// The preprocessing a pipeline would put in front of `model`: images for
/// rank-4 inputs, sample windows otherwise.
fn preprocessor(model: &Model) -> Result<Preprocessor, String> {
    if model.input().shape.len() == 4 {
        let image = ImageInput::new(model)?;
        let pre = Preprocessor::new(model, image.channels)?;
        Ok(if image.layout == crate::model::manifest::Layout::Nchw {
            pre.channel_first()
        } else {
            pre
        })
    } else {
        Preprocessor::sensor(model)
    }
}

/// Runs each input through preprocessing and the model, state carried from
/// case to case (streaming models answer a sequence).
pub fn outputs(model: &Arc<Model>, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, String> {
    let mut pre = preprocessor(model)?;
    let mut session = model.session().map_err(|e| e.to_string())?;
    let mut state = model.initial_state.clone();
    let want = model.input().len();
    let mut out = Vec::with_capacity(inputs.len());
    let mut normalised = Vec::new();
    for (i, raw) in inputs.iter().enumerate() {
        if raw.len() != want {
            return Err(format!(
                "reference case {i}: {} values, the model takes {want} ({})",
                raw.len(),
                model.input()
            ));
        }
        let tensor = pre.tensor(raw, &mut normalised);
        out.push(
            session
                .run_with_state(tensor, &mut state)
                .map_err(|e| format!("reference case {i}: {e}"))?,
        );
    }
    Ok(out)
}

/// A reference made on this machine, for `bundle create`.
pub fn make(
    model: &Arc<Model>,
    inputs: Vec<Vec<f32>>,
    tolerance: f32,
) -> Result<Reference, String> {
    let outputs = outputs(model, &inputs)?;
    Ok(Reference {
        tolerance,
        cases: inputs
            .into_iter()
            .zip(outputs)
            .map(|(input, output)| ReferenceCase { input, output })
            .collect(),
    })
}

/// What a reference check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    pub cases: usize,
    /// Largest difference, relative to max(1, |expected|).
    pub max_difference: f32,
}

/// Checks `model` answers every case within the reference's tolerance.
pub fn check(model: &Arc<Model>, reference: &Reference) -> Result<Checked, String> {
    let inputs: Vec<Vec<f32>> = reference.cases.iter().map(|c| c.input.clone()).collect();
    let got = outputs(model, &inputs)?;
    let mut worst = 0f32;
    for (i, (case, out)) in reference.cases.iter().zip(&got).enumerate() {
        if case.output.len() != out.len() {
            return Err(format!(
                "reference case {i}: {} outputs expected, the model gives {}",
                case.output.len(),
                out.len()
            ));
        }
        for (e, g) in case.output.iter().zip(out) {
            let d = (e - g).abs() / e.abs().max(1.0);
            // NaN is never within the tolerance.
            if d.is_nan() || d > reference.tolerance {
                return Err(format!(
                    "reference case {i}: output {g} where {e} was expected (tolerance {})",
                    reference.tolerance
                ));
            }
            worst = worst.max(d);
        }
    }
    Ok(Checked {
        cases: got.len(),
        max_difference: worst,
    })
}

/// Inputs for `bundle create --reference-inputs`: `{"inputs": [...]}` or a
/// `*.reference.json` with `cases[].input`; each input flat or as rows.
pub fn read_inputs(text: &str) -> Result<Vec<Vec<f32>>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let list: Vec<&serde_json::Value> =
        if let Some(inputs) = v.get("inputs").and_then(|i| i.as_array()) {
            inputs.iter().collect()
        } else if let Some(cases) = v.get("cases").and_then(|c| c.as_array()) {
            cases.iter().filter_map(|c| c.get("input")).collect()
        } else {
            return Err("expected {\"inputs\": [...]} or {\"cases\": [{\"input\": ...}]}".into());
        };
    list.into_iter()
        .enumerate()
        .map(|(i, input)| {
            let mut flat = Vec::new();
            flatten(input, &mut flat).map_err(|e| format!("input {i}: {e}"))?;
            Ok(flat)
        })
        .collect()
}

fn flatten(v: &serde_json::Value, out: &mut Vec<f32>) -> Result<(), String> {
    match v {
        serde_json::Value::Number(n) => {
            out.push(n.as_f64().ok_or("not a number")? as f32);
            Ok(())
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(|i| flatten(i, out)),
        other => Err(format!("{other} is not a number")),
    }
}
