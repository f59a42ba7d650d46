//! The API client commands: submit, status, list, results, cancel, and the
//! live progress display shared with `pagestream demo`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use pagestream::client::{is_terminal, Answer, ApiClient};
use pagestream_pipeline::config::EXIT_BAD_CONFIG;
use serde_json::Value;

const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Parsed options common to every client command, plus the rest.
struct Args {
    client: ApiClient,
    json: bool,
    flags: BTreeMap<String, String>,
    switches: Vec<String>,
    positional: Vec<String>,
}

fn parse(args: &[String], with_value: &[&str], switches: &[&str]) -> Result<Args, String> {
    let mut url = std::env::var("PAGESTREAM_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let mut token = std::env::var("PAGESTREAM_TOKEN").ok();
    let (mut json, mut flags, mut on, mut positional) = (false, BTreeMap::new(), Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--url" => url = value("--url")?,
            "--token" => token = Some(value("--token")?),
            "--json" => json = true,
            f if with_value.contains(&f) => {
                let v = value(f)?;
                flags.insert(f.trim_start_matches('-').to_string(), v);
            }
            f if switches.contains(&f) => on.push(f.trim_start_matches('-').to_string()),
            f if f.starts_with('-') => return Err(format!("unknown option {f:?}")),
            p => positional.push(p.to_string()),
        }
    }
    Ok(Args { client: ApiClient::new(url).with_token(token), json, flags, switches: on, positional })
}

/// Runs one client command; returns the exit code.
pub async fn main(cmd: &str, args: &[String], usage: &str) -> Result<i32> {
    let parsed = match cmd {
        "submit" => parse(
            args,
            &["--title", "--dpi", "--model", "--priority", "--idempotency-key"],
            &["--watch", "--wait-for-model"],
        ),
        "list" => parse(args, &["--status", "--limit"], &[]),
        "results" => parse(args, &["--download"], &[]),
        _ => parse(args, &[], &[]),
    };
    let a = match parsed {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n\n{usage}");
            return Ok(EXIT_BAD_CONFIG);
        }
    };
    let one_id = || -> Result<&str, i32> {
        match a.positional.as_slice() {
            [id] => Ok(id),
            _ => {
                eprintln!("{cmd} needs exactly one document id\n\n{usage}");
                Err(EXIT_BAD_CONFIG)
            }
        }
    };
    let outcome = match cmd {
        "submit" => submit(&a).await,
        "list" => list(&a).await,
        "models" => show(&a, "/v1/models", print_models).await,
        "status" => match one_id() {
            Ok(id) => show(&a, &format!("/v1/documents/{id}"), print_status).await,
            Err(c) => return Ok(c),
        },
        "cancel" => match one_id() {
            Ok(id) => cancel(&a, id).await,
            Err(c) => return Ok(c),
        },
        _ => match one_id() {
            Ok(id) => results(&a, id).await,
            Err(c) => return Ok(c),
        },
    };
    outcome.with_context(|| format!("talking to {}", a.client.base()))
}

/// The API's error, as one line.
fn api_error(ans: &Answer) -> String {
    match ans.json["error"]["message"].as_str() {
        Some(m) => format!("HTTP {} {}: {m}", ans.status.as_u16(), ans.json["error"]["code"].as_str().unwrap_or("")),
        None => format!("HTTP {}: {}", ans.status.as_u16(), ans.json),
    }
}

/// Prints the API's error when `ans` is not a success; true then.
fn report_error(ans: &Answer) -> bool {
    if ans.status.is_success() {
        return false;
    }
    eprintln!("error: {}", api_error(ans));
    true
}

async fn show(a: &Args, path: &str, print: fn(&Value)) -> Result<i32> {
    let ans = a.client.get(path).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ans.json)?);
    } else {
        print(&ans.json);
    }
    Ok(0)
}

