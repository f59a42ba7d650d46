//! Model fleets, with real stage processes: inferencer replicas serving
//! different models (ONNX Runtime and tract) on one NATS server.
//!
//! - every page of a document is inferred by the document's model, decided
//!   once (never by whichever replica pulled the page);
//! - each replica infers only its own model's pages (its metrics, each
//!   page JSON's `model`);
//! - a model no live replica serves is refused at upload (422) and on NATS
//!   (`doc.failed`); with `wait_for_model=true` the document waits and
//!   completes once a replica starts;
//! - killing the only replica of a model mid-document makes the remaining
//!   pages wait, then finish after a restart: none failed or duplicated;
//! - a replica with other weights under the same model name refuses to
//!   start, naming both hashes, unless it is a canary.
//!
//! `cargo build --bins` first (scripts/test does it).

use std::path::Path;
use std::time::{Duration, Instant};

use pagestream_e2e::api::{admin_metrics, metric_by_label, status, upload, upload_answer};
use pagestream_e2e::procs::{Cluster, Proc, Stages};
use pagestream_e2e::{corpus, dead_letters, publish, read_json, stream_state, wait, CDLA, CDLA_SHA, YOLO, YOLO_SHA};
use pagestream_pipeline::embedded::free_port;
use pagestream_pipeline::nats::Names;
use pagestream_schemas::{encode, DocumentSubmitted, Source, SubmitOptions, VERSION};
use serde_json::Value;

/// NATS, ingress, splitter and uploader processes; inferencers are the
/// test's to start.
struct Fleet {
    s: Stages,
    prefix: &'static str,
}

impl std::ops::Deref for Fleet {
    type Target = Stages;
    fn deref(&self) -> &Stages {
        &self.s
    }
}

impl std::ops::DerefMut for Fleet {
    fn deref_mut(&mut self) -> &mut Stages {
        &mut self.s
    }
}

/// An inferencer process serving `model`, its metrics on `admin`.
fn inferencer(cluster: &Cluster, idx: usize, model: &str, admin: u16, extra: &[(&str, String)]) -> Proc {
    let mut env = vec![("PAGESTREAM_INFERENCER_ADMIN_ADDR", format!("127.0.0.1:{admin}"))];
    env.extend(extra.iter().cloned());
    cluster.spawn_inferencer(idx, model, &env)
}

impl Fleet {
    async fn start(prefix: &'static str) -> Fleet {
        // A killed replica's pages come back after 5 s, not a minute.
        let extra = [("PAGESTREAM_NATS_ACK_WAIT_SECS", "5".to_string()), ("PAGESTREAM_NATS_MAX_DELIVER", "20".into())];
        let s = Stages::start(prefix, &["ingress", "splitter", "uploader"], &extra, Duration::from_secs(60)).await;
        Fleet { s, prefix }
    }

    /// Waits until `GET /v1/models` lists exactly `want` (name, replicas).
    async fn wait_models(&self, want: &[(&str, u64)]) -> Value {
        let listed = async || {
            let ans = self.client.get("/v1/models").await.unwrap();
            assert_eq!(ans.status, 200, "{}", ans.json);
            let got: Vec<(String, u64)> = ans.json["models"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (m["name"].as_str().unwrap().to_string(), m["replicas"].as_u64().unwrap()))
                .collect();
            if got.iter().map(|(n, r)| (n.as_str(), *r)).collect::<Vec<_>>() == want {
                return Ok(ans.json);
            }
            Err(format!("models {got:?}, want {want:?}"))
        };
        wait::until_with(Duration::from_secs(90), Duration::from_millis(200), listed, || {
            format!("logs: {}", self.cluster.log("inferencer", 0))
        })
        .await
    }

    async fn submit(&self, pdf: &str, fields: &[(&str, &str)]) -> (u16, Value) {
        upload_answer(&self.client, pdf, fields).await
    }

    async fn submit_ok(&self, pdf: &str, fields: &[(&str, &str)]) -> String {
        upload(&self.client, pdf, fields).await
    }

