//! A 3-node NATS JetStream cluster under the stage processes (every
//! stream, consumer and bucket kept on 3 nodes: `nats.replicas = 3`),
//! ≥ 150 real pages, and two node losses mid-run: first a node is
//! SIGKILLed and restarted, then the node leading the pages stream. Every
//! document completes with exactly one result set per page, nothing is
//! dead-lettered, and the live progress never goes backwards.
//!
//! Needs the stage binaries: `cargo build --bins` (scripts/test does it).

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::api::accepted;
use pagestream_e2e::nats_cluster::NatsCluster;
use pagestream_e2e::procs::{base_env, wait_ready, Cluster, STAGES};
use pagestream_e2e::{corpus, init_logging, read_json};
use pagestream_pipeline::config::NatsConfig;
use pagestream_pipeline::embedded::free_port;
use pagestream_pipeline::nats::Names;
use serde_json::Value;

const PREFIX: &str = "clus";

async fn uploaded(client: &ApiClient, docs: &[String]) -> (u64, bool) {
    let (mut pages, mut done) = (0, true);
    for id in docs {
        // A request to an ingress whose NATS node just died may hang: ask again next round.
        let ans = tokio::time::timeout(Duration::from_secs(10), client.get(&format!("/v1/documents/{id}"))).await;
        match ans {
            Ok(Ok(a)) if a.status.is_success() => {
                pages += a.json["pages"]["uploaded"].as_u64().unwrap_or(0);
                done &= pagestream::client::is_terminal(a.json["state"].as_str().unwrap_or(""));
            }
            _ => done = false,
        }
    }
    (pages, done)
}

