//! The stage DAG of one pipeline on top of `petgraph`: edges run from a need to the stage that needs it.
//! It answers the questions the rest of the crate asks (topological order, ancestors, cycles as whole chains)
//! and renders Graphviz DOT and Mermaid for `echo-worker graph`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;

use petgraph::Direction;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

/// The dependency graph of a pipeline's stages. Node order is declaration order.
#[derive(Debug, Clone, Default)]
pub struct StageGraph {
    graph: DiGraph<String, ()>,
    index: HashMap<String, NodeIndex>,
}

impl StageGraph {
    /// Builds the graph from stage ids (in declaration order) and `(need, stage)` edges between known ids.
    pub fn new<'a>(
        ids: impl IntoIterator<Item = &'a str>,
        edges: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        for id in ids {
            index.entry(id.to_string()).or_insert_with(|| graph.add_node(id.to_string()));
        }
        for (need, stage) in edges {
            if let (Some(&from), Some(&to)) = (index.get(need), index.get(stage)) {
                graph.update_edge(from, to, ());
            }
        }
        Self { graph, index }
    }

    /// Every cycle, each as a closed chain `[a, b, c, a]` where each stage needs the one before it.
    /// One chain per strongly connected component, starting at its first-declared stage.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let mut cycles: Vec<Vec<String>> = tarjan_scc(&self.graph)
            .into_iter()
            .filter(|component| component.len() > 1 || self.graph.contains_edge(component[0], component[0]))
            .map(|component| self.shortest_cycle(&component))
            .collect();
        cycles.sort_by_key(|chain| self.index[&chain[0]]);
        cycles
    }

    /// Breadth-first search from the component's first-declared node back to itself.
    fn shortest_cycle(&self, component: &[NodeIndex]) -> Vec<String> {
        let start = *component.iter().min().expect("components are never empty");
        let mut parent: HashMap<NodeIndex, NodeIndex> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(node) = queue.pop_front() {
            let mut next: Vec<NodeIndex> = self.graph.neighbors_directed(node, Direction::Outgoing).collect();
            next.sort();
            for successor in next {
                if successor == start {
                    let mut chain = vec![node];
                    while let Some(&previous) = parent.get(chain.last().expect("chain is never empty")) {
                        chain.push(previous);
                    }
                    chain.reverse();
                    chain.push(start);
                    return chain.into_iter().map(|node| self.graph[node].clone()).collect();
                }
                if component.contains(&successor) && !parent.contains_key(&successor) && successor != start {
                    parent.insert(successor, node);
                    queue.push_back(successor);
                }
            }
        }
        vec![self.graph[start].clone()]
    }

    /// Stage ids in an order where every stage comes after its needs; among ready stages, declaration order
    /// wins, so the order is stable. `None` when the graph has a cycle.
    pub fn topological_order(&self) -> Option<Vec<String>> {
        let mut remaining: HashMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|node| (node, self.graph.neighbors_directed(node, Direction::Incoming).count()))
            .collect();
        let mut ready: BTreeSet<NodeIndex> = remaining.iter().filter(|(_, n)| **n == 0).map(|(k, _)| *k).collect();
        let mut order = Vec::with_capacity(self.graph.node_count());
        while let Some(node) = ready.pop_first() {
            order.push(self.graph[node].clone());
            for successor in self.graph.neighbors_directed(node, Direction::Outgoing) {
                let count = remaining.get_mut(&successor).expect("every node is counted");
                *count -= 1;
                if *count == 0 {
                    ready.insert(successor);
                }
            }
        }
        (order.len() == self.graph.node_count()).then_some(order)
    }

    /// Every stage that `id` transitively needs (not `id` itself unless it is on a cycle).
    pub fn ancestors(&self, id: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let Some(&start) = self.index.get(id) else { return seen };
        let mut stack = vec![start];
        while let Some(node) = stack.pop() {
            for need in self.graph.neighbors_directed(node, Direction::Incoming) {
                if seen.insert(self.graph[need].clone()) {
                    stack.push(need);
                }
            }
        }
        seen
    }

    /// Graphviz DOT; `label` gives each stage's second line (its kind).
    pub fn to_dot(&self, name: &str, label: impl Fn(&str) -> String) -> String {
        let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n", escape(name));
        for node in self.graph.node_indices() {
            let id = &self.graph[node];
            let _ = writeln!(out, "  \"{id}\" [label=\"{id}\\n{}\"];", escape(&label(id)));
        }
        for edge in self.graph.raw_edges() {
            let _ = writeln!(out, "  \"{}\" -> \"{}\";", self.graph[edge.source()], self.graph[edge.target()]);
        }
        out.push_str("}\n");
        out
    }

    /// A Mermaid flowchart; node ids get an `s_` prefix so that stage ids such as `end` are never keywords.
    pub fn to_mermaid(&self, label: impl Fn(&str) -> String) -> String {
        let mut out = String::from("flowchart LR\n");
        for node in self.graph.node_indices() {
            let id = &self.graph[node];
            let kind = label(id).replace('"', "#quot;");
            let _ = writeln!(out, "  s_{id}[\"{id}<br/><i>{kind}</i>\"]");
        }
        for edge in self.graph.raw_edges() {
            let _ = writeln!(out, "  s_{} --> s_{}", self.graph[edge.source()], self.graph[edge.target()]);
        }
        out
    }
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(ids: &[&'static str], edges: &[(&'static str, &'static str)]) -> StageGraph {
        StageGraph::new(ids.iter().copied(), edges.iter().copied())
    }

    #[test]
    fn orders_stably_and_finds_ancestors() {
        let g = graph(&["p", "b", "a", "c"], &[("a", "c"), ("b", "c"), ("c", "p")]);
        assert_eq!(g.topological_order().unwrap(), ["b", "a", "c", "p"]);
        assert_eq!(g.ancestors("p").into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn reports_whole_cycle_chains() {
        let g = graph(&["a", "b", "c", "d"], &[("a", "b"), ("b", "c"), ("c", "a"), ("d", "d")]);
        assert_eq!(g.cycles(), [vec!["a", "b", "c", "a"], vec!["d", "d"]]);
        assert!(g.topological_order().is_none());
    }

    #[test]
    fn renders_dot_and_mermaid() {
        let g = graph(&["end", "x"], &[("end", "x")]);
        let dot = g.to_dot("p", |id| format!("kind-{id}"));
        assert!(dot.contains("\"end\" -> \"x\";"), "{dot}");
        let mermaid = g.to_mermaid(|id| format!("kind-{id}"));
        assert!(mermaid.starts_with("flowchart LR\n"));
        assert!(mermaid.contains("  s_end --> s_x\n"), "{mermaid}");
    }
}
