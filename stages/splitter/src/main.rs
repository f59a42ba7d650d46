//! `splitter` binary: renders submitted PDFs page by page.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_pipeline::bin::run_stage(
        pagestream_splitter::STAGE,
        "splitter — renders each submitted PDF page by page (pdfium)",
        |sources| sources.section::<pagestream_splitter::SplitterConfig>(),
        |c| c.admin_addr.clone(),
        pagestream_splitter::run,
    )
    .await
}
