//! The schema is a public contract for other languages: a real Python client
//! (msgpack + jsonschema, installed by `scripts/setup --test`) decodes our
//! golden vectors and validates them against `messages.schema.json`, and we
//! decode what it encodes.

use std::path::{Path, PathBuf};
use std::process::Command;

use pagestream_schemas::{decode, DocumentSubmitted};

fn python() -> PathBuf {
    let deps = std::env::var_os("PAGESTREAM_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps"));
    let py = deps.join("venv/bin/python");
    assert!(py.exists(), "{} is missing: run scripts/setup --test", py.display());
    py
}

fn run(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python()).arg(dir.join("python_client.py")).args(args).output().unwrap();
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn python_decodes_and_validates_golden_vectors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden = dir.join("golden");
    let out = run(&["check", golden.to_str().unwrap(), dir.join("messages.schema.json").to_str().unwrap()]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let files = std::fs::read_dir(&golden).unwrap().count();
    assert_eq!(lines.len(), files, "{out}");
    assert!(lines.iter().all(|l| l["v"] == 1), "{out}");
    assert!(lines.iter().any(|l| l["kind"] == "DocumentSubmitted" && l["doc_id"] == "01JDOC0000000000000000000A"));
}

#[test]
fn rust_decodes_what_python_encodes() {
    let hex = run(&["encode"]);
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let msg: DocumentSubmitted = decode(&bytes).unwrap();
    assert_eq!(msg.doc_id, "py-client-1");
    assert_eq!(msg.title.as_deref(), Some("From Python"));
    assert_eq!(msg.source.inline.as_deref().map(|b| b.as_ref()), Some(&b"%PDF-1.4 tiny"[..]));
    assert_eq!(msg.options.dpi, Some(100.0));
}
