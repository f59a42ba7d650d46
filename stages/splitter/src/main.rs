//! `splitter` binary: renders submitted PDFs page by page.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_splitter::binary().await
}