/// The node leading `stream`, as JetStream reports it.
async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_and_the_pages_leader_without_losing_a_page() {
    init_logging();
    let mut nats = tokio::time::timeout(Duration::from_secs(60), NatsCluster::start(3))
        .await
        .expect("the NATS cluster did not start within 60 s")
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut env = base_env(&nats.urls(), PREFIX, out.path());
    env.extend(
        [
            ("PAGESTREAM_NATS_REPLICAS", "3".to_string()),
            // Each node reserves the blob bucket's bytes: keep it small here.
            ("PAGESTREAM_NATS_MAX_BLOB_BYTES", (1u64 << 30).to_string()),
            ("PAGESTREAM_NATS_ACK_WAIT_SECS", "6".into()),
            ("PAGESTREAM_NATS_MAX_DELIVER", "30".into()),
            ("PAGESTREAM_NATS_CONNECT_TIMEOUT_SECS", "60".into()),
            ("PAGESTREAM_SPLITTER_DPI", "100".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut procs = Cluster::new(env, logs.path());
    let port = free_port().unwrap();
    for (i, stage) in STAGES.into_iter().enumerate() {
        // Each stage starts from another node (the client shuffles the
        // list; a node loss moves it to one of the others).
        let first = &nats.nodes[i % 3];
        let others: Vec<String> = nats.nodes.iter().filter(|n| n.name != first.name).map(|n| n.url()).collect();
        let urls = format!("{},{}", first.url(), others.join(","));
        let p = procs.spawn_with(stage, 0, (stage == "ingress").then_some(port), &[("PAGESTREAM_NATS_URL", urls)]);
        procs.procs.push(p);
    }
    let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
    let t0 = Instant::now();
    wait_ready(&client, Duration::from_secs(90), &procs).await;
    println!("stages ready after {:.1} s", t0.elapsed().as_secs_f32());
    let check_cfg = NatsConfig { url: nats.urls(), prefix: PREFIX.into(), ..Default::default() };
    let js = pagestream_pipeline::nats::connect(&check_cfg, "cluster-check").await.unwrap();
    let names = Names::new(PREFIX);
    let pages_stream = names.pages_stream();
    for stream in [names.docs_stream(), pages_stream.clone(), names.inferred_stream(), names.events_stream()] {
        let info = js.get_stream(&stream).await.unwrap().info().await.unwrap().clone();
        assert_eq!(info.config.num_replicas, 3, "{stream} is not replicated on 3 nodes");
    }

    // 113 + 28 + 28 = 169 pages.
    let files = [corpus("text_R-intro.pdf"), corpus("fig_dbscan-jss.pdf"), corpus("fig_dbscan-jss.pdf")];
    let mut docs = Vec::new();
    for f in &files {
        docs.push(accepted(
            &tokio::time::timeout(Duration::from_secs(60), client.submit_file(f, None))
                .await
                .expect("an upload took over 60 s")
                .unwrap(),
        ));
    }
    let mut watchers = tokio::task::JoinSet::new();
    for id in &docs {
        let (client, id) = (client.clone(), id.clone());
        watchers.spawn(async move {
            let mut seen = Vec::new();
            let outcome = client.follow_events(&id, |ev| seen.push((ev.kind.clone(), ev.data.clone()))).await;
            (id, outcome.map(|_| seen))
        });
    }

    let started = Instant::now();
    let at = || started.elapsed().as_secs_f32();
    let mut timeline = Vec::new();
    // 0: waiting to kill a node; 1: it is down; 2: waiting to kill the
    // pages leader; 3: it is down; 4: both back.
    let mut phase = 0;
    let mut down: Option<(usize, Instant)> = None;
    let mut leader: Option<String> = None;
    let mut killed_leader: Option<String> = None;
    let finish_by = started + Duration::from_secs(300);
    let mut last_print = Instant::now();
    loop {
        let (pages, done) = uploaded(&client, &docs).await;
        if last_print.elapsed() >= Duration::from_secs(10) {
            println!("[{:>5.1}s] {pages} pages uploaded (phase {phase})", at());
            last_print = Instant::now();
        }
        let new_leader = killed_leader.is_some() && leader.is_some() && leader != killed_leader;
        if done && phase == 4 && new_leader {
            break;
        }
        assert!(
            Instant::now() < finish_by,
            "not finished after 5 minutes: {pages} pages uploaded, done {done}, phase {phase}, pages leader {leader:?} (killed {killed_leader:?}); timeline {timeline:?}"
        );
        match phase {
            0 if pages >= 30 => {
                let leader = stream_leader(&js, &pages_stream).await;
                // Not the pages leader first: a follower's loss.
                let victim = (0..3).find(|i| Some(&nats.nodes[*i].name) != leader.as_ref()).unwrap();
                nats.nodes[victim].kill();
                timeline.push(format!(
                    "[{:>5.1}s] {pages} pages uploaded; SIGKILL {} (pages leader: {leader:?})",
                    at(),
                    nats.nodes[victim].name
                ));
                down = Some((victim, Instant::now()));
                phase = 1;
            }
            1 | 3 if down.is_some_and(|(_, t)| t.elapsed() >= Duration::from_secs(8)) => {
                let (i, _) = down.take().unwrap();
                tokio::task::block_in_place(|| nats.nodes[i].restart()).unwrap();
                timeline.push(format!("[{:>5.1}s] {pages} pages uploaded; {} restarted", at(), nats.nodes[i].name));
                phase += 1;
            }
            2 if pages >= 90 || done => {
                let current = stream_leader(&js, &pages_stream).await.expect("the pages stream has a leader");
                let i = nats.index_of(&current).unwrap();
                nats.nodes[i].kill();
                timeline.push(format!("[{:>5.1}s] {pages} pages uploaded; SIGKILL {current}, the pages leader", at()));
                killed_leader = Some(current);
                down = Some((i, Instant::now()));
                phase = 3;
            }
            _ => {}
        }
        // Leader changes as JetStream reports them (its API may not answer
        // while a leader is being elected).
        if let Some(now) = stream_leader(&js, &pages_stream).await {
            if leader.as_ref() != Some(&now) {
                timeline.push(format!("[{:>5.1}s] {pages} pages uploaded; pages leader now {now}", at()));
                leader = Some(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    for line in &timeline {
        println!("{line}");
    }
    assert_ne!(leader, killed_leader, "the pages stream got a new leader: {timeline:?}");

    // Every document completed with exactly one result set per page.
    let mut total = 0;
    for id in &docs {
        let st = client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
        assert_eq!(st["state"], "completed", "{st}");
        let n = st["page_count"].as_u64().unwrap();
        total += n;
        for stage in ["rendered", "inferred", "uploaded"] {
            assert_eq!(st["pages"][stage], n, "{stage} count of {id}: {st}");
        }
        let dir = out.path().join(id);
        let mut files: Vec<String> = pagestream_e2e::files_under(&dir)
            .into_iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        files.sort();
        let mut want: Vec<String> =
            (1..=n).flat_map(|p| [format!("pages/{p}.json"), format!("pages/{p}.png")]).collect();
        want.push("manifest.json".into());
        want.sort();
        assert_eq!(files, want, "result files of {id}");
        let manifest: Value = read_json(&dir.join("manifest.json"));
        assert_eq!((manifest["status"].as_str(), manifest["page_count"].as_u64()), (Some("completed"), Some(n)));
        for p in 1..=n {
            let page: Value = read_json(&dir.join(format!("pages/{p}.json")));
            assert_eq!(page["page"], p, "{id} page {p}");
        }
    }
    assert!(total >= 150, "{total} pages");

    // The live progress never went backwards and ended once, last. Every
    // document is finished: its event stream must end promptly.
    let streams_end_by = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(res) = tokio::time::timeout_at(streams_end_by, watchers.join_next())
        .await
        .expect("an event stream did not end within 60 s of its document finishing")
    {
        let (id, events) = res.unwrap();
        let events = events.unwrap_or_else(|e| panic!("event stream of {id}: {e:#}"));
        pagestream_e2e::assert_live_progress(&id, &events);
    }

    // Nothing was dead-lettered.
    let dlq: Vec<String> = pagestream_e2e::dead_letters(&js, &names)
        .await
        .iter()
        .map(|d| format!("{} {} after {} attempts: {:?}", d.stage, d.subject, d.attempts, d.error))
        .collect();
    assert!(dlq.is_empty(), "dead letters after the node losses: {dlq:#?}");
    println!(
        "cluster: {} documents, {total} pages in {:.1} s with 2 node losses; redeliveries {}, duplicates suppressed {}",
        docs.len(),
        elapsed.as_secs_f32(),
        procs.count_in_logs("handling a redelivered message"),
        procs.count_in_logs("duplicate publish suppressed"),
    );
}
