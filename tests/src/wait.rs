//! Waiting with a deadline: the polling loops of the tests, written once.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// Calls `probe` until it returns `Ok`, sleeping `every` between calls;
/// once `within` has passed, panics with its last `Err`.
pub async fn until<T, E: Display>(within: Duration, every: Duration, probe: impl AsyncFnMut() -> Result<T, E>) -> T {
    until_with(within, every, probe, String::new).await
}

/// [`until`], the panic also showing `context()` (e.g. the processes'
/// logs: read only then).
pub async fn until_with<T, E: Display>(
    within: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(done) => return done,
            Err(why) => assert!(Instant::now() < deadline, "{why} (waited {within:?})\n{}", context()),
        }
        tokio::time::sleep(every).await;
    }
}

/// Calls `probe` until `done` holds for its value, sleeping `every` between
/// calls, for at most `within`; returns the last value, done or not (the
/// caller asserts on it).
pub async fn settle<T>(
    within: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let value = probe().await;
        if done(&value) || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(every).await;
    }
}
