//! Graceful shutdown: SIGTERM to a busy inferencer lets the page in flight
//! finish and be acked, the process exits 0 well within the grace period,
//! and no message is redelivered when a new inferencer takes over.

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::procs::{base_env, signal, Cluster, STAGES};
use pagestream_e2e::{corpus, init_logging, wait_terminal};
use pagestream_pipeline::embedded::{free_port, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_without_redelivery() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let env = base_env(&nats.url(), "shutdown", out.path());
    let mut cluster = Cluster::new(env, logs.path());
    for stage in STAGES {
        let p = cluster.spawn(stage, 0, (stage == "ingress").then_some(port));
        cluster.procs.push(p);
    }
    let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.get("/readyz").await.map(|a| a.status.is_success()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "ingress not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ans = client.submit_file(&corpus("fig_dbscan-jss.pdf"), None).await.unwrap();
    let id = ans.json["id"].as_str().unwrap().to_string();

    // Wait until the inferencer is mid-document, then SIGTERM it.
    loop {
        let st = client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
        if st["pages"]["inferred"].as_u64().unwrap_or(0) >= 4 {
            break;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(120), "no progress: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let inferencer = STAGES.iter().position(|s| *s == "inferencer").unwrap();
    let sent = Instant::now();
    signal(cluster.procs[inferencer].child.id(), "-TERM");
    let status = tokio::task::block_in_place(|| cluster.procs[inferencer].child.wait()).unwrap();
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "inferencer exit: {status}\n{}", cluster.log("inferencer", 0));
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    assert!(cluster.log("inferencer", 0).contains("finishing in-flight messages"));

    // A new inferencer finishes the document; nothing comes back redelivered.
    cluster.procs[inferencer] = cluster.spawn("inferencer", 1, None);
    let st = wait_terminal(&client, &id, Duration::from_secs(300)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["pages"]["inferred"], 28);
    // (The splitter may defer its turn while no inferencer is live: that
    // wait is a deliberate redelivery of its own message, not a lost ack.)
    for (stage, idx) in [("inferencer", 0), ("inferencer", 1), ("uploader", 0)] {
        let log = cluster.log(stage, idx);
        assert!(!log.contains("handling a redelivered message"), "a message was redelivered to {stage}: {log}");
    }
    println!("inferencer stopped {took:?} after SIGTERM");
}
