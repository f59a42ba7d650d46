//! Load on the ingress: 50 concurrent uploads of a 6.5 MB PDF to the real
//! `ingress` binary. Every upload is accepted and stored whole, the status
//! and list endpoints keep answering throughout, and the ingress's peak RSS
//! is reported (uploads stream to the blob store; nothing holds a file).
//! Only the ingress runs: the documents stay queued, which is what a burst
//! looks like to the API.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::api::accepted;
use pagestream_e2e::corpus;
use pagestream_e2e::procs::Cluster;
use pagestream_pipeline::embedded::{free_port, NatsServer};

const UPLOADS: usize = 50;
const PDF: &str = "huge_R-fullrefman.pdf";

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_uploads_of_a_multi_megabyte_pdf() {
    let nats = tokio::task::spawn_blocking(NatsServer::start).await.unwrap().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let env = vec![
        ("PAGESTREAM_NATS_URL".to_string(), nats.url()),
        ("PAGESTREAM_NATS_PREFIX".to_string(), "load".to_string()),
        ("PAGESTREAM_LOG".to_string(), "warn".to_string()),
    ];
    let mut cluster = Cluster::new(env, logs.path());
    let port = free_port().unwrap();
    let ingress = cluster.spawn("ingress", 0, Some(port));
    let pid = ingress.child.id();
    cluster.procs.push(ingress);
    let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.get("/readyz").await.map(|a| a.status.is_success()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "ingress not ready: {}", cluster.log("ingress", 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_rss = peak_rss_kib(pid);
    let pdf = corpus(PDF);
    let size = std::fs::metadata(&pdf).unwrap().len();

    // Probe the read endpoints while the uploads run.
    let done = Arc::new(AtomicBool::new(false));
    let (probes, worst_ms) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let prober = {
        let (client, done, probes, worst_ms) = (client.clone(), done.clone(), probes.clone(), worst_ms.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                for path in ["/v1/documents?limit=5", "/readyz"] {
                    let t = Instant::now();
                    let ans = client.get(path).await.unwrap();
                    assert_eq!(ans.status, 200, "{path} during the load: {}", ans.json);
                    worst_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                    probes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..UPLOADS {
        let (client, pdf) = (client.clone(), pdf.clone());
        tasks.spawn(async move { client.submit_file(&pdf, Some(&format!("load {i}"))).await.unwrap() });
    }
    let mut ids = BTreeSet::new();
    while let Some(ans) = tasks.join_next().await {
        ids.insert(accepted(&ans.unwrap()));
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    prober.await.unwrap();
    assert_eq!(ids.len(), UPLOADS, "every upload is a distinct document");
    for id in &ids {
        let st = client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
        assert_eq!(st["state"], "queued");
        assert_eq!(st["bytes"], size, "stored whole");
    }
    let listed = client.get("/v1/documents?limit=100").await.unwrap().json;
    assert_eq!(listed["documents"].as_array().unwrap().len(), UPLOADS);
    let peak = peak_rss_kib(pid);
    eprintln!(
        "load: {UPLOADS} × {:.1} MB in {:.1} s ({:.1} MB/s); {} status probes answered, slowest {} ms; \
         ingress peak RSS {:.1} MiB (idle {:.1} MiB)",
        size as f64 / 1e6,
        elapsed.as_secs_f64(),
        (UPLOADS as f64 * size as f64 / 1e6) / elapsed.as_secs_f64(),
        probes.load(Ordering::Relaxed),
        worst_ms.load(Ordering::Relaxed),
        peak as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    );
    assert!(probes.load(Ordering::Relaxed) > 0);
    // Memory is not noisy like time: 50 uploads in flight must not hold
    // their files. The target is 64 MiB.
    assert!(peak < 64 * 1024, "ingress peak RSS {peak} KiB ≥ 64 MiB");
}
