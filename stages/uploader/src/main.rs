//! `uploader` binary: writes page results and manifests to a directory or S3.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_pipeline::bin::run_stage(
        pagestream_uploader::STAGE,
        "uploader — writes page images, detections and manifests (local directory or S3)",
        |sources| sources.section::<pagestream_uploader::UploaderConfig>(),
        |c| c.admin_addr.clone(),
        pagestream_uploader::run,
    )
    .await
}
