//! `inferencer` binary: runs the detection model on rendered pages.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_inferencer::binary().await
}
