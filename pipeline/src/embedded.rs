//! A private `nats-server` with JetStream, for the local mode, the demo and
//! the tests: temp storage directory, free ports, killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::config::deps_dir;

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

#[cfg(test)]
mod tests {
    use super::*;

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