/// One line per live model: name (default marked), replicas, backends,
/// devices, weights.
fn print_models(v: &Value) {
    let default = v["default"].as_str().unwrap_or("");
    let models = v["models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        println!("no model is served right now (no live inferencer); default model: {default}");
        return;
    }
    println!("{:<24} {:>8}  {:<10} {:<8} weights", "MODEL", "REPLICAS", "BACKENDS", "DEVICES");
    let join = |x: &Value| {
        x.as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")).unwrap_or_default()
    };
    for m in &models {
        let name = m["name"].as_str().unwrap_or("?");
        let mark = if name == default { " (default)" } else { "" };
        let canary = m["canary_replicas"].as_u64().unwrap_or(0);
        let replicas =
            if canary > 0 { format!("{} ({canary} canary)", m["replicas"]) } else { m["replicas"].to_string() };
        let weights: Vec<String> = m["sha256"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(|s| s.chars().take(12).collect()).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:>8}  {:<10} {:<8} {}",
            format!("{name}{mark}"),
            replicas,
            join(&m["backends"]),
            join(&m["devices"]),
            weights.join(",")
        );
    }
    if !models.iter().any(|m| m["name"] == default) {
        println!("default model {default} is not served right now");
    }
}

fn print_status(st: &Value) {
    let p = &st["pages"];
    println!("{}  {}", clean(st["id"].as_str().unwrap_or("?")), clean(st["title"].as_str().unwrap_or("")));
    println!("  state:    {}", st["state"].as_str().unwrap_or("?"));
    if let Some(m) = st["waiting_for_model"].as_str() {
        println!("  waiting:  for an inferencer serving model {m}");
    }
    println!(
        "  pages:    {} total · rendered {} · inferred {} · uploaded {} · failed {}",
        st["page_count"], p["rendered"], p["inferred"], p["uploaded"], p["failed"]
    );
    for f in st["failed_pages"].as_array().into_iter().flatten() {
        println!(
            "  failed page {}: {} ({})",
            f["page"],
            clean(f["error"]["message"].as_str().unwrap_or("")),
            clean(f["error"]["code"].as_str().unwrap_or(""))
        );
    }
    if let Some(e) = st["error"]["message"].as_str() {
        println!("  error:    {}", clean(e));
    }
    for (k, label) in [("queued_at", "queued"), ("started_at", "started"), ("finished_at", "finished")] {
        if let Some(t) = st[k].as_str() {
            println!("  {label:<9} {t}");
        }
    }
    if let Some(stages) = st["timings"]["per_page_ms"].as_object() {
        let parts: Vec<String> =
            stages.iter().map(|(stage, t)| format!("{stage} {:.0} ms", t["mean_ms"].as_f64().unwrap_or(0.0))).collect();
        if !parts.is_empty() {
            println!("  per page: {}", parts.join(" · "));
        }
    }
    if let Some(m) = st["manifest"].as_str() {
        println!("  manifest: {m}");
    }
}

async fn list(a: &Args) -> Result<i32> {
    let mut query = Vec::new();
    for key in ["status", "limit"] {
        if let Some(v) = a.flags.get(key) {
            query.push(format!("{key}={}", pagestream::client::encode_query(v)));
        }
    }
    let ans = a.client.get(&format!("/v1/documents?{}", query.join("&"))).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ans.json)?);
        return Ok(0);
    }
    println!("{:<32}  {:<21}  {:>5}  {:>5}  title", "id", "state", "pages", "done");
    for d in ans.json["documents"].as_array().into_iter().flatten() {
        let done = d["pages"]["uploaded"].as_u64().unwrap_or(0) + d["pages"]["failed"].as_u64().unwrap_or(0);
        println!(
            "{:<32}  {:<21}  {:>5}  {:>5}  {}",
            clean(d["id"].as_str().unwrap_or("?")),
            clean(d["state"].as_str().unwrap_or("?")),
            d["page_count"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            done,
            clean(d["title"].as_str().unwrap_or(""))
        );
    }
    if let Some(c) = ans.json["next_cursor"].as_str() {
        println!("(more: the API's ?cursor={c})");
    }
    Ok(0)
}

async fn cancel(a: &Args, id: &str) -> Result<i32> {
    let ans = a.client.delete(&format!("/v1/documents/{id}")).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    let p = &ans.json["pages"];
    println!("{id}: cancelled ({} pages uploaded before the cancellation are kept)", p["uploaded"]);
    Ok(0)
}

