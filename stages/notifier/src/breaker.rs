//! Who may attempt a delivery now: a concurrency limit per endpoint (the
//! scheme, host and port of the callback URL) and per tenant (the
//! document's owner), and a circuit breaker per endpoint.
//!
//! The circuit opens after `notifier.breaker_failures` consecutive failed
//! attempts (network errors, timeouts, 408, 429, 5xx) of which one was a
//! retry, or which span at least [`STREAK_MIN`] — so a burst of first
//! attempts that their retries then deliver does not open it. While open, the endpoint's deliveries are not
//! attempted: they are scheduled for after the cool-down
//! (`notifier.breaker_cooldown_secs`). Then one delivery is let through as
//! a probe (half-open): a success closes the circuit, a failure opens it for
//! another cool-down. Any success closes it. State is per notifier process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagestream_schemas::ErrorInfo;

/// The shortest streak of failures that opens a circuit.
pub const STREAK_MIN: Duration = Duration::from_secs(5);

/// The limits and breaker settings (from `notifier.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub per_endpoint: usize,
    /// 0: no limit.
    pub per_owner: usize,
    pub failures: u32,
    pub cooldown: Duration,
    /// How long a delivery waits for a probe in flight (its attempt timeout).
    pub probe_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Endpoint {
    active: usize,
    failures: u32,
    streak_since: Option<Instant>,
    /// A retry (not a first attempt) failed in the current streak.
    retry_failed: bool,
    circuit: Circuit,
    last_error: Option<ErrorInfo>,
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint {
            active: 0,
            failures: 0,
            streak_since: None,
            retry_failed: false,
            circuit: Circuit::Closed,
            last_error: None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<String, Endpoint>,
    owners: HashMap<String, usize>,
    /// Endpoints whose circuit is not closed.
    open: usize,
}

impl State {
    fn set_circuit(&mut self, endpoint: &str, to: Circuit) {
        let Some(ep) = self.endpoints.get_mut(endpoint) else { return };
        let was_closed = ep.circuit == Circuit::Closed;
        ep.circuit = to;
        match (was_closed, to == Circuit::Closed) {
            (true, false) => self.open += 1,
            (false, true) => self.open -= 1,
            _ => {}
        }
        metrics::gauge!("pagestream_webhook_circuits_open").set(self.open as f64);
    }
}

/// The answer to "may I attempt now?".
#[derive(Debug)]
pub enum Admit {
    /// Yes: attempt, then [`Permit::finish`].
    Go(Permit),
    /// The endpoint's circuit is open: not before `retry_in`.
    Open { retry_in: Duration, last_error: Option<ErrorInfo> },
    /// The endpoint or the tenant has as many deliveries in flight as allowed.
    Busy,
}

/// Limits and breakers of one notifier process.
#[derive(Debug, Clone)]
pub struct Limits {
    settings: Settings,
    state: Arc<Mutex<State>>,
}

/// One admitted attempt; dropping it without [`Permit::finish`] frees its
/// slots without a verdict.
#[derive(Debug)]
pub struct Permit {
    state: Arc<Mutex<State>>,
    settings: Settings,
    endpoint: String,
    owner: String,
    probe: bool,
    finished: bool,
}

impl Limits {
    pub fn new(settings: Settings) -> Self {
        Limits { settings, state: Arc::default() }
    }

    /// Whether an attempt to `endpoint` for `owner` may start at `now`.
    pub fn admit(&self, endpoint: &str, owner: &str, now: Instant) -> Admit {
        let mut st = self.state.lock().expect("breaker state");
        let ep = st.endpoints.entry(endpoint.to_string()).or_default();
        let last_error = ep.last_error.clone();
        match ep.circuit {
            Circuit::Open { until } if now < until => return Admit::Open { retry_in: until - now, last_error },
            Circuit::Open { .. } => st.set_circuit(endpoint, Circuit::HalfOpen { probing: false }),
            Circuit::HalfOpen { probing: true } => {
                return Admit::Open { retry_in: self.settings.probe_wait, last_error };
            }
            _ => {}
        }
        let ep = st.endpoints.get_mut(endpoint).expect("just inserted");
        let active = ep.active;
        let probe = ep.circuit == (Circuit::HalfOpen { probing: false });
        let owner_active = st.owners.get(owner).copied().unwrap_or(0);
        if active >= self.settings.per_endpoint
            || (self.settings.per_owner > 0 && owner_active >= self.settings.per_owner)
        {
            return Admit::Busy;
        }
        if probe {
            st.set_circuit(endpoint, Circuit::HalfOpen { probing: true });
        }
        st.endpoints.get_mut(endpoint).expect("present").active += 1;
        *st.owners.entry(owner.to_string()).or_default() += 1;
        Admit::Go(Permit {
            state: self.state.clone(),
            settings: self.settings.clone(),
            endpoint: endpoint.to_string(),
            owner: owner.to_string(),
            probe,
            finished: false,
        })
    }

    /// Whether `endpoint`'s circuit is open or half-open now (tests, logs).
    pub fn is_open(&self, endpoint: &str) -> bool {
        let st = self.state.lock().expect("breaker state");
        st.endpoints.get(endpoint).is_some_and(|e| e.circuit != Circuit::Closed)
    }
}

impl Permit {
    /// Whether this attempt is the probe of a half-open circuit.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The attempt ended at `now`: `Ok(())` the endpoint answered (a 2xx,
    /// or a refusal that is no outage), `Err` it failed; `retry`: it was
    /// not the delivery's first attempt. Returns whether this failure
    /// opened the circuit.
    pub fn finish(mut self, result: Result<(), &ErrorInfo>, retry: bool, now: Instant) -> bool {
        self.finished = true;
        let mut st = self.state.lock().expect("breaker state");
        release(&mut st, &self.endpoint, &self.owner);
        let Some(ep) = st.endpoints.get_mut(&self.endpoint) else { return false };
        let mut opened = false;
        let to = match result {
            Ok(()) => {
                ep.failures = 0;
                ep.streak_since = None;
                ep.retry_failed = false;
                ep.last_error = None;
                Some(Circuit::Closed)
            }
            Err(error) => {
                ep.failures += 1;
                ep.retry_failed |= retry;
                let since = *ep.streak_since.get_or_insert(now);
                let outage = ep.retry_failed || now.duration_since(since) >= STREAK_MIN;
                ep.last_error = Some(error.clone());
                match ep.circuit {
                    Circuit::HalfOpen { .. } if self.probe => {
                        Some(Circuit::Open { until: now + self.settings.cooldown })
                    }
                    Circuit::Closed if ep.failures >= self.settings.failures && outage => {
                        opened = true;
                        Some(Circuit::Open { until: now + self.settings.cooldown })
                    }
                    _ => None,
                }
            }
        };
        if let Some(to) = to {
            st.set_circuit(&self.endpoint, to);
        }
        if opened {
            metrics::counter!("pagestream_webhook_circuit_opened_total").increment(1);
        }
        forget_if_idle(&mut st, &self.endpoint);
        opened
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.state.lock().expect("breaker state");
        release(&mut st, &self.endpoint, &self.owner);
        if self.probe {
            st.set_circuit(&self.endpoint, Circuit::HalfOpen { probing: false });
        }
        forget_if_idle(&mut st, &self.endpoint);
    }
}

fn release(st: &mut State, endpoint: &str, owner: &str) {
    if let Some(ep) = st.endpoints.get_mut(endpoint) {
        ep.active = ep.active.saturating_sub(1);
    }
    if let Some(n) = st.owners.get_mut(owner) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            st.owners.remove(owner);
        }
    }
}

