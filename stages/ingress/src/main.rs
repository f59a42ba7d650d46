//! `ingress` binary: the HTTP API.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_pipeline::bin::run_stage(
        pagestream_ingress::STAGE,
        "ingress — HTTP API: upload PDFs, follow their progress",
        pagestream_ingress::Settings::read,
        // The API listener serves /livez, /readyz and /metrics itself.
        |_| String::new(),
        pagestream_ingress::run,
    )
    .await
}
