//! One ingress process on a private NATS server, for tests that attack
//! the API with raw sockets or measure the process (hostile, rebinding,
//! client_view). Runs the ingress binary: `cargo build --bins` first.

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_pipeline::embedded::{free_port, NatsServer};
use pagestream_pipeline::nats::Names;
use tokio::net::TcpStream;

use crate::init_logging;
use crate::procs::Cluster;

/// An ingress process, its NATS server and its directories.
pub struct IngressProc {
    /// `None` once a test stopped it under the running API.
    pub nats: Option<NatsServer>,
    pub cluster: Cluster,
    /// The results directory (the uploader's) and the processes' logs.
    pub dirs: (tempfile::TempDir, tempfile::TempDir),
    pub port: u16,
    pub prefix: String,
    pub js: async_nats::jetstream::Context,
}

impl IngressProc {
    /// Starts the ingress with `prefix` and the extra `env` settings, and
    /// waits until it is ready.
    pub async fn start(prefix: &str, env: &[(&str, &str)]) -> IngressProc {
        init_logging();
        let nats = tokio::task::spawn_blocking(NatsServer::start).await.unwrap().unwrap();
        let (out, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut vars: Vec<(String, String)> = vec![
            ("PAGESTREAM_NATS_URL".into(), nats.url()),
            ("PAGESTREAM_NATS_PREFIX".into(), prefix.into()),
            ("PAGESTREAM_UPLOADER_DIR".into(), out.path().display().to_string()),
            ("PAGESTREAM_LOG".into(), "info,async_nats=error".into()),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut cluster = Cluster::new(vars, logs.path());
        let port = free_port().unwrap();
        cluster.procs.push(cluster.spawn("ingress", 0, Some(port)));
        let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client.get("/readyz").await.is_ok_and(|a| a.status == 200) {
            assert!(Instant::now() < deadline, "ingress not ready: {}", cluster.log("ingress", 0));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        IngressProc { nats: Some(nats), cluster, dirs: (out, logs), port, prefix: prefix.into(), js }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(format!("http://127.0.0.1:{}", self.port))
    }

    pub async fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).await.unwrap()
    }

    /// The NATS URL (while the server runs).
    pub fn nats_url(&self) -> String {
        self.nats.as_ref().expect("NATS is running").url()
    }

    /// Peak RSS of the ingress process so far, in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        peak_rss_mib(self.cluster.procs[0].child.id())
    }

    /// Messages and bytes in the blob store's stream.
    pub async fn store(&self) -> (u64, u64) {
        self.stream_state(format!("OBJ_{}", Names::new(&self.prefix).blob_bucket())).await
    }

    /// Messages and bytes in `stream`.
    pub async fn stream_state(&self, stream: String) -> (u64, u64) {
        let mut stream = self.js.get_stream(stream).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        (state.messages, state.bytes)
    }
}

/// Peak RSS (VmHWM) of process `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb / 1024
}
