//! Small helpers shared by stages.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Current UTC time, RFC 3339 with sub-second precision.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).expect("RFC 3339 formatting of now")
}

/// Initialises logging: `PAGESTREAM_LOG` (or `RUST_LOG`) filter, default `info`.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PAGESTREAM_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,async_nats=warn,aws=warn,hyper=warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(EnvFilter::new(filter)).with_writer(std::io::stderr).try_init();
}
