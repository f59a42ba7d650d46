//! `inferencer` binary: runs the detection model on rendered pages.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_pipeline::bin::run_stage(
        pagestream_inferencer::STAGE,
        "inferencer — runs the ONNX detection model on each rendered page",
        |sources| sources.section::<pagestream_inferencer::InferencerConfig>(),
        |c| c.admin_addr.clone(),
        pagestream_inferencer::run,
    )
    .await
}
