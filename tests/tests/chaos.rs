//! Chaos: real documents (≥ 150 pages) through two processes of every stage
//! binary, while a driver SIGKILLs a random stage process every few seconds
//! and restarts it, restarts nats-server once (file storage survives), and
//! freezes the S3 server for ~10 s. At the end every page of every document
//! has exactly one result set, every manifest is right, nothing is stuck and
//! the dead-letter stream is empty. What each page says survives too: every
//! word of a born-digital page's text layer is in its page JSON exactly
//! once, and each page of the scans (read by OCR) has its OCR text.
//!
//! Needs the stage binaries: `cargo build --bins` (scripts/test does it).

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::api::accepted;
use pagestream_e2e::procs::{signal, stage_env, wait_ready, with_vars, Cluster, STAGES};
use pagestream_e2e::{corpus, init_logging, repo_root, MotoServer};
use pagestream_pipeline::embedded::{free_port, NatsServer};
use pagestream_pipeline::nats::Names;
use serde_json::Value;

const PREFIX: &str = "chaos";
const BUCKET: &str = "chaos-results";

/// A tiny xorshift generator: reproducible chaos from a printed seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

async fn status(clients: &[ApiClient], id: &str) -> Option<Value> {
    for c in clients {
        if let Ok(a) = c.get(&format!("/v1/documents/{id}")).await {
            if a.status.is_success() {
                return Some(a.json);
            }
        }
    }
    None
}

/// An object of the test bucket, as JSON.
async fn s3_json(s3: &aws_sdk_s3::Client, key: &str) -> Value {
    let object = s3.get_object().bucket(BUCKET).key(key).send().await.unwrap_or_else(|e| panic!("{key}: {e}"));
    serde_json::from_slice(&object.body.collect().await.unwrap().to_vec()).unwrap()
}

