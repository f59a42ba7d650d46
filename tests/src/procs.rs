//! Stage binaries as separate processes, for tests that kill and restart them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
/// and prefix, a local results directory, no admin ports, one inference
/// thread, quiet logs. Tests add what they exercise.
pub fn base_env(nats_url: &str, prefix: &str, out: &Path) -> Vec<(String, String)> {
    [
        ("PAGESTREAM_NATS_URL", nats_url.to_string()),
        ("PAGESTREAM_NATS_PREFIX", prefix.into()),
        ("PAGESTREAM_UPLOADER_DIR", out.display().to_string()),
        ("PAGESTREAM_SPLITTER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_INFERENCER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_UPLOADER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_INFERENCER_THREADS", "1".into()),
        ("PAGESTREAM_LOG", "info,async_nats=error".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(small_store_env())
    .collect()
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

/// Sends a signal (`-TERM`, `-STOP`, `-CONT`, …) with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid} failed");
}
