//! One ingress process on a private NATS server, for tests that attack
//! the API with raw sockets or measure the process (hostile, rebinding,
//! client_view). Runs the ingress binary: `cargo build --bins` first.

use std::time::Duration;

use pagestream::client::ApiClient;
use pagestream_pipeline::embedded::NatsServer;
use pagestream_pipeline::nats::Names;
use tokio::net::TcpStream;

use crate::procs::{Cluster, Stages};

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
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let s = Stages::start(prefix, &["ingress"], &env, Duration::from_secs(60)).await;
        let js = s.js().await;
        IngressProc {
            nats: Some(s.nats),
            cluster: s.cluster,
            dirs: (s.out, s.logs),
            port: s.port,
            prefix: prefix.into(),
            js,
        }
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

    /// [`IngressProc::store`] once it equals `want`, or after `within`
    /// whatever it is.
    pub async fn store_settles_to(&self, want: (u64, u64), within: Duration) -> (u64, u64) {
        crate::wait::settle(within, Duration::from_millis(200), async || self.store().await, |now| *now == want).await
    }

    /// Messages and bytes in `stream`.
    pub async fn stream_state(&self, stream: String) -> (u64, u64) {
        crate::stream_state(&self.js, stream).await
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
