//! The binary fails at start with precise messages: bad configuration exits
//! 64 listing every problem; a missing libpdfium names the file and the
//! command that installs it.

use std::process::Command;

use pagestream_pipeline::embedded::NatsServer;

fn splitter() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_splitter"));
    c.env_remove("PAGESTREAM_CONFIG").env("PAGESTREAM_SPLITTER_ADMIN_ADDR", "");
    c
}

#[test]
fn bad_configuration_exits_64_listing_every_problem() {
    let out = splitter()
        .env("PAGESTREAM_SPLITTER_DPI", "high")
        .env("PAGESTREAM_SPLITTER_NOPE", "1")
        .env("PAGESTREAM_NATS_PREFIX", "Bad.Prefix")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PAGESTREAM_SPLITTER_DPI") && err.contains("splitter.nope"), "{err}");
}

#[test]
fn missing_pdfium_is_named_with_the_fix() {
    let nats = NatsServer::start().unwrap();
    let out = splitter()
        .env("PAGESTREAM_NATS_URL", nats.url())
        .env("PAGESTREAM_NATS_PREFIX", "startup")
        .env("PAGESTREAM_NATS_MAX_BLOB_BYTES", "67108864")
        .env("PAGESTREAM_SPLITTER_PDFIUM_LIBRARY", "/nonexistent/libpdfium.so")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/libpdfium.so") && err.contains("scripts/setup"), "{err}");
}