async fn results(a: &Args, id: &str) -> Result<i32> {
    let ans = a.client.get(&format!("/v1/documents/{id}/results")).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    let m = &ans.json;
    let Some(dir) = a.flags.get("download") else {
        if a.json {
            println!("{}", serde_json::to_string_pretty(m)?);
        } else {
            println!("{id}: {} · {} pages", m["status"].as_str().unwrap_or("?"), m["page_count"]);
            for p in m["pages"].as_array().into_iter().flatten() {
                let detail = p["detections_url"].as_str().or(p["error"]["message"].as_str()).unwrap_or("");
                println!(
                    "  page {:>4}  {:<9} {}",
                    p["page"],
                    clean(p["status"].as_str().unwrap_or("?")),
                    clean(detail)
                );
            }
        }
        return Ok(0);
    };
    let dir = PathBuf::from(dir).join(id);
    tokio::fs::create_dir_all(dir.join("pages")).await.with_context(|| format!("creating {}", dir.display()))?;
    let mut files = 0;
    for p in m["pages"].as_array().into_iter().flatten() {
        for (rel, url) in [("image", "image_url"), ("detections", "detections_url")] {
            if let (Some(rel), Some(url)) = (p[rel].as_str(), p[url].as_str()) {
                download(&a.client, url, &dir.join(inside(rel)?)).await?;
                files += 1;
            }
        }
    }
    // The manifest as written, with relative links that match the download.
    download(&a.client, &format!("/v1/documents/{id}/results/manifest.json"), &dir.join("manifest.json")).await?;
    println!("{id}: {} files and manifest.json written to {}", files, dir.display());
    Ok(0)
}

/// Text from the server made safe for a terminal: control characters
/// (escape sequences among them) become `\u{fffd}`.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
}

/// A relative path from a manifest, checked to stay inside the download
/// directory (no absolute path, no `..`, no prefix).
fn inside(rel: &str) -> Result<PathBuf> {
    let path = Path::new(rel);
    let plain = path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    anyhow::ensure!(plain && !rel.is_empty(), "the manifest names a file outside the download directory: {rel:?}");
    Ok(path.to_path_buf())
}

/// Downloads `url` (an API path, or an absolute presigned URL) to `to`.
async fn download(client: &ApiClient, url: &str, to: &Path) -> Result<()> {
    let (status, bytes) = if url.starts_with('/') {
        client.get_bytes(url).await?
    } else {
        // A presigned S3 URL: no API token, its own host.
        let (base, path) = split_url(url).with_context(|| format!("unsupported result URL {url}"))?;
        ApiClient::new(base).get_bytes(&path).await?
    };
    anyhow::ensure!(status.is_success(), "downloading {url}: HTTP {status}");
    let tmp = to.with_extension("part");
    tokio::fs::write(&tmp, &bytes).await.with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, to).await.with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

/// `http://host:port/path?q` → (`http://host:port`, `/path?q`).
fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let slash = rest.find('/').unwrap_or(rest.len());
    Some((format!("http://{}", &rest[..slash]), rest[slash..].to_string()))
}

async fn submit(a: &Args) -> Result<i32> {
    if a.positional.is_empty() {
        eprintln!("submit needs at least one PDF file");
        return Ok(EXIT_BAD_CONFIG);
    }
    let mut options = Vec::new();
    for key in ["dpi", "model", "priority"] {
        if let Some(v) = a.flags.get(key) {
            options.push((key, v.clone()));
        }
    }
    if a.switches.iter().any(|s| s == "wait-for-model") {
        options.push(("wait_for_model", "true".into()));
    }
    let mut docs = Vec::new();
    let mut rejected = 0;
    for f in &a.positional {
        let path = Path::new(f);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| f.clone());
        if !path.is_file() {
            eprintln!("✗ {f}: not a file");
            rejected += 1;
            continue;
        }
        let title = a.flags.get("title").map(String::as_str);
        let key = a.flags.get("idempotency-key").map(String::as_str);
        let ans = a.client.submit_file_with(path, title, &options, key).await?;
        if ans.status.as_u16() == 202 {
            let id = ans.json["id"].as_str().unwrap_or_default().to_string();
            if a.json {
                println!("{}", ans.json);
            } else {
                println!("{id}  {name}");
            }
            docs.push((id, name));
        } else {
            eprintln!("✗ {name}: {}", api_error(&ans));
            rejected += 1;
        }
    }
    if !a.switches.iter().any(|s| s == "watch") || docs.is_empty() {
        return Ok(i32::from(rejected > 0));
    }
    let statuses = watch(&a.client, &docs).await;
    let mut bad = rejected;
    for (id, name) in &docs {
        let st = &statuses[id];
        let state = st["state"].as_str().unwrap_or("unknown");
        bad += usize::from(!matches!(state, "completed" | "completed_with_errors"));
        let mut line = format!("{name}: {state}, {} pages", st["page_count"].as_u64().unwrap_or(0));
        if let Some(err) = st["error"]["message"].as_str() {
            line += &format!(" — {err}");
        }
        eprintln!("{line}");
    }
    Ok(i32::from(bad > 0))
}