    async fn status(&self, id: &str) -> Value {
        status(&self.client, id).await
    }

    /// Every page JSON of a finished document: (model name, sha256).
    fn page_models(&self, id: &str, pages: u64) -> Vec<(String, String)> {
        (1..=pages)
            .map(|n| {
                let path = self.out.path().join(id).join(format!("pages/{n}.json"));
                let v: Value = read_json(&path);
                (v["model"]["name"].as_str().unwrap().to_string(), v["model"]["sha256"].as_str().unwrap().to_string())
            })
            .collect()
    }

    async fn blob_messages(&self) -> u64 {
        stream_state(&self.js().await, format!("OBJ_{}", Names::new(self.prefix).blob_bucket())).await.0
    }
}

/// `pagestream_model_pages_total{model=…}` of the process whose admin port is `port`.
async fn model_pages(port: u16) -> Vec<(String, u64)> {
    let text = admin_metrics(port).await;
    metric_by_label(&text, "pagestream_model_pages_total", "model").into_iter().map(|(m, n)| (m, n as u64)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fleet_infers_only_its_models_pages_and_conflicting_weights_refuse_to_start() {
    let mut f = Fleet::start("fleets-two").await;
    let (a_port, b_port) = (free_port().unwrap(), free_port().unwrap());
    let a = inferencer(&f.cluster, 0, CDLA, a_port, &[]);
    let b = inferencer(&f.cluster, 1, YOLO, b_port, &[]);
    f.cluster.procs.extend([a, b]);
    let models = f.wait_models(&[(CDLA, 1), (YOLO, 1)]).await;
    assert_eq!(models["default"], CDLA, "{models}");
    let yolo = models["models"].as_array().unwrap().iter().find(|m| m["name"] == YOLO).unwrap().clone();
    assert_eq!((yolo["backends"][0].as_str(), yolo["sha256"][0].as_str()), (Some("tract"), Some(YOLO_SHA)), "{yolo}");
    assert!(yolo["labels"].as_array().unwrap().iter().any(|l| l == "Section-header"), "{yolo}");

    // A model nobody serves: 422 naming the served ones, nothing stored.
    let (status, json) = f.submit("scan_cardinal-rotated.pdf", &[("model", "no_such_model")]).await;
    assert_eq!((status, json["error"]["code"].as_str()), (422, Some("model_unavailable")), "{json}");
    let why = json["error"]["message"].as_str().unwrap();
    assert!(why.contains("no_such_model") && why.contains(CDLA) && why.contains(YOLO), "{why}");
    assert_eq!(f.blob_messages().await, 0, "the refused upload left blobs behind");

    // The mixed-model scenario: documents without a model and with each
    // model, side by side, pulled by both replicas' consumers.
    let default_a = f.submit_ok("scan_cardinal-rotated.pdf", &[]).await;
    let yolo_doc = f.submit_ok("scan_cardinal-rotated.pdf", &[("model", YOLO)]).await;
    let default_b = f.submit_ok("fig_dbscan-jss.pdf", &[]).await;
    let cdla_doc = f.submit_ok("scan_cardinal-rotated.pdf", &[("model", CDLA)]).await;
    let mut expected = [(CDLA, 0u64), (YOLO, 0u64)];
    for (id, model, sha) in [
        (&default_a, CDLA, CDLA_SHA),
        (&yolo_doc, YOLO, YOLO_SHA),
        (&default_b, CDLA, CDLA_SHA),
        (&cdla_doc, CDLA, CDLA_SHA),
    ] {
        let st = pagestream_e2e::wait_terminal(&f.client, id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
        assert_eq!((st["model"].as_str(), st["model_sha256"].as_str()), (Some(model), Some(sha)), "{st}");
        let pages = st["page_count"].as_u64().unwrap();
        for (n, (name, weights)) in f.page_models(id, pages).into_iter().enumerate() {
            assert_eq!((name.as_str(), weights.as_str()), (model, sha), "document {id} page {}", n + 1);
        }
        let manifest: Value = read_json(&f.out.path().join(id).join("manifest.json"));
        assert_eq!(manifest["model"]["name"], model, "{manifest}");
        expected.iter_mut().find(|(m, _)| *m == model).unwrap().1 += pages;
    }
    // Each replica inferred exactly its own model's pages.
    assert_eq!(model_pages(a_port).await, vec![(CDLA.to_string(), expected[0].1)]);
    assert_eq!(model_pages(b_port).await, vec![(YOLO.to_string(), expected[1].1)]);
    println!("pages per replica: {expected:?}");

    // Other weights under the name layout_cdla: refused at start, naming
    // both hashes; accepted as a canary.
    let models_dir = tempfile::tempdir().unwrap();
    let fixture = pagestream_e2e::repo_root().join("tests/fixtures/models/boxes_fixture");
    let manifest = std::fs::read_to_string(fixture.join("model.toml")).unwrap();
    std::fs::create_dir_all(models_dir.path().join(CDLA)).unwrap();
    std::fs::write(
        models_dir.path().join(CDLA).join("model.toml"),
        manifest.replace("name = \"boxes_fixture\"", "name = \"layout_cdla\""),
    )
    .unwrap();
    let other = [
        ("PAGESTREAM_INFERENCER_MODELS_DIR", models_dir.path().display().to_string()),
        ("PAGESTREAM_INFERENCER_WEIGHTS_DIR", fixture.display().to_string()),
    ];
    let mut c = inferencer(&f.cluster, 2, CDLA, free_port().unwrap(), &other);
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = c.child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "a conflicting replica kept running: {}", f.cluster.log("inferencer", 2));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = f.cluster.log("inferencer", 2);
    assert!(!code.success(), "{log}");
    assert!(log.contains("differ from") && log.contains(CDLA_SHA) && log.contains("93b8c789"), "{log}");
    assert!(log.contains("inferencer.canary"), "the way out is named: {log}");
    let mut canary = other.to_vec();
    canary.push(("PAGESTREAM_INFERENCER_CANARY", "true".into()));
    let c = inferencer(&f.cluster, 3, CDLA, free_port().unwrap(), &canary);
    f.cluster.procs.push(c);
    let models = f.wait_models(&[(CDLA, 2), (YOLO, 1)]).await;
    let cdla = models["models"].as_array().unwrap().iter().find(|m| m["name"] == CDLA).unwrap().clone();
    assert_eq!(cdla["canary_replicas"], 1, "{cdla}");
    assert_eq!(cdla["sha256"], serde_json::json!([CDLA_SHA]), "the fleet's weights, not the canary's: {cdla}");

    let js = f.js().await;
    assert!(dead_letters(&js, &Names::new(f.prefix)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_wait_for_their_model_and_survive_the_loss_of_its_only_replica() {
    let mut f = Fleet::start("fleets-wait").await;
    let a = inferencer(&f.cluster, 0, CDLA, free_port().unwrap(), &[]);
    f.cluster.procs.push(a);
    f.wait_models(&[(CDLA, 1)]).await;

    // Refused without wait_for_model; over NATS the refusal is a failed document.
    let (status, json) = f.submit("scan_cardinal-rotated.pdf", &[("model", YOLO)]).await;
    assert_eq!((status, json["error"]["code"].as_str()), (422, Some("model_unavailable")), "{json}");
    let js = f.js().await;
    let names = Names::new(f.prefix);
    let direct = DocumentSubmitted {
        v: VERSION,
        doc_id: "direct-unserved".into(),
        title: None,
        source: Source {
            inline: Some(std::fs::read(corpus("scan_cardinal-rotated.pdf")).unwrap().into()),
            ..Default::default()
        },
        options: SubmitOptions { model: Some(YOLO.into()), ..Default::default() },
        submitted_at: None,
        start_page: None,
        owner: None,
    };
    publish(&js, names.docs_submitted(), encode(&direct)).await;
    let st = pagestream_e2e::wait_terminal(&f.client, "direct-unserved", Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        (st["state"].as_str(), st["error"]["code"].as_str()),
        (Some("failed"), Some("model_unavailable")),
        "{st}"
    );

    // With wait_for_model: queued, saying why, nothing rendered…
    let waiting = f.submit_ok("scan_cardinal-rotated.pdf", &[("model", YOLO), ("wait_for_model", "true")]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = f.status(&waiting).await;
    assert_eq!((st["state"].as_str(), st["waiting_for_model"].as_str()), (Some("queued"), Some(YOLO)), "{st}");
    assert_eq!(st["pages"]["rendered"], 0, "{st}");

    // …and a long document for the same model behind it.
    let long = f.submit_ok("fig_dbscan-jss.pdf", &[("model", YOLO), ("wait_for_model", "true")]).await;

    // A replica starts: the waiting document completes with its model.
    let b_port = free_port().unwrap();
    let b = inferencer(&f.cluster, 1, YOLO, b_port, &[]);
    f.cluster.procs.push(b);
    let st = pagestream_e2e::wait_terminal(&f.client, &waiting, Duration::from_secs(180)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    assert!(st.get("waiting_for_model").is_none(), "{st}");
    assert!(f.page_models(&waiting, 4).iter().all(|(m, sha)| m == YOLO && sha == YOLO_SHA));

    // Kill the only yolov8n replica in the middle of the long document.
    wait::until(Duration::from_secs(240), Duration::from_millis(100), async || {
        let st = f.status(&long).await;
        if st["pages"]["uploaded"].as_u64().unwrap_or(0) >= 3 {
            return Ok(());
        }
        Err(format!("the long document never started: {st}"))
    })
    .await;
    let last = f.cluster.procs.len() - 1; // the yolov8n replica, started last

    let _ = f.cluster.procs[last].child.kill();
    let _ = f.cluster.procs[last].child.wait();
    let killed_at = f.status(&long).await["pages"]["uploaded"].as_u64().unwrap();
    // Its registry entry expires; the document's remaining pages wait.
    f.wait_models(&[(CDLA, 1)]).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let st = f.status(&long).await;
    assert_eq!((st["state"].as_str(), st["waiting_for_model"].as_str()), (Some("running"), Some(YOLO)), "{st}");
    let stalled = st["pages"]["uploaded"].as_u64().unwrap();
    assert!(stalled < 28, "the document finished without its model: {st}");
    assert_eq!(st["pages"]["failed"], 0, "{st}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = f.status(&long).await;
    assert_eq!(later["pages"]["uploaded"].as_u64(), Some(stalled), "no page moves without a replica: {later}");
    assert_eq!(later["pages"]["failed"], 0, "waiting pages do not fail: {later}");
    println!("killed the only replica after {killed_at} pages; {stalled} uploaded while it was gone");

    // A new replica finishes it: every page, none failed, none twice.
    let b = inferencer(&f.cluster, 1, YOLO, b_port, &[]);
    f.cluster.procs[last] = b;
    let st = pagestream_e2e::wait_terminal(&f.client, &long, Duration::from_secs(300)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!((st["pages"]["uploaded"].as_u64(), st["pages"]["failed"].as_u64()), (Some(28), Some(0)), "{st}");
    assert!(f.page_models(&long, 28).iter().all(|(m, sha)| m == YOLO && sha == YOLO_SHA));
    let files = std::fs::read_dir(f.out.path().join(&long).join("pages")).unwrap().count();
    assert_eq!(files, 56, "one JSON and one PNG per page, nothing else");
    let letters = dead_letters(&js, &names).await;
    assert!(letters.iter().all(|d| d.doc_id.as_deref() == Some("direct-unserved")), "{letters:?}");
    assert!(Path::new(&f.out.path().join(&long).join("manifest.json")).exists());
}
