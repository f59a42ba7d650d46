//! Results as they happen: while a 113-page document runs, `GET …/results`
//! lists the pages finished so far (their files are served), the SSE
//! `uploaded` events carry each page's links and (`?detections=1`) its
//! detections, `pagestream results ID --follow` prints one JSON line per
//! page as it lands; once finished, the COCO export loads in pycocotools
//! with the same boxes as the page files.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagestream_e2e::api::accepted;
use pagestream_e2e::procs::bin_dir;
use pagestream_e2e::{corpus, read_json, repo_root, Harness};
use serde_json::Value;

/// `pages/<n>.json` as the uploader wrote it.
fn page_json(h: &Harness, id: &str, page: u64) -> Value {
    h.result(id, &format!("pages/{page}.json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_served_page_by_page_while_the_document_runs() {
    let h = Harness::start(|_| {}).await.unwrap();
    let id = accepted(&h.client.submit_file(&corpus("text_R-intro.pdf"), Some("live")).await.unwrap());

    // The CLI follows the results from the start, as a user piping JSONL.
    let follow = Command::new(bin_dir().join("pagestream"))
        .args(["results", &id, "--follow", "--url", h.client.base()])
        .env_remove("PAGESTREAM_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // …and another writes the files as they land.
    let dl_live = tempfile::tempdir().unwrap();
    let follow_dl = Command::new(bin_dir().join("pagestream"))
        .args(["results", &id, "--follow", "--download", dl_live.path().to_str().unwrap(), "--url", h.client.base()])
        .env_remove("PAGESTREAM_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // …and the live events, with detections.
    let uploaded_events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let events = {
        let (client, id, seen) = (h.client.clone(), id.clone(), uploaded_events.clone());
        tokio::spawn(async move {
            client
                .follow_events_with(&id, "detections=1", |ev| {
                    if ev.kind == "page" && ev.data["page_state"] == "uploaded" {
                        seen.lock().unwrap().push(ev.data.clone());
                    }
                })
                .await
        })
    };

    // While it runs: the pages finished so far, each with working links.
    let mut partial = None;
    for _ in 0..600 {
        let r = h.client.get(&format!("/v1/documents/{id}/results")).await.unwrap();
        assert_eq!(r.status, 200, "results while running: {}", r.json);
        if r.json["complete"] == true {
            break;
        }
        if r.json["pages_done"].as_u64().unwrap() >= 3 {
            partial = Some(r.json);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let partial = partial.expect("saw the results of a running document with at least 3 pages done");
    assert_eq!(partial["state"], "running", "{partial}");
    assert_eq!(partial["status"], Value::Null, "no final status yet");
    assert_eq!(partial["manifest_url"], Value::Null, "no manifest yet");
    assert_eq!(partial["page_count"], 113);
    let listed = partial["pages"].as_array().unwrap();
    assert_eq!(listed.len() as u64, partial["pages_done"].as_u64().unwrap());
    assert!(listed.len() < 113, "the listing is partial: {}", listed.len());
    let numbers: Vec<u64> = listed.iter().map(|p| p["page"].as_u64().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "pages in order: {numbers:?}");
    for p in listed {
        assert_eq!(p["status"], "ok", "{p}");
        let n = p["page"].as_u64().unwrap();
        let json = h.client.get(p["detections_url"].as_str().unwrap()).await.unwrap();
        assert_eq!((json.status.as_u16(), json.json["page"].as_u64()), (200, Some(n)), "page {n} JSON while running");
        let (status, png) = h.client.get_bytes(p["image_url"].as_str().unwrap()).await.unwrap();
        assert_eq!(status, 200);
        assert!(png.starts_with(b"\x89PNG"), "page {n} image while running");
    }
    let coco_so_far = h.client.get(&format!("/v1/documents/{id}/results?format=coco")).await.unwrap();
    assert_eq!(coco_so_far.status, 200);
    assert!(coco_so_far.json["images"].as_array().unwrap().len() >= listed.len());

    let status = h.wait_terminal(&id, Duration::from_secs(600)).await.unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    events.await.unwrap().unwrap();

    // Finished: the manifest, complete.
    let mut done = Value::Null;
    for _ in 0..50 {
        done = h.client.get(&format!("/v1/documents/{id}/results")).await.unwrap().json;
        if done["complete"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((done["complete"].as_bool(), done["status"].as_str()), (Some(true), Some("completed")), "{done}");
    assert_eq!(done["pages_done"], 113);
    assert!(done["manifest_url"].is_string());

    // SSE: every uploaded event once, with its links and the page's detections.
    let uploaded = uploaded_events.lock().unwrap().clone();
    let pages: BTreeSet<u64> = uploaded.iter().map(|e| e["page"].as_u64().unwrap()).collect();
    assert_eq!((uploaded.len(), pages.len()), (113, 113), "one uploaded event per page");
    for e in &uploaded {
        let n = e["page"].as_u64().unwrap();
        assert_eq!(e["results"]["detections_url"], format!("/v1/documents/{id}/results/pages/{n}.json"));
        assert_eq!(e["results"]["image_url"], format!("/v1/documents/{id}/results/pages/{n}.png"));
        assert_eq!(e["detections"], page_json(&h, &id, n)["detections"], "detections in the event of page {n}");
    }

    // The CLI printed one JSON line per page, with the page's detections.
    let out = tokio::task::spawn_blocking(move || follow.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "results --follow: {stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect();
    let printed: BTreeSet<u64> = lines.iter().map(|l| l["page"].as_u64().unwrap()).collect();
    assert_eq!((lines.len(), printed.len()), (113, 113), "one line per page; stderr: {stderr}");
    for l in &lines {
        let n = l["page"].as_u64().unwrap();
        assert_eq!(l["doc_id"], id.as_str());
        assert_eq!(l["detections"], page_json(&h, &id, n)["detections"], "CLI line of page {n}");
    }
    assert!(stderr.contains("completed; 113 pages"), "summary on stderr: {stderr}");

    let out = tokio::task::spawn_blocking(move || follow_dl.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "results --follow --download: {}", String::from_utf8_lossy(&out.stderr));
    let mut got: Vec<String> = pagestream_e2e::files_under(&dl_live.path().join(&id))
        .into_iter()
        .map(|p| p.strip_prefix(dl_live.path().join(&id)).unwrap().display().to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = (1..=113).flat_map(|p| [format!("pages/{p}.json"), format!("pages/{p}.png")]).collect();
    want.push("manifest.json".into());
    want.sort();
    assert_eq!(got, want, "files written by results --follow --download");

    // COCO: loadable by pycocotools, same boxes as the page files.
    let coco = h.client.get(&format!("/v1/documents/{id}/results?format=coco")).await.unwrap();
    assert_eq!(coco.status, 200);
    let tmp = tempfile::tempdir().unwrap();
    let coco_path = tmp.path().join("doc.coco.json");
    std::fs::write(&coco_path, serde_json::to_vec(&coco.json).unwrap()).unwrap();
    let mut want_boxes: BTreeMap<String, Value> = BTreeMap::new();
    let mut want_total = 0;
    for n in 1..=113u64 {
        let page = page_json(&h, &id, n);
        want_total += page["detections"].as_array().unwrap().len();
        want_boxes.insert(n.to_string(), page);
    }
    let pages_path = tmp.path().join("pages.json");
    std::fs::write(&pages_path, serde_json::to_vec(&want_boxes).unwrap()).unwrap();
    let py = repo_root().join(".deps/venv/bin/python");
    let check = Command::new(&py)
        .arg("-c")
        .arg(COCO_CHECK)
        .arg(&coco_path)
        .arg(&pages_path)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup --test installs pycocotools)", py.display()));
    let said = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "pycocotools check failed: {said}");
    assert!(said.contains(&format!("images=113 annotations={want_total} ")), "{said}");

    // The CLI writes the same file with --format coco --download.
    let dl = tempfile::tempdir().unwrap();
    let out = Command::new(bin_dir().join("pagestream"))
        .args(["results", &id, "--format", "coco", "--download", dl.path().to_str().unwrap(), "--url", h.client.base()])
        .env_remove("PAGESTREAM_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let written: Value = read_json(&dl.path().join(&id).join("coco.json"));
    assert_eq!(written, coco.json);

    // An unknown format is a clear error.
    let bad = h.client.get(&format!("/v1/documents/{id}/results?format=xml")).await.unwrap();
    assert_eq!((bad.status.as_u16(), bad.json["error"]["code"].as_str()), (400, Some("invalid_format")));
    h.stop().await.unwrap();
}

/// Loads the COCO file with pycocotools and compares every annotation with
/// the page files (argv: coco.json, {page: pages/<n>.json}).
const COCO_CHECK: &str = r#"
import json, sys
from pycocotools.coco import COCO
coco = COCO(sys.argv[1])
pages = json.load(open(sys.argv[2]))
cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
assert len(cats) == len(set(cats.values())), cats
for img_id in coco.getImgIds():
    img = coco.imgs[img_id]
    page = pages[str(img_id)]
    assert (img["width"], img["height"]) == (page["width"], page["height"]), (img, page["width"])
    assert img["file_name"] == "pages/%d.png" % img_id, img
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
    assert len(anns) == len(page["detections"]), (img_id, len(anns), len(page["detections"]))
    for a, d in zip(anns, page["detections"]):
        x0, y0, x1, y1 = d["bbox"]
        want = [x0, y0, x1 - x0, y1 - y0]
        assert all(abs(p - q) < 1e-3 for p, q in zip(a["bbox"], want)), (a["bbox"], want)
        assert cats[a["category_id"]] == d["label"], (a, d)
        assert abs(a["score"] - d["score"]) < 1e-6
        assert abs(a["area"] - want[2] * want[3]) <= 1e-5 * max(1.0, a["area"]), (a["area"], want)
print("images=%d annotations=%d categories=%d" % (len(coco.getImgIds()), len(coco.getAnnIds()), len(cats)), end=" ")
"#;
