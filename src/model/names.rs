//! Names in an ONNX graph: the ones in use, and fresh ones for what a
//! rewrite adds (lowering, `If` folding). A leaf: the graph code and the
//! rewrites both take it from here.

use std::collections::HashSet;
use tract_onnx::pb::GraphProto;

/// The names a graph uses, and fresh ones on request.
pub(crate) struct Names {
    taken: HashSet<String>,
}

impl Names {
    /// Every name `graph` uses — node names, their outputs, initializers
    /// and inputs.
    pub(crate) fn of(graph: &GraphProto) -> Names {
        Names {
            taken: graph
                .node
                .iter()
                .flat_map(|n| n.output.iter().cloned().chain([n.name.clone()]))
                .chain(graph.initializer.iter().map(|t| t.name.clone()))
                .chain(graph.input.iter().map(|t| t.name.clone()))
                .collect(),
        }
    }

    /// `stem`, else `stem.1`, `stem.2`, …: the first not in use, taken.
    pub(crate) fn fresh(&mut self, stem: &str) -> String {
        let name = (0..)
            .map(|n| match n {
                0 => stem.to_owned(),
                n => format!("{stem}.{n}"),
            })
            .find(|c| !self.taken.contains(c))
            .expect("an unused name");
        self.taken.insert(name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_names_never_meet_the_graph_or_each_other() {
        let mut graph = GraphProto::default();
        graph.initializer.push(tract_onnx::pb::TensorProto {
            name: "w".into(),
            ..Default::default()
        });
        let mut names = Names::of(&graph);
        assert_eq!(names.fresh("w"), "w.1");
        assert_eq!(names.fresh("w"), "w.2");
        assert_eq!(names.fresh("x"), "x");
    }
}
