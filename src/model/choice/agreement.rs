//! Whether two engines agree: one probe input through each, outputs
//! compared within the tolerances (float, or a few quantization steps).

use super::*;

/// Deterministic inputs: the data input over its whole range (int8/uint8)
/// or [-1, 1] (floats), every other input (recurrent state) zeros.
pub fn probe(inputs: &[Fact], data: Option<usize>) -> Result<TVec<TValue>, String> {
    let mut rng = fastrand::Rng::with_seed(0x0ED6E);
    inputs
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let shape = &f.info.shape;
            let n: usize = shape.iter().product();
            let tensor = if Some(i) != data {
                Tensor::zero_dt(f.datum.unquantized(), shape)
            } else {
                match f.datum.unquantized() {
                    DatumType::F32 => Tensor::from_shape(
                        shape,
                        &(0..n).map(|_| rng.f32() * 2.0 - 1.0).collect::<Vec<_>>(),
                    ),
                    DatumType::I8 => {
                        Tensor::from_shape(shape, &(0..n).map(|_| rng.i8(..)).collect::<Vec<_>>())
                    }
                    DatumType::U8 => {
                        Tensor::from_shape(shape, &(0..n).map(|_| rng.u8(..)).collect::<Vec<_>>())
                    }
                    other => Tensor::zero_dt(other, shape),
                }
            };
            tensor.map(|t| t.into_tvalue()).map_err(|e| e.to_string())
        })
        .collect()
}

/// The largest |difference| of one engine's outputs (`facts_t`, `out_t`)
/// from the reference's (dequantized) and, when an output is out of
/// tolerance or a classifier's top-1 differs, why.
pub(super) fn compare(
    facts_t: &[Fact],
    out_t: &[TValue],
    facts_o: &[Fact],
    out_o: &[TValue],
    manifest: &Manifest,
    graph: &GraphFacts,
) -> (f32, Option<String>) {
    let mut max_diff = 0f32;
    let mut verdict = None;
    // The output a classifier's top-1 is read from.
    let read = manifest
        .output
        .name
        .as_deref()
        .or(facts_o.first().map(|f| f.info.name.as_str()));
    for (fo, vo) in facts_o.iter().zip(out_o) {
        let Some(ix) = facts_t.iter().position(|f| f.info.name == fo.info.name) else {
            verdict.get_or_insert(format!("no output {}", fo.info.name));
            continue;
        };
        let vt = &out_t[ix];
        let quant = graph.output_quant.get(&fo.info.name).copied();
        let (Ok(a), Ok(b)) = (dequantized(vt, quant), dequantized(vo, quant)) else {
            continue;
        };
        if a.len() != b.len() {
            verdict.get_or_insert(format!(
                "output {} has {} values, {} on the reference",
                fo.info.name,
                a.len(),
                b.len()
            ));
            continue;
        }
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            // f32::max would drop a NaN: keep it, it is a disagreement.
            .fold(0f32, |m, d| {
                if d.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            });
        max_diff = if diff.is_nan() {
            diff
        } else {
            max_diff.max(diff)
        };
        let allowed = match step(vt, quant) {
            // One quantization step (and a hair for float rounding).
            Some(step) => step * 1.001,
            None => FLOAT_ATOL + FLOAT_RTOL * b.iter().fold(0f32, |m, x| m.max(x.abs())),
        };
        // NaN on either side is a disagreement too.
        if diff.is_nan() || diff > allowed {
            verdict.get_or_insert(format!(
                "output {}: max |difference| {diff} over the {allowed} allowed",
                fo.info.name
            ));
        }

        if manifest.output.kind == OutputKind::Classification && Some(fo.info.name.as_str()) == read
        {
            let top = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map(|(i, _)| i)
            };
            if top(&a) != top(&b) {
                verdict.get_or_insert(format!(
                    "top-1 class {:?}, {:?} on the reference",
                    top(&a),
                    top(&b)
                ));
            }
        }
    }
    (max_diff, verdict)
}

/// The value of one quantization step of an int8/uint8 output.
pub(super) fn step(value: &TValue, quant: Option<QuantParams>) -> Option<f32> {
    let dt = value.datum_type();
    if !matches!(dt.unquantized(), DatumType::I8 | DatumType::U8) {
        return None;
    }
    match (quant, dt.zp_scale()) {
        (Some(q), _) => Some(q.scale),
        (None, (_, s)) if dt.is_quantized() => Some(s),
        _ => Some(1.0),
    }
}

/// The values of an output as f32, dequantized where it is int8/uint8.
pub fn dequantized(value: &TValue, quant: Option<QuantParams>) -> Result<Vec<f32>, ModelErrorKind> {
    let bad = |e: TractError| ModelErrorKind::Inference(crate::model::chain(&e));
    let dt = value.datum_type();
    let (scale, zp) = match (quant, dt.zp_scale()) {
        (Some(q), _) => (q.scale, q.zero_point as f32),
        (None, (z, s)) if dt.is_quantized() => (s, z as f32),
        _ => (1.0, 0.0),
    };
    let plain = value.cast_to_dt(dt.unquantized()).map_err(bad)?;
    Ok(match dt.unquantized() {
        DatumType::F32 => backend::plain_slice::<f32>(&plain).map_err(bad)?.to_vec(),
        DatumType::I8 => backend::plain_slice::<i8>(&plain)
            .map_err(bad)?
            .iter()
            .map(|q| (*q as f32 - zp) * scale)
            .collect(),
        DatumType::U8 => backend::plain_slice::<u8>(&plain)
            .map_err(bad)?
            .iter()
            .map(|q| (*q as f32 - zp) * scale)
            .collect(),
        _ => {
            let cast = plain.cast_to::<f32>().map_err(bad)?;
            backend::plain_slice::<f32>(&cast).map_err(bad)?.to_vec()
        }
    })
}
