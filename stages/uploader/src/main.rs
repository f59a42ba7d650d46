//! `uploader` binary: writes page results and manifests to a directory or S3.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_uploader::binary().await
}