fn terminal(st: &Value) -> bool {
    matches!(st["state"].as_str(), Some("completed" | "completed_with_errors" | "failed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_restarts_and_outages_lose_and_duplicate_nothing() {
    init_logging();
    let mut nats = NatsServer::start().unwrap();
    let moto = MotoServer::start().unwrap();
    let s3 = moto.bucket(BUCKET).await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let extra = [
        ("PAGESTREAM_NATS_ACK_WAIT_SECS", "6".into()),
        ("PAGESTREAM_NATS_MAX_DELIVER", "30".into()),
        ("PAGESTREAM_NATS_CONNECT_TIMEOUT_SECS", "60".into()),
        ("PAGESTREAM_UPLOADER_TARGET", "s3".into()),
        ("PAGESTREAM_UPLOADER_S3_BUCKET", BUCKET.into()),
        ("PAGESTREAM_UPLOADER_S3_ENDPOINT", moto.endpoint()),
        ("PAGESTREAM_UPLOADER_S3_PATH_STYLE", "true".into()),
        ("PAGESTREAM_UPLOADER_S3_ACCESS_KEY_ID", "test".into()),
        ("PAGESTREAM_UPLOADER_S3_SECRET_ACCESS_KEY", "test".into()),
        ("PAGESTREAM_LOG", "info,async_nats=error,aws=error".into()),
        // OCR loaded, off unless a document asks (the scans below do).
        ("PAGESTREAM_INFERENCER_OCR_MODEL", "ppocr_v4".into()),
        ("PAGESTREAM_INFERENCER_OCR", "never".into()),
    ];
    let mut cluster = Cluster::new(with_vars(stage_env(&nats.url(), PREFIX), &extra), logs.path());
    let ports = [free_port().unwrap(), free_port().unwrap()];
    for stage in STAGES {
        for (idx, &port) in ports.iter().enumerate() {
            let port = (stage == "ingress").then_some(port);
            let p = cluster.spawn(stage, idx, port);
            cluster.procs.push(p);
        }
    }
    let clients: Vec<ApiClient> = ports.iter().map(|p| ApiClient::new(format!("http://127.0.0.1:{p}"))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in &clients {
        wait_ready(c, deadline.saturating_duration_since(Instant::now()), &cluster).await;
    }

    // 113 + 28 + 28 + 4 + 1 = 174 pages.
    let files = [
        corpus("text_R-intro.pdf"),
        corpus("fig_dbscan-jss.pdf"),
        corpus("fig_dbscan-jss.pdf"),
        corpus("scan_cardinal-rotated.pdf"),
        repo_root().join("samples/c03-29.pdf"),
    ];
    let mut docs = Vec::new();
    for (i, f) in files.iter().enumerate() {
        // The two scans are read by OCR.
        let ocr = if i >= 3 { vec![("ocr", "auto".to_string())] } else { Vec::new() };
        docs.push(accepted(&clients[i % 2].submit_file_with(f, None, &ocr, None).await.unwrap()));
    }

    // Follow every document's event stream through the chaos (reconnecting
    // with Last-Event-ID when its ingress is killed or NATS restarts).
    let mut watchers = tokio::task::JoinSet::new();
    for (i, id) in docs.iter().enumerate() {
        let (client, id) = (clients[i % 2].clone(), id.clone());
        watchers.spawn(async move {
            let mut seen = Vec::new();
            let outcome = client.follow_events(&id, |ev| seen.push((ev.kind.clone(), ev.data.clone()))).await;
            (id, outcome.map(|_| seen))
        });
    }

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("chaos seed {seed}");
    let mut rng = Rng(seed);
    let (mut kills, mut round) = (0, 0);
    let mut moto_frozen_at: Option<Instant> = None;
    let started = Instant::now();
    let finish_by = started + Duration::from_secs(600);
    loop {
        let mut all_done = true;
        for id in &docs {
            if !status(&clients, id).await.as_ref().is_some_and(terminal) {
                all_done = false;
                break;
            }
        }
        if all_done {
            break;
        }
        assert!(Instant::now() < finish_by, "documents stuck after 10 minutes; logs in {}", logs.path().display());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        round += 1;
        if let Some(at) = moto_frozen_at {
            if at.elapsed() >= Duration::from_secs(10) {
                signal(moto.pid(), "-CONT");
                moto_frozen_at = None;
                println!("[{:>5.1}s] S3 server resumed", started.elapsed().as_secs_f32());
            }
        }
        match round {
            4 => {
                tokio::task::block_in_place(|| nats.restart()).unwrap();
                println!("[{:>5.1}s] nats-server restarted", started.elapsed().as_secs_f32());
            }
            7 => {
                signal(moto.pid(), "-STOP");
                moto_frozen_at = Some(Instant::now());
                println!("[{:>5.1}s] S3 server frozen", started.elapsed().as_secs_f32());
            }
            _ if kills < 16 => {
                let i = rng.below(cluster.procs.len());
                println!("[{:>5.1}s] SIGKILL {} #{}", started.elapsed().as_secs_f32(), cluster.procs[i].stage, i % 2);
                cluster.kill_and_restart(i);
                kills += 1;
            }
            _ => {}
        }
    }
    if moto_frozen_at.is_some() {
        signal(moto.pid(), "-CONT");
    }
    let elapsed = started.elapsed();

    // Every document completed, with exactly one result set per page.
    let mut pages_total = 0;
    for id in &docs {
        let st = status(&clients, id).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
        let n = st["page_count"].as_u64().unwrap();
        pages_total += n;
        for stage in ["rendered", "inferred", "uploaded"] {
            assert_eq!(st["pages"][stage], n, "{stage} count of {id}: {st}");
        }
        let listed = s3.list_objects_v2().bucket(BUCKET).prefix(format!("{id}/")).send().await.unwrap();
        let mut keys: Vec<String> = listed.contents().iter().filter_map(|o| o.key().map(str::to_string)).collect();
        keys.sort();
        let mut want: Vec<String> =
            (1..=n).flat_map(|p| [format!("{id}/pages/{p}.json"), format!("{id}/pages/{p}.png")]).collect();
        want.push(format!("{id}/manifest.json"));
        want.sort();
        assert_eq!(keys, want, "objects of {id}");
        let manifest: Value = s3_json(&s3, &format!("{id}/manifest.json")).await;
        assert_eq!(manifest["status"], "completed");
        assert_eq!(manifest["page_count"], n);
        let pages = manifest["pages"].as_array().unwrap();
        assert_eq!(pages.len() as u64, n);
        assert!(pages.iter().enumerate().all(|(i, p)| p["page"] == i as u64 + 1 && p["status"] == "ok"));
    }
    assert!(pages_total >= 150, "{pages_total} pages");

    // What each page says: the text layer's words exactly once (none lost,
    // none doubled by a redelivery), the scans' OCR text on every page.
    let layers = tokio::task::block_in_place(|| pagestream_e2e::text_layer_word_counts(&files, 150.0));
    for ((id, file), layer) in docs.iter().zip(&files).zip(layers) {
        let n = layer.len() as u64;
        for p in 1..=n {
            let page: Value = s3_json(&s3, &format!("{id}/pages/{p}.json")).await;
            let texts: Vec<(&str, &str)> = page["detections"]
                .as_array()
                .unwrap()
                .iter()
                .chain(page["unassigned_text"].as_array().into_iter().flatten())
                .map(|d| (d["text"].as_str().unwrap(), d["text_source"].as_str().unwrap()))
                .collect();
            let words: usize = texts.iter().map(|(t, _)| t.split_whitespace().count()).sum();
            let expected = layer[p as usize - 1];
            if expected > 0 {
                assert_eq!(words, expected, "{} page {p}: words in the page JSON vs its text layer", file.display());
            } else {
                assert!(texts.iter().any(|(t, s)| *s == "ocr" && !t.is_empty()), "{} page {p}: {page}", file.display());
            }
        }
    }

    // Progress as the live streams saw it: never backwards, never above the
    // page count, exactly one terminal state, and it came last.
    while let Some(res) = watchers.join_next().await {
        let (id, events) = res.unwrap();
        let events = events.unwrap_or_else(|e| panic!("event stream of {id}: {e:#}"));
        pagestream_e2e::assert_live_progress(&id, &events);
    }

    // Nothing was dead-lettered.
    let js = pagestream_pipeline::nats::connect(&cfg_nats(&nats), "chaos-check").await.unwrap();
    let names = Names::new(PREFIX);
    let dlq_stream = js.get_stream(names.dlq_stream()).await.unwrap();
    let dlq = dlq_stream.get_info().await.unwrap();
    if dlq.state.messages > 0 {
        for seq in dlq.state.first_sequence..=dlq.state.last_sequence {
            if let Ok(raw) = dlq_stream.get_raw_message(seq).await {
                let dl: pagestream_schemas::DeadLetter = pagestream_schemas::decode(&raw.payload).unwrap();
                eprintln!(
                    "dead letter: stage {} subject {} doc {:?} attempts {} error {:?}",
                    dl.stage, dl.subject, dl.doc_id, dl.attempts, dl.error
                );
            }
        }
        for stage in STAGES {
            for idx in 0..2 {
                let log = cluster.log(stage, idx);
                let tail: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
                eprintln!(
                    "--- {stage}-{idx}: {} warnings/errors; last ones:\n{}",
                    tail.len(),
                    tail[tail.len().saturating_sub(8)..].join("\n")
                );
            }
        }
    }
    assert_eq!(dlq.state.messages, 0, "dead letters after chaos (printed above)");

    println!(
        "chaos: {} documents, {pages_total} pages in {:.1} s; kills {kills}, nats restarts 1, S3 outage 10 s; \
         redeliveries {} (of which already done {}), duplicates suppressed {}",
        docs.len(),
        elapsed.as_secs_f32(),
        cluster.count_in_logs("handling a redelivered message"),
        cluster.count_in_logs("redelivery acknowledged"),
        cluster.count_in_logs("duplicate publish suppressed"),
    );
}

fn cfg_nats(nats: &NatsServer) -> pagestream_pipeline::config::NatsConfig {
    pagestream_pipeline::config::NatsConfig { url: nats.url(), prefix: PREFIX.into(), ..Default::default() }
}
