//! Scale-out: the same documents through one splitter and one inferencer,
//! then through two of each (real processes on one NATS server). Both
//! replicas of each stage do work (their own `pagestream_pages_total`), and
//! every page's detections are the single-replica run's.
//!
//! `cargo build --bins` first (scripts/test does it).

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::api::{accepted, admin_metrics, metric};
use pagestream_e2e::procs::{base_env, Cluster};
use pagestream_e2e::{corpus, init_logging};
use pagestream_pipeline::embedded::{free_port, NatsServer};
use serde_json::Value;

/// `pagestream_pages_total{stage=…}` of the process whose admin port is `port`.
async fn pages_total(port: u16, stage: &str) -> u64 {
    let text = admin_metrics(port).await;
    metric(&text, &format!("pagestream_pages_total{{stage=\"{stage}\"}}")).map_or(0, |v| v as u64)
}

/// Runs the documents through `replicas` splitters and inferencers; returns
/// each document's page detections, the seconds it took, and the pages each
/// replica handled (splitters, inferencers).
async fn run(replicas: usize, prefix: &str) -> (Vec<Vec<Value>>, f32, Vec<u64>, Vec<u64>) {
    let nats = NatsServer::start().unwrap();
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::new(base_env(&nats.url(), prefix, out.path()), logs.path());
    let port = free_port().unwrap();
    let ingress = cluster.spawn("ingress", 0, Some(port));
    let uploader = cluster.spawn("uploader", 0, None);
    cluster.procs.extend([ingress, uploader]);
    let (mut splitters, mut inferencers) = (Vec::new(), Vec::new());
    for idx in 0..replicas {
        let (s, i) = (free_port().unwrap(), free_port().unwrap());
        let sp =
            cluster.spawn_with("splitter", idx, None, &[("PAGESTREAM_SPLITTER_ADMIN_ADDR", format!("127.0.0.1:{s}"))]);
        let inf = cluster.spawn_with(
            "inferencer",
            idx,
            None,
            &[("PAGESTREAM_INFERENCER_ADMIN_ADDR", format!("127.0.0.1:{i}"))],
        );
        cluster.procs.extend([sp, inf]);
        splitters.push(s);
        inferencers.push(i);
    }
    let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    for p in inferencers.iter().chain(&splitters) {
        let admin = ApiClient::new(format!("http://127.0.0.1:{p}"));
        while !admin.get("/readyz").await.map(|a| a.status.is_success()).unwrap_or(false)
            || !client.get("/readyz").await.map(|a| a.status.is_success()).unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "stages not ready: {}", cluster.log_tails());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let started = Instant::now();
    // 28 + 28 + 4 pages, in turns of 8 pages: work for two splitters.
    let files = [corpus("fig_dbscan-jss.pdf"), corpus("fig_dbscan-jss.pdf"), corpus("scan_cardinal-rotated.pdf")];
    let mut ids = Vec::new();
    for f in &files {
        ids.push(accepted(&client.submit_file(f, None).await.unwrap()));
    }
    let mut results = Vec::new();
    for id in &ids {
        let st = pagestream_e2e::wait_terminal(&client, id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
        let n = st["page_count"].as_u64().unwrap();
        assert_eq!(st["pages"]["uploaded"], n, "{st}");
        let pages = (1..=n)
            .map(|p| {
                let path = out.path().join(id).join(format!("pages/{p}.json"));
                serde_json::from_slice::<Value>(&std::fs::read(path).unwrap()).unwrap()["detections"].clone()
            })
            .collect();
        results.push(pages);
    }
    let took = started.elapsed().as_secs_f32();
    let (mut s, mut i) = (Vec::new(), Vec::new());
    for p in &splitters {
        s.push(pages_total(*p, "splitter").await);
    }
    for p in &inferencers {
        i.push(pages_total(*p, "inferencer").await);
    }
    (results, took, s, i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_per_stage_share_the_work_and_give_the_same_results() {
    init_logging();
    let (one, one_s, one_split, one_infer) = run(1, "scale1").await;
    let (two, two_s, two_split, two_infer) = run(2, "scale2").await;
    let pages: u64 = one.iter().map(|d| d.len() as u64).sum();
    println!(
        "scale-out: {pages} pages; 1 replica per stage {one_s:.1} s ({:.2} pages/s), 2 replicas {two_s:.1} s \
         ({:.2} pages/s); pages per splitter {two_split:?}, per inferencer {two_infer:?}",
        pages as f32 / one_s,
        pages as f32 / two_s,
    );
    assert_eq!((one_split.iter().sum::<u64>(), one_infer.iter().sum::<u64>()), (pages, pages));
    assert_eq!(two_infer.iter().sum::<u64>(), pages, "every page inferred once: {two_infer:?}");
    assert_eq!(two_split.iter().sum::<u64>(), pages, "every page rendered once: {two_split:?}");
    assert!(two_split.iter().all(|n| *n > 0), "a splitter replica did nothing: {two_split:?}");
    assert!(two_infer.iter().all(|n| *n > 0), "an inferencer replica did nothing: {two_infer:?}");
    assert_eq!(one.len(), two.len());
    for (d, (a, b)) in one.iter().zip(&two).enumerate() {
        assert_eq!(a.len(), b.len(), "document {d}: page counts");
        for (p, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x, y, "document {d} page {}: detections differ between 1 and 2 replicas", p + 1);
        }
    }
}
