//! Graceful shutdown: SIGTERM to a busy inferencer lets the page in flight
//! finish and be acked, the process exits 0 well within the grace period,
//! and no message is redelivered when a new inferencer takes over.

use std::time::{Duration, Instant};

use pagestream_e2e::api::{accepted, status};
use pagestream_e2e::procs::{signal, Stages, STAGES};
use pagestream_e2e::{corpus, wait, wait_terminal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_without_redelivery() {
    let mut s = Stages::start("shutdown", &STAGES, &[], Duration::from_secs(60)).await;
    let client = &s.client;
    let id = accepted(&client.submit_file(&corpus("fig_dbscan-jss.pdf"), None).await.unwrap());

    // Wait until the inferencer is mid-document, then SIGTERM it.
    wait::until(Duration::from_secs(180), Duration::from_millis(100), async || {
        let st = status(client, &id).await;
        if st["pages"]["inferred"].as_u64().unwrap_or(0) >= 4 {
            return Ok(());
        }
        Err(format!("no progress: {st}"))
    })
    .await;
    let inferencer = STAGES.iter().position(|s| *s == "inferencer").unwrap();
    let sent = Instant::now();
    signal(s.cluster.procs[inferencer].child.id(), "-TERM");
    let status = tokio::task::block_in_place(|| s.cluster.procs[inferencer].child.wait()).unwrap();
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "inferencer exit: {status}\n{}", s.cluster.log("inferencer", 0));
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    assert!(s.cluster.log("inferencer", 0).contains("finishing in-flight messages"));

    // A new inferencer finishes the document; nothing comes back redelivered.
    s.cluster.procs[inferencer] = s.cluster.spawn("inferencer", 1, None);
    let st = wait_terminal(&s.client, &id, Duration::from_secs(300)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["pages"]["inferred"], 28);
    // (The splitter may defer its turn while no inferencer is live: that
    // wait is a deliberate redelivery of its own message, not a lost ack.)
    for (stage, idx) in [("inferencer", 0), ("inferencer", 1), ("uploader", 0)] {
        let log = s.cluster.log(stage, idx);
        assert!(!log.contains("handling a redelivered message"), "a message was redelivered to {stage}: {log}");
    }
    println!("inferencer stopped {took:?} after SIGTERM");
}
