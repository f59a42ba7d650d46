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
    assert!(bad.is_empty(), "dependencies that break the layering (ARCHITECTURE.md, Code map):\n{}", bad.join("\n"));
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

// ---------------------------------------------------------------------
// Inside `pipeline`: no file cycles.
//
// A module of `pipeline/src` (a file, or a folder with its submodules)
// must not use, directly or through a chain, a module that uses it: the
// crate reads bottom-up (errors, names and stores first; the consumer loop,
// the stage context and the binaries' `main` last). Read from the source
// text: every `crate::<module>` path (in code, in `use` lines and in string
// attributes such as `deserialize_with = "crate::util::list"`) and every
// `super::` path that leaves a submodule, outside comments.

/// `module -> (module it uses -> "file:line" of the first reference)`.
type ModuleGraph = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Punct(char),
    /// The text of a string literal (raw or not).
    Str(String),
}

/// `text` as Rust tokens with their line, comments dropped. Enough of the
/// lexer for paths: identifiers, punctuation, strings, char literals and
/// lifetimes told apart.
fn tokens(text: &str) -> Vec<(usize, Token)> {
    let c: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if i >= c.len() {
                    break;
                } else if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(c[i] == '\n');
                    i += 1;
                }
            }
        } else if ch == '"'
            || ((ch == 'r' || ch == 'b')
                && matches!((at(i + 1), at(i + 2)), ('"', _) | ('#', '"' | '#') | ('r', '"' | '#')))
        {
            // "…", b"…", r"…", r#"…"#, br#"…"#.
            let start_line = line;
            let mut j = i;
            while c[j] != '"' && c[j] != '#' {
                j += 1;
            }
            let raw = c[i..j].contains(&'r');
            let hashes = c[j..].iter().take_while(|&&h| h == '#').count();
            j += hashes + 1;
            let mut s = String::new();
            loop {
                if j >= c.len() {
                    break;
                }
                if !raw && c[j] == '\\' {
                    s.push(c[j]);
                    s.push(at(j + 1));
                    line += usize::from(at(j + 1) == '\n');
                    j += 2;
                    continue;
                }
                if c[j] == '"' && c[j + 1..].iter().take(hashes).filter(|&&h| h == '#').count() == hashes {
                    j += 1 + hashes;
                    break;
                }
                line += usize::from(c[j] == '\n');
                s.push(c[j]);
                j += 1;
            }
            out.push((start_line, Token::Str(s)));
            i = j;
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push((line, Token::Ident(c[start..i].iter().collect())));
        } else {
            out.push((line, Token::Punct(ch)));
            i += 1;
        }
    }
    out
}

