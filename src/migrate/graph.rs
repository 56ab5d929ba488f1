//! The order migrations run in, across services: each version comes after
//! the previous version of its service, and after everything it names in
//! `depends_on`. Among migrations that are ready at the same time the lower
//! version goes first (then the service name), so the order is a
//! topological order that respects versions, and the same on every run.

use super::files::{Catalog, Migration, Version};
use std::collections::{BTreeSet, HashMap};

/// `(service, version)`.
pub type NodeId = (String, Version);

fn id_of(m: &Migration) -> NodeId {
    (m.service.clone(), m.version.clone())
}

/// Edges `from -> to` (`from` must run first), and dependencies that name
/// nothing (migration, the text it named).
pub struct Graph<'a> {
    pub nodes: Vec<&'a Migration>,
    edges: HashMap<NodeId, Vec<NodeId>>,
    pub unknown: Vec<(&'a Migration, String)>,
}

impl<'a> Graph<'a> {
    pub fn new(catalog: &'a Catalog) -> Graph<'a> {
        let mut nodes = Vec::new();
        let mut edges: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        let mut unknown = Vec::new();
        let exists = |service: &str, v: &Version| {
            catalog
                .services
                .get(service)
                .is_some_and(|ms| ms.iter().any(|m| &m.version == v))
        };
        for ms in catalog.services.values() {
            for (i, m) in ms.iter().enumerate() {
                nodes.push(m);
                if i > 0 {
                    edges.entry(id_of(&ms[i - 1])).or_default().push(id_of(m));
                }
                for d in &m.meta.depends_on {
                    let service = d.service.clone().unwrap_or_else(|| m.service.clone());
                    if exists(&service, &d.version) {
                        edges
                            .entry((service, d.version.clone()))
                            .or_default()
                            .push(id_of(m));
                    } else {
                        unknown.push((m, format!("{service}:{}", d.version)));
                    }
                }
            }
        }
        Graph {
            nodes,
            edges,
            unknown,
        }
    }

    /// Every cycle, each as the path that closes it (`a -> b -> a`), once.
    pub fn cycles(&self) -> Vec<Vec<NodeId>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let mut mark: HashMap<NodeId, Mark> =
            self.nodes.iter().map(|m| (id_of(m), Mark::New)).collect();
        let mut found: Vec<Vec<NodeId>> = Vec::new();
        let mut seen: BTreeSet<Vec<String>> = BTreeSet::new();
        let mut roots: Vec<NodeId> = self.nodes.iter().map(|m| id_of(m)).collect();
        roots.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        for root in roots {
            if mark.get(&root) != Some(&Mark::New) {
                continue;
            }
            // Iterative DFS: (node, next edge index), with the active path.
            let mut stack: Vec<(NodeId, usize)> = vec![(root.clone(), 0)];
            mark.insert(root, Mark::Active);
            while let Some((node, idx)) = stack.last().cloned() {
                let next = self.edges.get(&node).and_then(|e| e.get(idx)).cloned();
                let Some(next) = next else {
                    mark.insert(node, Mark::Done);
                    stack.pop();
                    continue;
                };
                if let Some(top) = stack.last_mut() {
                    top.1 += 1;
                }
                match mark.get(&next).copied().unwrap_or(Mark::Done) {
                    Mark::New => {
                        mark.insert(next.clone(), Mark::Active);
                        stack.push((next, 0));
                    }
                    Mark::Active => {
                        let start = stack.iter().position(|(n, _)| n == &next).unwrap_or(0);
                        let mut cycle: Vec<NodeId> =
                            stack[start..].iter().map(|(n, _)| n.clone()).collect();
                        let mut key: Vec<String> =
                            cycle.iter().map(|(s, v)| format!("{s}:{v}")).collect();
                        key.sort();
                        if seen.insert(key) {
                            cycle.push(next);
                            found.push(cycle);
                        }
                    }
                    Mark::Done => {}
                }
            }
        }
        found
    }

