//! Stage logs as operators collect them: plain text without escape codes
//! when stderr is not a terminal, one JSON object per line with
//! `PAGESTREAM_LOG_FORMAT=json`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagestream_e2e::procs::{base_env, bin_dir};
use pagestream_pipeline::embedded::NatsServer;

/// Starts the uploader with `format`, returns its first `n` stderr lines.
fn uploader_lines(nats: &NatsServer, format: Option<&str>, n: usize) -> Vec<String> {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin_dir().join("uploader"));
    cmd.envs(base_env(&nats.url(), "logs", out.path()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(f) = format {
        cmd.env("PAGESTREAM_LOG_FORMAT", f);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while lines.len() < n && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(lines.len(), n, "the uploader logged {lines:?}");
    lines
}

#[test]
fn logs_are_plain_text_off_a_terminal_and_json_when_asked() {
    let nats = NatsServer::start().unwrap();
    // "consuming" is logged once the stage is up.
    let text = uploader_lines(&nats, None, 1);
    assert!(text.iter().all(|l| !l.contains('\u{1b}')), "escape codes in a pipe: {text:?}");
    assert!(text[0].contains("INFO"), "{text:?}");

    let json = uploader_lines(&nats, Some("json"), 1);
    for line in &json {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["level"], "INFO", "{line}");
        assert!(v["message"].is_string() && v["target"].is_string() && v["timestamp"].is_string(), "{line}");
    }
}