/// The module paths one file refers to, absolute (`["nats", "Names"]`),
/// with their line. `module` is the file's own path (`["progress",
/// "lookup"]` for `progress/lookup.rs`); inline modules (`mod tests { … }`)
/// are followed, so their `use super::*` stays inside the file.
fn references(module: &[String], text: &str) -> Vec<(usize, Vec<String>)> {
    let toks = tokens(text);
    let ident = |k: usize| match toks.get(k) {
        Some((_, Token::Ident(s))) => Some(s.as_str()),
        _ => None,
    };
    let punct = |k: usize, p: char| matches!(toks.get(k), Some((_, Token::Punct(q))) if *q == p);
    let path_sep = |k: usize| punct(k, ':') && punct(k + 1, ':');
    // The first segment of each path after `k` (one, or each item of a `{…}` group).
    let heads = |k: usize| -> Vec<String> {
        if let Some(name) = ident(k) {
            return vec![name.to_string()];
        }
        if !punct(k, '{') {
            return Vec::new();
        }
        let (mut depth, mut expect, mut out, mut k) = (0, true, Vec::new(), k);
        loop {
            match toks.get(k) {
                None => return out,
                Some((_, Token::Punct('{'))) => depth += 1,
                Some((_, Token::Punct('}'))) => {
                    depth -= 1;
                    if depth == 0 {
                        return out;
                    }
                }
                Some((_, Token::Punct(','))) if depth == 1 => expect = true,
                Some((_, Token::Ident(name))) if depth == 1 && expect => {
                    out.push(name.clone());
                    expect = false;
                }
                _ => {}
            }
            k += 1;
        }
    };
    let mut inline: Vec<(String, usize)> = Vec::new(); // (name, brace depth inside it)
    let mut depth = 0;
    let mut out = Vec::new();
    let mut k = 0;
    while k < toks.len() {
        let (line, tok) = &toks[k];
        match tok {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth -= 1;
            }
            Token::Ident(m) if m == "mod" && ident(k + 1).is_some() && punct(k + 2, '{') => {
                inline.push((ident(k + 1).unwrap().to_string(), depth + 1));
            }
            Token::Str(s) => {
                // `#[serde(deserialize_with = "crate::config::list")]` and the like.
                for part in s.split("crate::").skip(1) {
                    let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        out.push((*line, vec![name]));
                    }
                }
            }
            Token::Ident(c) if c == "crate" && path_sep(k + 1) && !(k >= 2 && path_sep(k - 2)) => {
                for head in heads(k + 3) {
                    out.push((*line, vec![head]));
                }
            }
            Token::Ident(s) if s == "super" && path_sep(k + 1) && !(k >= 2 && path_sep(k - 2)) => {
                let mut here: Vec<String> =
                    module.iter().cloned().chain(inline.iter().map(|(n, _)| n.clone())).collect();
                let mut j = k;
                while ident(j) == Some("super") && path_sep(j + 1) {
                    here.pop();
                    j += 3;
                }
                for head in heads(j) {
                    let mut path = here.clone();
                    path.push(head);
                    out.push((*line, path));
                }
                k = j;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    out
}

/// The module graph of one crate's sources, `files` as `(path under src/,
/// text)`: a module is a file of `src/` or a folder (its `mod.rs` and
/// submodules together); the crate root (`lib.rs`) is not one.
fn module_graph(files: &[(String, String)]) -> ModuleGraph {
    let module_of = |path: &str| -> Vec<String> {
        let mut parts: Vec<String> = path.trim_end_matches(".rs").split('/').map(String::from).collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        parts
    };
    let modules: std::collections::BTreeSet<String> = files
        .iter()
        .map(|(path, _)| module_of(path))
        .filter(|m| m != &["lib"] && m != &["main"])
        .map(|m| m[0].clone())
        .collect();
    let mut graph: ModuleGraph = modules.iter().map(|m| (m.clone(), BTreeMap::new())).collect();
    for (path, text) in files {
        let module = module_of(path);
        let from = &module[0];
        if !modules.contains(from) {
            continue;
        }
        for (line, target) in references(&module, text) {
            let Some(to) = target.first() else { continue };
            if to != from && modules.contains(to) {
                graph.get_mut(from).unwrap().entry(to.clone()).or_insert_with(|| format!("{path}:{line}"));
            }
        }
    }
    graph
}

/// The cycles of `graph`: in each strongly connected component of more
/// than one module, the shortest cycle through each of its modules,
/// written `a -> b -> a  (a -> b at file:line, b -> a at file:line)`.
fn cycles(graph: &ModuleGraph) -> Vec<String> {
    // Tarjan's strongly connected components.
    struct Tarjan<'g> {
        graph: &'g ModuleGraph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        components: Vec<Vec<&'g str>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in self.graph[v].keys() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.stack.contains(&w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().position(|x| *x == v).unwrap();
                let component = self.stack.split_off(at);
                if component.len() > 1 {
                    self.components.push(component);
                }
            }
        }
    }
    let mut t =
        Tarjan { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), components: Vec::new() };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    let mut out = Vec::new();
    for mut component in t.components {
        component.sort();
        // The shortest cycle through each module of the component (breadth
        // first), each cycle once.
        let mut seen = std::collections::BTreeSet::new();
        for &start in &component {
            let mut before: BTreeMap<&str, &str> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut last = None;
            'search: while let Some(v) = queue.pop_front() {
                for w in graph[v].keys().map(String::as_str).filter(|w| component.contains(w)) {
                    if w == start {
                        last = Some(v);
                        break 'search;
                    }
                    if !before.contains_key(w) {
                        before.insert(w, v);
                        queue.push_back(w);
                    }
                }
            }
            let mut path = vec![start];
            let mut v = last.expect("every module of a strongly connected component is on a cycle");
            while v != start {
                path.push(v);
                v = before[v];
            }
            path[1..].reverse();
            // The same cycle found from another of its modules: once.
            let mut key = path.clone();
            let min = (0..key.len()).min_by_key(|&i| key[i]).unwrap();
            key.rotate_left(min);
            if !seen.insert(key) {
                continue;
            }
            path.push(start);
            let evidence: Vec<String> =
                path.windows(2).map(|e| format!("{} -> {} at {}", e[0], e[1], graph[e[0]][e[1]])).collect();
            out.push(format!("{}  ({})", path.join(" -> "), evidence.join(", ")));
        }
    }
    out
}

/// `(path under src/, text)` of every `.rs` file under `dir`.
fn sources(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_pipeline_crate_has_no_file_cycles() {
    let src = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../pipeline/src"));
    let graph = module_graph(&sources(src));
    for (module, uses) in [("consumer", "stage"), ("stage", "nats"), ("progress", "records")] {
        assert!(graph[module].contains_key(uses), "the module graph misses {module} -> {uses}: {graph:#?}");
    }
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "pipeline/src has file cycles (a module that uses, directly or through a chain, a module using it); \
         move what both need one layer down:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_cycle_checker_reads_paths_and_finds_cycles() {
    let file = |path: &str, text: &str| (path.to_string(), text.to_string());
    let graph = module_graph(&[
        file("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d; use crate::a::A;"),
        file("a.rs", "use crate::{b::B, c};\n// use crate::d::D;\n/* crate::d */ const S: &str = \"//\";"),
        file("b/mod.rs", "mod inner;\n#[cfg(test)]\nmod tests { use super::*; use super::inner::X; }"),
        file("b/inner.rs", "fn f() { let c = '\"'; let _ = super::super::c::C; }"),
        file("c.rs", "#[serde(deserialize_with = \"crate::a::list\")]\nstruct S<'a>(&'a str);"),
        file("d.rs", "use crate::b::{self, inner};\nfn f() -> crate::c::C { todo!() }"),
    ]);
    let edges = |m: &str| graph[m].iter().map(|(to, at)| format!("{to} at {at}")).collect::<Vec<_>>();
    assert_eq!(edges("a"), ["b at a.rs:1", "c at a.rs:1"]);
    assert_eq!(edges("b"), ["c at b/inner.rs:1"]);
    assert_eq!(edges("c"), ["a at c.rs:1"]);
    assert_eq!(edges("d"), ["b at d.rs:1", "c at d.rs:2"]);
    assert_eq!(
        cycles(&graph),
        [
            "a -> c -> a  (a -> c at a.rs:1, c -> a at c.rs:1)",
            "b -> c -> a -> b  (b -> c at b/inner.rs:1, c -> a at c.rs:1, a -> b at a.rs:1)",
        ]
    );
    let acyclic = module_graph(&[file("a.rs", "use crate::b::B;"), file("b.rs", "use super::c::C;"), file("c.rs", "")]);
    assert!(cycles(&acyclic).is_empty(), "{acyclic:?}");
}