/// An endpoint with nothing in flight, a closed circuit and no failures
/// has nothing worth remembering.
fn forget_if_idle(st: &mut State, endpoint: &str) {
    if st.endpoints.get(endpoint).is_some_and(|e| e.active == 0 && e.circuit == Circuit::Closed && e.failures == 0) {
        st.endpoints.remove(endpoint);
    }
}

/// The endpoint of a callback URL: `scheme://host:port`, lowercased, the
/// port explicit (80 / 443 by default).
pub fn endpoint_of(url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else { return url.to_ascii_lowercase() };
    let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let host = uri.host().unwrap_or("").to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    format!("{scheme}://{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(Settings {
            per_endpoint: 2,
            per_owner: 3,
            failures: 3,
            cooldown: Duration::from_secs(30),
            probe_wait: Duration::from_secs(10),
        })
    }

    fn go(a: Admit) -> Permit {
        match a {
            Admit::Go(p) => p,
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn endpoints_are_scheme_host_and_port() {
        assert_eq!(endpoint_of("https://Hooks.Example.com/a?b"), "https://hooks.example.com:443");
        assert_eq!(endpoint_of("http://127.0.0.1:9000/x"), "http://127.0.0.1:9000");
        assert_eq!(endpoint_of("http://[::1]/x"), "http://[::1]:80");
    }

    #[test]
    fn concurrency_is_limited_per_endpoint_and_per_owner() {
        let l = limits();
        let now = Instant::now();
        let a1 = go(l.admit("a", "t1", now));
        let _a2 = go(l.admit("a", "t1", now));
        assert!(matches!(l.admit("a", "t2", now), Admit::Busy), "endpoint a is full");
        let _b1 = go(l.admit("b", "t1", now));
        assert!(matches!(l.admit("c", "t1", now), Admit::Busy), "tenant t1 is full");
        let _c1 = go(l.admit("c", "t2", now));
        drop(a1);
        let _a3 = go(l.admit("a", "t2", now));
    }

    #[test]
    fn the_circuit_opens_after_a_streak_then_probes_once_and_closes() {
        let l = limits();
        let t0 = Instant::now();
        let err = ErrorInfo::new("callback_status", "503");
        // Three failures within a second: a burst, not yet an outage.
        for i in 0..3 {
            assert!(!go(l.admit("a", "t", t0)).finish(Err(&err), false, t0 + Duration::from_millis(i * 300)));
        }
        assert!(!l.is_open("a"));
        // A fourth, 6 s into the streak, opens it.
        let t1 = t0 + Duration::from_secs(6);
        assert!(go(l.admit("a", "t", t1)).finish(Err(&err), false, t1));
        assert!(l.is_open("a"));
        match l.admit("a", "t", t1 + Duration::from_secs(1)) {
            Admit::Open { retry_in, last_error } => {
                assert_eq!(retry_in, Duration::from_secs(29));
                assert_eq!(last_error.unwrap().code, "callback_status");
            }
            other => panic!("{other:?}"),
        }
        // Other endpoints are not concerned.
        drop(go(l.admit("b", "t", t1)));
        // After the cool-down: one probe; others wait for it.
        let t2 = t1 + Duration::from_secs(31);
        let probe = go(l.admit("a", "t", t2));
        assert!(probe.is_probe());
        assert!(matches!(l.admit("a", "t", t2), Admit::Open { .. }));
        // The probe fails: open again for a cool-down.
        assert!(!probe.finish(Err(&err), false, t2));
        assert!(matches!(l.admit("a", "t", t2 + Duration::from_secs(29)), Admit::Open { .. }));
        // The next probe succeeds: closed.
        let t3 = t2 + Duration::from_secs(30);
        go(l.admit("a", "t", t3)).finish(Ok(()), false, t3);
        assert!(!l.is_open("a"));
        let _x = go(l.admit("a", "t", t3));
    }

    #[test]
    fn a_failed_retry_opens_the_circuit_without_waiting_for_the_streak() {
        let l = limits();
        let t0 = Instant::now();
        let err = ErrorInfo::new("callback_status", "503");
        for _ in 0..3 {
            assert!(!go(l.admit("a", "t", t0)).finish(Err(&err), false, t0), "first attempts: a burst");
        }
        assert!(go(l.admit("a", "t", t0)).finish(Err(&err), true, t0 + Duration::from_secs(1)), "a retry failed too");
        assert!(l.is_open("a"));
    }

    #[test]
    fn a_success_ends_the_streak_and_a_dropped_probe_frees_the_half_open_circuit() {
        let l = limits();
        let t0 = Instant::now();
        let err = ErrorInfo::new("callback_timeout", "slow");
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in [0, 4] {
            go(l.admit("a", "t", at(s))).finish(Err(&err), false, at(s));
        }
        go(l.admit("a", "t", at(9))).finish(Ok(()), false, at(9));
        go(l.admit("a", "t", at(10))).finish(Err(&err), false, at(10));
        assert!(!l.is_open("a"), "the streak started again at 1");
        for s in [20, 23] {
            go(l.admit("a", "t", at(s))).finish(Err(&err), false, at(s));
        }
        assert!(l.is_open("a"), "3 failures in a row over 13 s");
        let t1 = t0 + Duration::from_secs(100);
        drop(go(l.admit("a", "t", t1)));
        assert!(go(l.admit("a", "t", t1)).is_probe(), "a probe dropped without verdict lets another through");
    }
}
