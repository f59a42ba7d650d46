//! One shutdown root: SIGTERM or SIGINT cancels a token that every task
//! watches; a second signal, or the grace period running out, forces exit.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Seconds in-flight work gets after the first signal.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Exit code when the grace period ran out.
pub const EXIT_GRACE_EXPIRED: i32 = 70;

/// Returns a token cancelled on the first SIGTERM/SIGINT. A second signal or
/// `grace` after the first exits the process with [`EXIT_GRACE_EXPIRED`].
pub fn on_signals(grace: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(?grace, "shutdown requested: finishing in-flight work");
        t.cancel();
        tokio::select! {
            _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
            _ = tokio::time::sleep(grace) => tracing::warn!("grace period over: exiting"),
        }
        std::process::exit(EXIT_GRACE_EXPIRED);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
