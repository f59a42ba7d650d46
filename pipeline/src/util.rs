//! Small helpers shared by stages.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Current UTC time, RFC 3339 with sub-second precision.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).expect("RFC 3339 formatting of now")
}

/// A list setting (`#[serde(deserialize_with = "…::util::list")]`): a
/// TOML array of strings, or one comma-separated string (what an
/// environment variable holds); blank entries are dropped.
pub fn list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match <Raw as serde::Deserialize>::deserialize(d)? {
        Raw::One(s) => s.split(',').map(str::to_string).collect(),
        Raw::Many(v) => v,
    };
    Ok(items.into_iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect())
}

/// glibc gives a thread that allocates while another holds the malloc lock
/// an arena of its own (up to 8 per core) and keeps what is freed there for
/// that arena: with ONNX Runtime's threads beside tokio's that raised
/// `pagestream run`'s peak RSS from ~320 to ~390 MiB on the 152-page mix
/// (BENCHMARKS.md, "Memory"). glibc reads the cap, `MALLOC_ARENA_MAX`, once
/// when the process starts, so when it is unset this executes the program
/// again with `MALLOC_ARENA_MAX=2` — same pid, arguments and `argv[0]` —
/// and never returns; a cap the user set (`MALLOC_ARENA_MAX`, or
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`) is kept. Call it early (the
/// stages: when their configuration is read).
pub fn cap_malloc_arenas() {
    use std::os::unix::process::CommandExt as _;
    let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc.arena_max"));
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || std::env::var_os("MALLOC_ARENA_MAX").is_some() || tuned {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe).arg0(argv0).args(args).env("MALLOC_ARENA_MAX", "2").exec();
    eprintln!("could not execute {} again with MALLOC_ARENA_MAX=2 ({err}); running without the cap", exe.display());
}

/// Initialises logging: `PAGESTREAM_LOG` (or `RUST_LOG`) filter, default
/// `info`; `PAGESTREAM_LOG_FORMAT=json` writes one JSON object per line (for
/// log shippers), anything else plain text — coloured only on a terminal,
/// so a log file or a pipe never gets escape codes.
pub fn init_tracing() {
    init_tracing_for("pagestream");
}

/// Logs as [`init_tracing`], and exports traces as `service` when
/// `PAGESTREAM_OTLP_ENDPOINT` is set ([`crate::telemetry`]; call it inside
/// the Tokio runtime). Log lines inside a message's span carry its stage,
/// `doc_id` and `page`.
pub fn init_tracing_for(service: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = std::env::var("PAGESTREAM_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,async_nats=warn,aws=warn,hyper=warn".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match log_format(std::env::var("PAGESTREAM_LOG_FORMAT").ok().as_deref()) {
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).boxed(),
        LogFormat::Text => fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
    };
    // Traces: pagestream's own spans, whatever the log filter says.
    let traces = crate::telemetry::otlp_layer(service)
        .map(|l| l.with_filter(Targets::new().with_target("pagestream", tracing::Level::INFO)));
    let _ = tracing_subscriber::registry().with(fmt.with_filter(EnvFilter::new(filter))).with(traces).try_init();
}

#[derive(Debug, PartialEq)]
enum LogFormat {
    Text,
    Json,
}

fn log_format(value: Option<&str>) -> LogFormat {
    match value.map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// Base64 with padding (RFC 4648): the standard alphabet, or the URL-safe
/// one (`-`, `_`: how the object store names an object's metadata subject).
pub fn base64(bytes: &[u8], url_safe: bool) -> String {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i > chunk.len() {
                out.push('=');
                continue;
            }
            let c = STD[((n >> (18 - 6 * i)) & 63) as usize];
            out.push(match (url_safe, c) {
                (true, b'+') => '-',
                (true, b'/') => '_',
                (_, c) => c as char,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_format_is_json_only_when_asked() {
        use super::{log_format, LogFormat};
        assert_eq!(log_format(Some("json")), LogFormat::Json);
        assert_eq!(log_format(Some(" JSON ")), LogFormat::Json);
        assert_eq!(log_format(Some("text")), LogFormat::Text);
        assert_eq!(log_format(Some("")), LogFormat::Text);
        assert_eq!(log_format(None), LogFormat::Text);
    }

    #[test]
    fn base64_matches_rfc4648() {
        use super::base64;
        assert_eq!(base64(b"", false), "");
        assert_eq!(base64(b"f", false), "Zg==");
        assert_eq!(base64(b"fo", false), "Zm8=");
        assert_eq!(base64(b"foo", false), "Zm9v");
        assert_eq!(base64(b"foob", false), "Zm9vYg==");
        assert_eq!(base64(&[0xfb, 0xff], false), "+/8=");
        assert_eq!(base64(&[0xfb, 0xff], true), "-_8=");
        assert_eq!(base64(b"uploads/0192", true), "dXBsb2Fkcy8wMTky");
    }
}