/// Follows every document's event stream until each is terminal, drawing
/// one progress bar per document (redrawn in place on a terminal, one line
/// per state change otherwise). Returns each document's final status.
pub async fn watch(client: &ApiClient, docs: &[(String, String)]) -> BTreeMap<String, Value> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Value)>();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (id, _)) in docs.iter().enumerate() {
        let (client, id, tx) = (client.clone(), id.clone(), tx.clone());
        tasks.spawn(async move {
            let outcome = client
                .follow_events(&id, |ev| {
                    let _ = tx.send((i, ev.data.clone()));
                })
                .await;
            if let Err(e) = outcome {
                let _ = tx.send((i, serde_json::json!({"state": "unknown", "error": {"message": format!("{e:#}")}})));
            }
        });
    }
    drop(tx);
    let tty = std::io::stderr().is_terminal();
    let mut latest: Vec<Option<Value>> = vec![None; docs.len()];
    let mut drawn = 0;
    while let Some((i, data)) = rx.recv().await {
        let state_changed = latest[i].as_ref().map(|v| &v["state"]) != Some(&data["state"]);
        latest[i] = Some(data);
        let mut err = std::io::stderr().lock();
        if tty {
            if drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            for (j, (_, name)) in docs.iter().enumerate() {
                let _ = writeln!(err, "\x1b[2K{}", progress_line(name, latest[j].as_ref()));
            }
            drawn = docs.len();
        } else if state_changed {
            let _ = writeln!(err, "{}", progress_line(&docs[i].1, latest[i].as_ref()));
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut out = BTreeMap::new();
    for (i, (id, _)) in docs.iter().enumerate() {
        let status = match client.get(&format!("/v1/documents/{id}")).await {
            Ok(ans) if ans.status.is_success() => ans.json,
            _ => latest[i].clone().unwrap_or(Value::Null),
        };
        out.insert(id.clone(), status);
    }
    out
}

/// `name  [██████░░░░░░]  17/28  running · failed 1`
pub fn progress_line(name: &str, st: Option<&Value>) -> String {
    let Some(st) = st else {
        return format!("{name}: submitted");
    };
    let p = &st["pages"];
    let done = p["uploaded"].as_u64().unwrap_or(0) + p["failed"].as_u64().unwrap_or(0);
    let total = st["page_count"].as_u64();
    const WIDTH: u64 = 24;
    let filled = match total {
        Some(n) if n > 0 => (done * WIDTH / n).min(WIDTH),
        _ => 0,
    };
    let bar: String = (0..WIDTH).map(|i| if i < filled { '█' } else { '░' }).collect();
    let total = total.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
    let state = st["state"].as_str().unwrap_or("?");
    let mut line = format!("{name:<28} {bar} {done:>4}/{total:<4} {state}");
    if !is_terminal(state) {
        line += &format!(" · rendered {} · inferred {}", p["rendered"], p["inferred"]);
    }
    if p["failed"].as_u64().unwrap_or(0) > 0 {
        line += &format!(" · failed {}", p["failed"]);
    }
    if let Some(e) = st["error"]["message"].as_str() {
        line += &format!(" — {e}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_and_urls() {
        let st = serde_json::json!({"state": "running", "page_count": 4, "pages": {"rendered": 4, "inferred": 3, "uploaded": 2, "failed": 0}});
        let line = progress_line("a.pdf", Some(&st));
        assert!(line.contains("2/4"), "{line}");
        assert_eq!(line.matches('█').count(), 12, "{line}");
        assert_eq!(
            split_url("http://127.0.0.1:9000/b/k.png?X-Amz=1"),
            Some(("http://127.0.0.1:9000".into(), "/b/k.png?X-Amz=1".into()))
        );
    }
}

#[cfg(test)]
mod safety_tests {
    use super::*;

    #[test]
    fn manifest_paths_stay_inside_and_text_is_cleaned() {
        assert_eq!(inside("pages/1.png").unwrap(), PathBuf::from("pages/1.png"));
        for bad in ["/etc/passwd", "../x", "pages/../../x", "", "./../x"] {
            assert!(inside(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(clean("a\u{1b}[31mb\n"), "a\u{fffd}[31mb\u{fffd}");
    }
}
