//! `notifier` binary: delivers webhooks for document and page events.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_notifier::binary().await
}
