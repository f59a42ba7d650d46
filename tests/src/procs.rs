//! Stage binaries as separate processes, for tests that kill and restart them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_pipeline::embedded::{free_port, NatsServer};

use crate::init_logging;

pub const STAGES: [&str; 4] = ["ingress", "splitter", "inferencer", "uploader"];

/// `target/<profile>`, where `cargo build --bins` puts the stage binaries.
pub fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<test>-… → target/<profile>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    for s in STAGES {
        assert!(dir.join(s).exists(), "{} is missing: run `cargo build --bins` first", dir.join(s).display());
    }
    dir
}

/// The environment every stage process of a test shares: its NATS server
/// and prefix, no admin ports, one inference thread, no OCR, quiet logs. Tests add
/// what they exercise.
pub fn stage_env(nats_url: &str, prefix: &str) -> Vec<(String, String)> {
    [
        ("PAGESTREAM_NATS_URL", nats_url.to_string()),
        ("PAGESTREAM_NATS_PREFIX", prefix.into()),
        ("PAGESTREAM_SPLITTER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_INFERENCER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_UPLOADER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_INFERENCER_THREADS", "1".into()),
        // No OCR (seconds a page on a scan); the tests of OCR turn it on.
        ("PAGESTREAM_INFERENCER_OCR_MODEL", String::new()),
        ("PAGESTREAM_LOG", "info,async_nats=error".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(small_store_env())
    .collect()
}

/// [`stage_env`] with a local results directory, `out`.
pub fn base_env(nats_url: &str, prefix: &str, out: &Path) -> Vec<(String, String)> {
    with_vars(stage_env(nats_url, prefix), &[("PAGESTREAM_UPLOADER_DIR", out.display().to_string())])
}

/// `env` with each of `extra` set: replacing a variable of the same name,
/// else added.
pub fn with_vars(mut env: Vec<(String, String)>, extra: &[(&str, String)]) -> Vec<(String, String)> {
    for (k, v) in extra {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some((_, value)) => *value = v.clone(),
            None => env.push((k.to_string(), v.clone())),
        }
    }
    env
}

/// Small JetStream reservations, as in [`crate::test_config`] (every
/// [`Cluster`] has them unless its environment sets its own): tests store
/// little, and each limit is reserved against 75% of the free disk, so that
/// the servers of many parallel tests fit on a CI disk.
pub fn small_store_env() -> Vec<(String, String)> {
    vec![
        ("PAGESTREAM_NATS_MAX_BLOB_BYTES".into(), (1u64 << 30).to_string()),
        ("PAGESTREAM_NATS_MAX_EVENT_BYTES".into(), (256u64 << 20).to_string()),
    ]
}

pub struct Proc {
    pub stage: &'static str,
    pub port: Option<u16>,
    pub child: Child,
}

/// Stage processes sharing one environment; stderr of each goes to
/// `<logs>/<stage>-<idx>.log` (appended across restarts).
pub struct Cluster {
    pub bins: PathBuf,
    pub env: Vec<(String, String)>,
    pub logs: PathBuf,
    pub procs: Vec<Proc>,
}

impl Cluster {
    pub fn new(env: Vec<(String, String)>, logs: &Path) -> Cluster {
        let mut env = env;
        for (k, v) in small_store_env() {
            if !env.iter().any(|(key, _)| *key == k) {
                env.push((k, v));
            }
        }
        Cluster { bins: bin_dir(), env, logs: logs.to_path_buf(), procs: Vec::new() }
    }

    pub fn spawn(&self, stage: &'static str, idx: usize, port: Option<u16>) -> Proc {
        self.spawn_with(stage, idx, port, &[])
    }

    /// [`Cluster::spawn`] with extra variables for this process only.
    pub fn spawn_with(&self, stage: &'static str, idx: usize, port: Option<u16>, extra: &[(&str, String)]) -> Proc {
        let log = self.logs.join(format!("{stage}-{idx}.log"));
        let stderr = File::options().create(true).append(true).open(&log).unwrap();
        let mut cmd = Command::new(self.bins.join(stage));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        cmd.envs(extra.iter().map(|(k, v)| (k, v)));
        if let Some(p) = port {
            cmd.env("PAGESTREAM_INGRESS_ADDR", format!("127.0.0.1:{p}"));
        }
        Proc { stage, port, child: cmd.spawn().unwrap() }
    }

    /// Sets `key` to `value` in the environment of the processes started
    /// from now on.
    pub fn set_var(&mut self, key: &str, value: String) {
        self.env = with_vars(std::mem::take(&mut self.env), &[(key, value)]);
    }

    /// Starts process `idx` of each of `stages`, the ingress on `port`.
    pub fn spawn_stages(&mut self, stages: &[&'static str], idx: usize, port: u16) {
        for &stage in stages {
            let p = self.spawn(stage, idx, (stage == "ingress").then_some(port));
            self.procs.push(p);
        }
    }

    /// An inferencer process serving `model` (ONNX Runtime for
    /// layout_cdla, tract for yolov8n_doclaynet), with `extra` variables.
    pub fn spawn_inferencer(&self, idx: usize, model: &str, extra: &[(&str, String)]) -> Proc {
        let backend = if model == crate::YOLO { "tract" } else { "ort" };
        let mut env =
            vec![("PAGESTREAM_INFERENCER_MODEL", model.to_string()), ("PAGESTREAM_INFERENCER_BACKEND", backend.into())];
        env.extend(extra.iter().cloned());
        self.spawn_with("inferencer", idx, None, &env)
    }

    /// The process of `stage` started first.
    pub fn proc(&mut self, stage: &str) -> &mut Proc {
        self.procs.iter_mut().find(|p| p.stage == stage).unwrap_or_else(|| panic!("no {stage} process"))
    }

    /// SIGKILLs process `i` and starts a new one in its place.
    pub fn kill_and_restart(&mut self, i: usize) {
        let p = &mut self.procs[i];
        let _ = p.child.kill();
        let _ = p.child.wait();
        let (stage, port) = (p.stage, p.port);
        self.procs[i] = self.spawn(stage, i % 2, port);
    }

    /// Occurrences of `needle` in every process log.
    pub fn count_in_logs(&self, needle: &str) -> usize {
        std::fs::read_dir(&self.logs)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default().matches(needle).count())
            .sum()
    }

    pub fn log(&self, stage: &str, idx: usize) -> String {
        std::fs::read_to_string(self.logs.join(format!("{stage}-{idx}.log"))).unwrap_or_default()
    }
}

/// Lines of each process log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

impl Cluster {
    /// The last lines of every process log, for a failing test's output.
    pub fn log_tails(&self) -> String {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        paths.sort();
        let mut out = String::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            out.push_str(&format!("==== {} (last {} of {} lines)\n", path.display(), tail.len(), lines.len()));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // A failing test shows what its stage processes said: without it a
        // hang in CI (a stage that never picked a message up) is a guess.
        if std::thread::panicking() {
            eprintln!("stage process logs of the failed test:\n{}", self.log_tails());
        }
    }
}

/// Waits until `client` (an ingress) answers `GET /readyz` with 200, at
/// most `within`; the processes' logs are in the failure.
pub async fn wait_ready(client: &ApiClient, within: Duration, cluster: &Cluster) {
    let deadline = Instant::now() + within;
    while !client.get("/readyz").await.is_ok_and(|a| a.status == 200) {
        assert!(Instant::now() < deadline, "ingress not ready within {within:?}:\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `client` (an ingress) lists a model served by a live
/// inferencer in `GET /v1/models`, at most `within`.
pub async fn wait_model_served(client: &ApiClient, within: Duration, cluster: &Cluster) {
    let deadline = Instant::now() + within;
    loop {
        let models = client.get("/v1/models").await.ok().filter(|m| m.status == 200);
        if models.is_some_and(|m| m.json["models"].as_array().is_some_and(|l| !l.is_empty())) {
            return;
        }
        assert!(Instant::now() < deadline, "pipeline not ready within {within:?}:\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A private NATS server and stage processes on it, the start of most
/// process tests.
pub struct Stages {
    /// (Dropped first: the processes go before their server and logs.)
    pub cluster: Cluster,
    /// A client of the ingress (no token).
    pub client: ApiClient,
    /// The ingress's port (free, chosen at start).
    pub port: u16,
    pub nats: NatsServer,
    /// The uploader's results directory.
    pub out: tempfile::TempDir,
    /// The processes' logs.
    pub logs: tempfile::TempDir,
}

impl Stages {
    /// NATS, the directories and the processes' environment: [`base_env`]
    /// with `prefix`, then `extra`; no process yet.
    pub async fn prepare(prefix: &str, extra: &[(&str, String)]) -> Stages {
        init_logging();
        let nats = tokio::task::spawn_blocking(NatsServer::start).await.unwrap().unwrap();
        let (out, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let env = with_vars(base_env(&nats.url(), prefix, out.path()), extra);
        let cluster = Cluster::new(env, logs.path());
        let port = free_port().unwrap();
        let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
        Stages { cluster, client, port, nats, out, logs }
    }

    /// [`Stages::prepare`], then process 0 of each of `stages`; waits (at
    /// most `ready_within`) until the ingress is ready.
    pub async fn start(
        prefix: &str,
        stages: &[&'static str],
        extra: &[(&str, String)],
        ready_within: Duration,
    ) -> Stages {
        let mut s = Stages::prepare(prefix, extra).await;
        s.cluster.spawn_stages(stages, 0, s.port);
        wait_ready(&s.client, ready_within, &s.cluster).await;
        s
    }

    /// A JetStream context on the NATS server.
    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.nats.url()).await.unwrap())
    }
}

/// Sends a signal (`-TERM`, `-STOP`, `-CONT`, …) with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid} failed");
}
