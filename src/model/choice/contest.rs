//! `auto`'s contest: the engines that may serve are timed side by side on
//! the probe input, and the fastest of those that agree serves.

use super::*;

/// The winner, why, and everyone's figures.
pub(super) type Contested = (Arc<dyn Engine>, String, Vec<Measurement>);

/// An engine in the contest: `serves` when it may be chosen, else it is
/// there only as the reference.
pub(super) struct Entrant {
    engine: Arc<dyn Engine>,
    serves: bool,
}

/// `auto` with several engines or variants loaded. With ONNX Runtime the
/// reference is its CPU provider (an accelerator's int8 arithmetic may
/// differ from it, and so may tract's); without it, tract on the graph as
/// given (the first of `tracts`). Every engine allowed to serve must agree
/// with the reference, and the fastest that does serves. Returns the
/// engine, the reason and the figures.
pub(super) fn contest(
    tracts: Vec<Arc<dyn Engine>>,
    ort: Option<Arc<dyn Engine>>,
    m: &ModelFacts,
    graph: &GraphFacts,
    options: &EngineOptions,
) -> Result<Contested, String> {
    const CPU: &str = "onnxruntime-cpu";
    let mut entrants: Vec<Entrant> = tracts
        .into_iter()
        .map(|engine| Entrant {
            engine,
            serves: true,
        })
        .collect();
    let mut reference = 0;
    if let Some(ort) = &ort {
        entrants.push(Entrant {
            engine: Arc::clone(ort),
            serves: true,
        });
        reference = entrants.len() - 1;
        if ort.runs_on() != CPU {
            let cpu_only = EngineOptions {
                providers: vec!["cpu".into()],
                strict: false,
                ..options.clone()
            };
            match load_ort(m, &cpu_only) {
                Ok((cpu, _, _)) => {
                    entrants.push(Entrant {
                        engine: cpu,
                        serves: options.providers.iter().any(|p| p == "cpu"),
                    });
                    reference = entrants.len() - 1;
                }
                Err(e) => tracing::warn!(
                    "No ONNX Runtime CPU session to compare {} against ({}): it is the reference",
                    ort.runs_on(),
                    e.join("; ")
                ),
            }
        }
    }
    let measured = measure(
        &entrants,
        reference,
        m.manifest,
        graph,
        options.probe_budget_ms,
    )?;
    let eligible =
        |i: usize| entrants[i].serves && (i == reference || measured[i].agrees == Some(true));
    let best = (0..entrants.len())
        .filter(|i| eligible(*i))
        .min_by(|a, b| measured[*a].p50_ms.total_cmp(&measured[*b].p50_ms));
    let reference_name = measured[reference].label();
    for (i, row) in measured.iter().enumerate() {
        if let (false, Some(why)) = (i == reference, &row.detail) {
            tracing::warn!(runs_on = %row.label(), "Answers differently from {reference_name}: {why}");
        }
    }
    let figures = |i: usize| {
        measured
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, r)| format!("{} {:.3} ms", r.label(), r.p50_ms))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(match (best, ort) {
        (Some(i), _) => {
            let differs: Vec<String> = measured
                .iter()
                .filter(|r| r.agrees == Some(false))
                .map(|r| format!("{} answers differently: {}", r.label(), r.detail.as_deref().unwrap_or("")))
                .collect();
            let mut reason = if i == reference {
                format!("the fastest agreeing engine ({:.3} ms; {})", measured[i].p50_ms, figures(i))
            } else {
                format!(
                    "agrees with {reference_name} and is the fastest ({:.3} ms; {})",
                    measured[i].p50_ms,
                    figures(i)
                )
            };
            if !differs.is_empty() {
                reason = format!("{reason}; {}", differs.join("; "));
            }
            (Arc::clone(&entrants[i].engine), reason, measured)
        }
        (None, Some(ort)) => (
            ort,
            format!(
                "no engine allowed to serve agrees with {reference_name}; serving with the first provider configured"
            ),
            measured,
        ),
        (None, None) => unreachable!("the reference (tract as given) always serves"),
    })
}

/// Runs the same probe through every entrant, compares each with the
/// reference, and times them all, interleaved.
pub(super) fn measure(
    entrants: &[Entrant],
    reference: usize,
    manifest: &Manifest,
    graph: &GraphFacts,
    budget_ms: u64,
) -> Result<Vec<Measurement>, String> {
    let label = |e: &Entrant| e.engine.label();
    let mut runs = Vec::new();
    for e in entrants {
        let names: Vec<String> = e
            .engine
            .inputs()
            .iter()
            .map(|f| f.info.name.clone())
            .collect();
        let input = probe(e.engine.inputs(), manifest.data_input_index(&names))?;
        let mut runner = e
            .engine
            .runner()
            .map_err(|err| format!("{}: {err}", label(e)))?;
        let output = runner
            .run(input.clone())
            .map_err(|err| format!("{}: {err}", label(e)))?;
        runs.push((runner, input, output));
    }
    let r = &entrants[reference].engine;
    let verdicts: Vec<(f32, Option<String>)> = entrants
        .iter()
        .zip(&runs)
        .map(|(e, (_, _, out))| {
            compare(
                e.engine.outputs(),
                out,
                r.outputs(),
                &runs[reference].2,
                manifest,
                graph,
            )
        })
        .collect();

    // Only the engines that could serve race for the budget: one that
    // answers differently, or is there only as the reference, gets the 3
    // runs every entrant gets (its figure is reported, never compared), and
    // with a single candidate left there is no race at all. A first start
    // then spends its budget only where there is a choice to make.
    let candidates: Vec<bool> = entrants
        .iter()
        .zip(&verdicts)
        .enumerate()
        .map(|(k, (e, (_, verdict)))| e.serves && (k == reference || verdict.is_none()))
        .collect();
    let racing = candidates.iter().filter(|c| **c).count() > 1;
    let budget = if racing {
        candidates.iter().filter(|c| **c).count() as u128 * budget_ms as u128
    } else {
        0
    };
    let lead = candidates.iter().position(|c| *c).unwrap_or(0);

    // Interleaved, so all see the same machine; at least 3 runs each.
    let mut times = vec![Vec::new(); entrants.len()];
    let started = Instant::now();
    while times[lead].len() < 3
        || (started.elapsed().as_millis() < budget && times[lead].len() < 200)
    {
        for (k, (runner, input, _)) in runs.iter_mut().enumerate() {
            if times[k].len() >= 3 && !candidates[k] {
                continue;
            }
            let t0 = Instant::now();
            runner
                .run(input.clone())
                .map_err(|err| format!("{}: {err}", label(&entrants[k])))?;
            times[k].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(entrants
        .iter()
        .zip(times.iter_mut())
        .zip(verdicts)
        .enumerate()
        .map(|(k, ((e, t), (diff, verdict)))| {
            let is_ref = k == reference;
            Measurement {
                runs_on: e.engine.runs_on().to_owned(),
                variant: e.engine.variant().map(str::to_owned),
                p50_ms: median(t),
                runs: t.len(),
                max_abs_diff: (!is_ref).then_some(diff),
                agrees: (!is_ref).then_some(verdict.is_none()),
                detail: match (is_ref, e.serves) {
                    (true, true) => Some("reference".into()),
                    (true, false) => Some("reference only (cpu is not in providers)".into()),
                    (false, _) => verdict,
                },
            }
        })
        .collect())
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
