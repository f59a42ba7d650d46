//! `notifier` binary: delivers webhooks for document and page events.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_pipeline::bin::run_stage(
        pagestream_notifier::STAGE,
        "notifier — delivers signed webhooks (Standard Webhooks) for document and page events",
        |sources| sources.section::<pagestream_notifier::NotifierConfig>(),
        |c| c.admin_addr.clone(),
        pagestream_notifier::run,
    )
    .await
}
