//! The crate graph keeps its layers: `schemas` (the wire contract) depends
//! on nothing of ours; `pipeline` only on `schemas`; `results` only on
//! those two; a stage never on another stage (what two stages share goes
//! one layer down); only the CLI and the tests see every stage. Read from
//! `cargo metadata`, so a new dependency, dev-dependency or crate is
//! checked as soon as it is added.

use std::collections::BTreeMap;
use std::process::Command;

/// Our crates and, for each, its dependencies on our crates (any kind).
type Graph = BTreeMap<String, (String, Vec<String>)>;

fn workspace() -> Graph {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root)
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = std::path::Path::new(meta["workspace_root"].as_str().unwrap()).to_path_buf();
    let mut graph = Graph::new();
    for pkg in meta["packages"].as_array().unwrap() {
        let name = pkg["name"].as_str().unwrap().to_string();
        let manifest = std::path::Path::new(pkg["manifest_path"].as_str().unwrap());
        let dir = manifest.parent().unwrap().strip_prefix(&root).unwrap().display().to_string();
        let deps = pkg["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["path"].is_string())
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        graph.insert(name, (dir, deps));
    }
    graph
}

/// Every edge that breaks the layering, as `from -> to (rule)`.
fn violations(graph: &Graph) -> Vec<String> {
    let is_stage = |name: &str| graph.get(name).is_some_and(|(dir, _)| dir.starts_with("stages/"));
    let mut out = Vec::new();
    for (name, (dir, deps)) in graph {
        for dep in deps {
            let allowed = match name.as_str() {
                "pagestream-schemas" => false,
                "pagestream-pipeline" => dep == "pagestream-schemas",
                "pagestream-results" => matches!(dep.as_str(), "pagestream-schemas" | "pagestream-pipeline"),
                _ if dir.starts_with("stages/") => !is_stage(dep),
                // The CLI (which runs every stage in one process) and the tests.
                "pagestream" | "pagestream-e2e" => true,
                _ => !is_stage(dep),
            };
            if !allowed {
                out.push(format!("{name} -> {dep}"));
            }
        }
    }
    out
}

#[test]
fn stages_never_depend_on_each_other_and_lower_layers_on_nothing_above() {
    let graph = workspace();
    for known in ["pagestream-schemas", "pagestream-pipeline", "pagestream-results", "pagestream-ingress"] {
        assert!(graph.contains_key(known), "{known} missing from the workspace: {graph:?}");
    }
    let stages: Vec<&String> =
        graph.iter().filter(|(_, (dir, _))| dir.starts_with("stages/")).map(|(n, _)| n).collect();
    assert_eq!(stages.len(), 5, "{stages:?}");
    let bad = violations(&graph);
    assert!(bad.is_empty(), "dependencies that break the layering (see README, code map):\n{}", bad.join("\n"));
}

#[test]
fn the_checker_catches_each_kind_of_violation() {
    let mut graph = workspace();
    let mut add = |from: &str, to: &str| graph.get_mut(from).unwrap().1.push(to.into());
    add("pagestream-ingress", "pagestream-uploader");
    add("pagestream-schemas", "pagestream-pipeline");
    add("pagestream-pipeline", "pagestream-results");
    add("pagestream-results", "pagestream-splitter");
    let bad = violations(&graph);
    assert_eq!(
        bad,
        [
            "pagestream-ingress -> pagestream-uploader",
            "pagestream-pipeline -> pagestream-results",
            "pagestream-results -> pagestream-splitter",
            "pagestream-schemas -> pagestream-pipeline",
        ]
    );
}
