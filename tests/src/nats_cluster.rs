//! A real 3-node NATS JetStream cluster on loopback ports: one
//! `nats-server` process per node (routes, `server_name`, JetStream each),
//! nodes that can be SIGKILLed and restarted on their own storage.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use pagestream::client::ApiClient;
use pagestream_pipeline::embedded::{free_port, nats_server_binary};

pub struct NatsNode {
    pub name: String,
    pub port: u16,
    pub monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(nats_server_binary()?)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "node {} did not listen on {}", self.name, self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL: no goodbye to the cluster, as when a host dies.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports and storage.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` nodes routed to each other and waits until JetStream has
    /// a meta leader (before that, stream creation is refused).
    pub async fn start(n: usize) -> Result<NatsCluster> {
        let dir = tempfile::Builder::new().prefix("pagestream-nats-cluster-").tempdir()?;
        let ports: Vec<(u16, u16, u16)> =
            (0..n).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<Result<_>>()?;
        let mut nodes = Vec::new();
        for (i, (port, monitor, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store)?;
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, _, c))| format!("\"nats://127.0.0.1:{c}\""))
                .collect();
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: pagestream-test, listen: \"127.0.0.1:{cluster_port}\", routes: [{}] }}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )?;
            nodes.push(NatsNode {
                name,
                port: *port,
                monitor_port: *monitor,
                config,
                log: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
            });
        }
        for node in &mut nodes {
            node.spawn()?;
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        cluster.wait_for_meta_leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Every node's URL, comma separated (`nats.url` of a stage).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsNode::url).collect::<Vec<_>>().join(",")
    }

    /// The JetStream meta leader as a running node reports it (`/jsz`).
    pub async fn meta_leader(&self) -> Option<String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let client = ApiClient::new(format!("http://127.0.0.1:{}", node.monitor_port));
            if let Ok(Ok(ans)) = tokio::time::timeout(Duration::from_secs(2), client.get("/jsz")).await {
                if let Some(leader) = ans.json["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty()) {
                    return Some(leader.to_string());
                }
            }
        }
        None
    }

    pub async fn wait_for_meta_leader(&self, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.meta_leader().await {
                return Ok(l);
            }
            anyhow::ensure!(Instant::now() < deadline, "no JetStream meta leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The nodes' logs, for a failing test.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "==== {} ({} lines)\n{}\n",
                    n.name,
                    lines.len(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            })
            .collect()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if std::thread::panicking() {
            eprintln!("nats node logs of the failed test:\n{}", self.logs());
        }
    }
}