    /// A topological order (lowest version first among the ready ones), or
    /// `None` when there is a cycle.
    pub fn order(&self) -> Option<Vec<&'a Migration>> {
        let mut indegree: HashMap<NodeId, usize> =
            self.nodes.iter().map(|m| (id_of(m), 0)).collect();
        for targets in self.edges.values() {
            for t in targets {
                if let Some(d) = indegree.get_mut(t) {
                    *d += 1;
                }
            }
        }
        let by_id: HashMap<NodeId, &'a Migration> =
            self.nodes.iter().map(|m| (id_of(m), *m)).collect();
        let mut ready: BTreeSet<(Version, String)> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|((s, v), _)| (v.clone(), s.clone()))
            .collect();
        let mut out = Vec::new();
        while let Some((v, s)) = ready.pop_first() {
            let id = (s, v);
            if let Some(m) = by_id.get(&id) {
                out.push(*m);
            }
            for t in self.edges.get(&id).into_iter().flatten() {
                if let Some(d) = indegree.get_mut(t) {
                    *d -= 1;
                    if *d == 0 {
                        ready.insert((t.1.clone(), t.0.clone()));
                    }
                }
            }
        }
        (out.len() == self.nodes.len()).then_some(out)
    }

    /// What `m` must wait for: the previous version of its service and its
    /// dependencies.
    pub fn prerequisites(&self, m: &Migration) -> Vec<NodeId> {
        let me = id_of(m);
        self.edges
            .iter()
            .filter(|(_, targets)| targets.contains(&me))
            .map(|(from, _)| from.clone())
            .collect()
    }
}

/// `1.3 -> 2.0 -> 1.3` within one service, `api:1.3 -> billing:2 -> api:1.3` across.
pub fn render_cycle(cycle: &[NodeId]) -> String {
    let one_service = cycle.windows(2).all(|w| w[0].0 == w[1].0);
    cycle
        .iter()
        .map(|(s, v)| {
            if one_service {
                v.to_string()
            } else {
                format!("{s}:{v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::files::{Dep, Meta, Risk};

    fn m(service: &str, v: &str, deps: &[(&str, &str)]) -> Migration {
        Migration {
            service: service.into(),
            version: Version::parse(v).unwrap(),
            description: String::new(),
            path: Default::default(),
            sql: String::new(),
            checksum: String::new(),
            meta: Meta {
                depends_on: deps
                    .iter()
                    .map(|(s, v)| Dep {
                        service: (!s.is_empty()).then(|| s.to_string()),
                        version: Version::parse(v).unwrap(),
                    })
                    .collect(),
                environments: vec![],
                risk: Risk::Low,
                estimated_duration: None,
                transactional: None,
            },
            undo: None,
        }
    }

    fn catalog(items: Vec<Migration>) -> Catalog {
        let mut c = Catalog::default();
        for i in items {
            c.services.entry(i.service.clone()).or_default().push(i);
        }
        for ms in c.services.values_mut() {
            ms.sort_by(|a, b| a.version.cmp(&b.version));
        }
        c
    }

    #[test]
    fn order_respects_versions_and_dependencies() {
        let c = catalog(vec![
            m("api", "1", &[]),
            m("api", "2", &[("billing", "1")]),
            m("billing", "1", &[("api", "1")]),
            m("billing", "0.5", &[]),
        ]);
        let g = Graph::new(&c);
        let order: Vec<String> = g.order().unwrap().iter().map(|m| m.id()).collect();
        assert_eq!(order, ["billing:0.5", "api:1", "billing:1", "api:2"]);
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn cycles_are_printed_as_the_cycle() {
        let c = catalog(vec![m("api", "1.3", &[("", "2.0")]), m("api", "2.0", &[])]);
        let g = Graph::new(&c);
        let cycles = g.cycles();
        assert_eq!(cycles.len(), 1);
        assert_eq!(render_cycle(&cycles[0]), "1.3 -> 2.0 -> 1.3");
        assert!(g.order().is_none());

        let c = catalog(vec![
            m("api", "1", &[("billing", "2")]),
            m("billing", "2", &[("api", "1")]),
        ]);
        let cycles = Graph::new(&c).cycles();
        assert_eq!(render_cycle(&cycles[0]), "api:1 -> billing:2 -> api:1");
    }

    #[test]
    fn unknown_dependencies_are_listed() {
        let c = catalog(vec![m("api", "1", &[("billing", "9"), ("", "7")])]);
        let g = Graph::new(&c);
        let unknown: Vec<&str> = g.unknown.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(unknown, ["billing:9", "api:7"]);
    }
}
