//! `ingress` binary: the HTTP API.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pagestream_ingress::binary().await
}
