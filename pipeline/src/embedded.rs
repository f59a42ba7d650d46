//! A private `nats-server` with JetStream, for the local mode, the demo and
//! the tests: temp storage directory, free ports, killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::config::{deps_dir, NatsConfig};

/// A running nats-server child process.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub monitor_port: u16,
    store: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// The nats-server binary: `$PAGESTREAM_NATS_SERVER`, else `<deps>/bin/nats-server`.
pub fn nats_server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PAGESTREAM_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let p = deps_dir().join("bin/nats-server");
    if p.exists() {
        Ok(p)
    } else {
        anyhow::bail!("nats-server not found at {} (run scripts/setup to install it)", p.display())
    }
}

/// A free TCP port on 127.0.0.1 for a server started next, picked at
/// random *below* the kernel's ephemeral range. A port from `bind(0)` is
/// one the kernel hands out again to the next `bind(0)` (another test
/// running in parallel) and to outgoing connections: between this check
/// and the server's own bind another process could take it, and a client
/// would then talk to someone else's server.
pub fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32_768);
    if ephemeral > LOWEST + 1000 {
        let seed = std::collections::hash_map::RandomState::new();
        for attempt in 0u32..500 {
            let mut h = seed.build_hasher();
            h.write_u32(std::process::id());
            h.write_u32(attempt);
            let port = LOWEST + (h.finish() % u64::from(ephemeral - LOWEST)) as u32;
            let port = u16::try_from(port).expect("below the ephemeral range");
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl NatsServer {
    /// Starts a server with storage in a fresh temporary directory.
    pub fn start() -> Result<NatsServer> {
        let tmp = tempfile::Builder::new().prefix("pagestream-nats-").tempdir()?;
        let store = tmp.path().to_path_buf();
        let mut s = Self::start_in(&store, None)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts a server storing in `store`, on `port` (or a free one).
    pub fn start_in(store: &Path, port: Option<u16>) -> Result<NatsServer> {
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let monitor_port = free_port()?;
        let child = spawn(store, port, monitor_port)?;
        let mut server = NatsServer { child, port, monitor_port, store: store.to_path_buf(), _tmp: None };
        server.wait_ready(Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("nats-server exited during start-up: {status}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("nats-server did not accept connections on port {} within {within:?}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// JetStream's storage limit on this server, from its monitoring
    /// endpoint: `max_file_store`, by default 75% of the disk that was free
    /// under its store when it started.
    pub fn max_storage(&self) -> Result<u64> {
        // A monitor just started can drop the first connection (seen once
        // in CI as a read error after 0.5 s): a few tries, then the error.
        let mut tries = 0;
        loop {
            match self.read_max_storage() {
                Ok(n) => return Ok(n),
                Err(e) if tries >= 3 => return Err(e),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    fn read_max_storage(&self) -> Result<u64> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.monitor_port))
            .with_context(|| format!("connecting to the nats-server monitor on port {}", self.monitor_port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /jsz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).context("reading /jsz from the nats-server monitor")?;
        let body = reply.windows(4).position(|w| w == b"\r\n\r\n").map(|i| &reply[i + 4..]).unwrap_or_default();
        let jsz: serde_json::Value = serde_json::from_slice(body).context("parsing /jsz of the nats-server monitor")?;
        jsz["config"]["max_storage"].as_u64().context("/jsz of the nats-server monitor has no config.max_storage")
    }

    /// Lowers the byte limits of `cfg` (blob bucket, events, dead letters)
    /// so that JetStream can reserve them on this server, whose storage
    /// limit follows the free disk: without it a laptop with less than
    /// ~12 GB free could not start the embedded pipeline at all. Returns
    /// what was changed, for a warning, or `None` when they fit.
    pub fn fit_limits(&self, cfg: &mut NatsConfig) -> Result<Option<String>> {
        let max_storage = self.max_storage()?;
        Ok(fit_limits(cfg, max_storage).map(|changed| {
            format!(
                "the NATS store under {} may hold {} (JetStream's max_file_store, by default 75% of the disk free when \
                 it started), less than the configured limits: {changed}. Free disk space to use the configured limits.",
                self.store.display(),
                mib(max_storage)
            )
        }))
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Restarts on the same port and storage (JetStream state survives).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn(&self.store, self.port, self.monitor_port)?;
        self.wait_ready(Duration::from_secs(10))
    }
}

fn spawn(store: &Path, port: u16, monitor_port: u16) -> Result<Child> {
    let bin = nats_server_binary()?;
    Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor_port.to_string(), "-sd"])
        .arg(store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Scales the non-zero byte limits of `cfg` down, in proportion, until
/// they fill at most 90% of `max_storage` (the rest is left to the streams
/// and buckets without a byte limit: pages in flight, progress, results
/// index); each keeps at least 1 MiB. Returns what changed, or `None`.
pub fn fit_limits(cfg: &mut NatsConfig, max_storage: u64) -> Option<String> {
    const MIB: u64 = 1 << 20;
    let budget = max_storage / 10 * 9;
    let limits = [
        ("nats.max_blob_bytes", &mut cfg.max_blob_bytes),
        ("nats.max_event_bytes", &mut cfg.max_event_bytes),
        ("nats.max_dead_letter_bytes", &mut cfg.max_dead_letter_bytes),
    ];
    let reserved: u64 = limits.iter().map(|(_, v)| **v).sum();
    if reserved <= budget {
        return None;
    }
    let mut changed = Vec::new();
    for (name, value) in limits {
        if *value == 0 {
            continue;
        }
        let scaled = u64::try_from(u128::from(*value) * u128::from(budget) / u128::from(reserved)).unwrap_or(0);
        let lowered = (scaled / MIB * MIB).max(MIB);
        changed.push(format!("{name} lowered from {} to {}", mib(*value), mib(lowered)));
        *value = lowered;
    }
    Some(changed.join(", "))
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_fit_are_kept_and_others_scaled_to_nine_tenths() {
        let mut cfg = NatsConfig::default();
        let before = cfg.clone();
        assert_eq!(fit_limits(&mut cfg, 100 << 30), None);
        assert_eq!(cfg, before);
        // 9.25 GiB of limits on a server that can hold 5 GiB.
        let msg = fit_limits(&mut cfg, 5 << 30).expect("lowered");
        let total = cfg.max_blob_bytes + cfg.max_event_bytes + cfg.max_dead_letter_bytes;
        assert!(total <= (5u64 << 30) / 10 * 9 && total > 4 << 30, "{total}");
        assert!(cfg.max_blob_bytes > 4 * cfg.max_event_bytes, "{cfg:?}");
        assert!(msg.contains("nats.max_blob_bytes lowered from 8192 MiB to"), "{msg}");
        // No limit (0) stays no limit and reserves nothing.
        let mut unbounded = NatsConfig { max_blob_bytes: 0, ..NatsConfig::default() };
        fit_limits(&mut unbounded, 1 << 30).expect("lowered");
        assert_eq!(unbounded.max_blob_bytes, 0);
        assert!(unbounded.max_event_bytes + unbounded.max_dead_letter_bytes <= (1u64 << 30) / 10 * 9);
        // A tiny store still gets a usable 1 MiB each.
        let mut tiny = NatsConfig::default();
        fit_limits(&mut tiny, 1 << 20);
        assert_eq!(
            (tiny.max_blob_bytes, tiny.max_event_bytes, tiny.max_dead_letter_bytes),
            (1 << 20, 1 << 20, 1 << 20)
        );
    }

    #[test]
    fn the_embedded_server_reports_its_storage_limit() {
        let server = NatsServer::start().unwrap();
        let max = server.max_storage().unwrap();
        assert!(max > 0, "{max}");
        let mut cfg = NatsConfig { max_blob_bytes: max * 2, ..NatsConfig::default() };
        let msg = server.fit_limits(&mut cfg).unwrap().expect("twice the store is lowered");
        assert!(msg.contains(&server.store_dir().display().to_string()), "{msg}");
        assert!(cfg.max_blob_bytes + cfg.max_event_bytes + cfg.max_dead_letter_bytes <= max);
    }

    #[test]
    fn free_ports_are_bindable_distinct_and_outside_the_ephemeral_range() {
        let ephemeral: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .map(|s| s.split_whitespace().next().unwrap().parse().unwrap())
            .unwrap_or(32_768);
        let ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        for p in &ports {
            assert!((10_000..ephemeral).contains(p), "port {p}, ephemeral ports from {ephemeral}");
            TcpListener::bind(("127.0.0.1", *p)).unwrap();
        }
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert!(distinct.len() >= 18, "{ports:?}");
    }
}
