//! From ONNX bytes to an optimised tract plan: graph preparation (see
//! `graph.rs`), a strict load, and a relaxed retry.

use super::graph::{self, GraphFacts};
use super::manifest::Manifest;
use super::{chain, ModelErrorKind};
use std::collections::HashMap;
use std::sync::Arc;
use tract_onnx::prelude::*;

pub(super) fn build_plan(
    bytes: &[u8],
    manifest: &Manifest,
) -> Result<(Arc<TypedRunnableModel>, GraphFacts), ModelErrorKind> {
    if bytes.is_empty() {
        return Err(ModelErrorKind::Corrupt("the file is empty".into()));
    }
    let loader = tract_onnx::onnx();
    let mut proto = loader
        .proto_model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| ModelErrorKind::Corrupt(chain(&e)))?;
    let unknown = graph::unsupported_operators(&proto, |op| loader.op_register.0.contains_key(op));
    if !unknown.is_empty() {
        return Err(ModelErrorKind::UnsupportedOperators(unknown.join(", ")));
    }
    let mut facts = graph::prepare(&mut proto);
    match plan_from_proto(&loader, &proto, manifest) {
        Ok(plan) => Ok((plan, facts)),
        Err(strict) => {
            // Some exporters declare value info or output shapes that tract
            // disagrees with; such models often load once those are ignored.
            let relaxed = tract_onnx::onnx()
                .with_ignore_value_info(true)
                .with_ignore_output_shapes(true);
            let plan = plan_from_proto(&relaxed, &proto, manifest).map_err(|_| strict)?;
            facts
                .rewrites
                .push("loaded ignoring the graph's declared value info and output shapes".into());
            Ok((plan, facts))
        }
    }
}

fn plan_from_proto(
    loader: &tract_onnx::Onnx,
    proto: &tract_onnx::pb::ModelProto,
    manifest: &Manifest,
) -> Result<Arc<TypedRunnableModel>, ModelErrorKind> {
    let engine = |e: TractError| ModelErrorKind::Engine(chain(&e));
    let inference = loader.model_for_proto_model(proto).map_err(engine)?;
    let typed = inference.into_typed().map_err(engine)?;
    // Symbolic dimensions (a batch `N`, say) become concrete: from the
    // manifest's input.shape where it gives one, else 1.
    let mut subs = HashMap::new();
    let outlets = typed.input_outlets().map_err(engine)?.to_vec();
    let label = |o: &OutletId| {
        typed
            .outlet_label(*o)
            .unwrap_or(&typed.node(o.node).name)
            .to_owned()
    };
    let is_state = |name: &str| manifest.state.iter().any(|s| s.input == name);
    let data_ix = match &manifest.input.name {
        Some(n) => outlets.iter().position(|o| &label(o) == n),
        None => outlets.iter().position(|o| !is_state(&label(o))),
    };
    for (ix, outlet) in outlets.iter().enumerate() {
        let fact = typed.outlet_fact(*outlet).map_err(engine)?;
        let wanted = if Some(ix) == data_ix {
            manifest.input.shape.as_deref()
        } else {
            None
        };
        if let Some(w) = wanted {
            if w.len() != fact.rank() {
                return Err(ModelErrorKind::Unsupported(format!(
                    "manifest input.shape {w:?} has rank {}, the graph's input has shape {:?}",
                    w.len(),
                    fact.shape
                )));
            }
        }
        for (d, dim) in fact.shape.iter().enumerate() {
            let want = wanted.map(|w| w[d]);
            match (dim.as_i64(), want) {
                (Some(have), Some(want)) if have as usize != want => {
                    return Err(ModelErrorKind::Unsupported(format!(
                        "manifest input.shape {:?} disagrees with the graph's input shape {:?}",
                        wanted.unwrap_or_default(),
                        fact.shape
                    )));
                }
                (Some(_), _) => {}
                (None, want) => {
                    for sym in dim.symbols() {
                        subs.entry(sym)
                            .or_insert_with(|| TDim::Val(want.unwrap_or(1) as i64));
                    }
                }
            }
        }
    }
    let typed = if subs.is_empty() {
        typed
    } else {
        typed.set_symbols(&subs).map_err(engine)?
    };
    let optimized = typed.into_optimized().map_err(engine)?;
    optimized.into_runnable().map_err(engine)
}
