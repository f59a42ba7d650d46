//! DNS rebinding (issue #22, finding 3), with a real ingress process and
//! raw sockets: a web page on `evil.test` that made its name resolve to
//! `127.0.0.1` sends `Host: evil.test:<port>` and a matching `Origin`, so
//! the cross-origin check (Origin against Host) passes. The `Host`
//! allowlist (`ingress.allowed_hosts`) answers it 421 `misdirected_request`
//! and stores nothing; the loopback names the web page and the CLI use keep
//! working, and the probes answer whatever the host.
//!
//! Runs the ingress binary: `cargo build --bins` first.

use std::time::Duration;

use pagestream_e2e::ingress::IngressProc;
use pagestream_e2e::repo_root;
use pagestream_pipeline::nats::Names;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One ingress process on a private NATS server.
struct Api(IngressProc);

impl std::ops::Deref for Api {
    type Target = IngressProc;
    fn deref(&self) -> &IngressProc {
        &self.0
    }
}

impl Api {
    async fn start(prefix: &str, env: &[(&str, &str)]) -> Api {
        Api(IngressProc::start(prefix, env).await)
    }

    /// One request over a fresh connection, with exactly these headers:
    /// the status and the JSON body (`Null` when not JSON).
    async fn send(&self, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut s = self.connect().await;
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer)).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// `curl -H 'Host: <host>' -H 'Origin: http://<host>' -F file=@c03-29.pdf …/v1/documents`.
    async fn upload_as(&self, host: &str) -> (u16, Value) {
        let pdf = std::fs::read(repo_root().join("samples/c03-29.pdf")).unwrap();
        let mut form = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.pdf\"\r\nContent-Type: application/pdf\r\n\r\n".to_vec();
        form.extend_from_slice(&pdf);
        form.extend_from_slice(b"\r\n--XyZ--\r\n");
        let headers = [
            ("Host", host.to_string()),
            ("Origin", format!("http://{host}")),
            ("Content-Type", "multipart/form-data; boundary=XyZ".into()),
        ];
        self.send("POST", "/v1/documents", &headers, &form).await
    }

    /// Messages and bytes in the blob store's stream and in the documents stream.
    async fn stored(&self) -> [(u64, u64); 2] {
        [self.store().await, self.stream_state(Names::new(&self.prefix).docs_stream()).await]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_page_gets_421_and_stores_nothing() {
    let api = Api::start("rebind", &[]).await;
    let port = api.port;
    let baseline = api.stored().await;

    // The attack: the page's own name, with a matching Origin.
    let evil = format!("evil.test:{port}");
    let (status, body) = api.upload_as(&evil).await;
    println!("upload with Host {evil}: {status} {body}");
    assert_eq!((status, body["error"]["code"].as_str()), (421, Some("misdirected_request")), "{body}");
    // Reading is refused too (a rebinding page could read what it may not write).
    for path in ["/v1/documents", "/v1/models", "/", "/openapi.json"] {
        let (status, body) = api.send("GET", path, &[("Host", evil.clone())], b"").await;
        assert_eq!(status, 421, "GET {path} with Host {evil}: {body}");
    }
    let (status, _) =
        api.send("DELETE", "/v1/documents/0190f5d0-0000-7000-8000-000000000000", &[("Host", evil.clone())], b"").await;
    assert_eq!(status, 421);
    // Probes answer orchestrators and scrapers by any name.
    for path in ["/livez", "/readyz", "/metrics"] {
        let (status, _) = api.send("GET", path, &[("Host", evil.clone())], b"").await;
        assert_eq!(status, 200, "GET {path} with Host {evil}");
    }
    assert_eq!(api.stored().await, baseline, "a refused request left something in NATS");
    let (status, list) = api.send("GET", "/v1/documents", &[("Host", format!("127.0.0.1:{port}"))], b"").await;
    assert_eq!((status, list["documents"].as_array().map(Vec::len)), (200, Some(0)), "{list}");

    // The names the web page and the CLI use keep working, with a port or without.
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "localhost".into()] {
        let (status, body) = api.upload_as(&host).await;
        assert_eq!(status, 202, "upload with Host {host}: {body}");
    }
    let (status, list) = api.send("GET", "/v1/documents", &[("Host", format!("[::1]:{port}"))], b"").await;
    assert_eq!((status, list["documents"].as_array().map(Vec::len)), (200, Some(3)), "{list}");
    // The cross-origin check still applies between allowed names.
    let headers = [("Host", format!("127.0.0.1:{port}")), ("Origin", format!("http://localhost:{port}"))];
    let (status, body) = api.send("DELETE", "/v1/documents/0190f5d0-0000-7000-8000-000000000000", &headers, b"").await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("cross_origin")), "{body}");
    assert!(api.cluster.count_in_logs("allowed_hosts") > 0, "the start-up log names the allowed hosts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_hosts_replace_the_default() {
    let api =
        Api::start("rebind-conf", &[("PAGESTREAM_INGRESS_ALLOWED_HOSTS", "pagestream.example, *.corp.example")]).await;
    let port = api.port;
    for (host, want) in [
        (format!("pagestream.example:{port}"), 200),
        (format!("ocr.corp.example:{port}"), 200),
        (format!("127.0.0.1:{port}"), 421),
        (format!("evil.test:{port}"), 421),
    ] {
        let (status, body) = api.send("GET", "/v1/models", &[("Host", host.clone())], b"").await;
        assert_eq!(status, want, "Host {host}: {body}");
    }
    let (status, _) = api.send("GET", "/readyz", &[("Host", "evil.test".into())], b"").await;
    assert_eq!(status, 200);

    // `*` answers any host (a deployment behind a proxy that checks names).
    let any = Api::start("rebind-any", &[("PAGESTREAM_INGRESS_ALLOWED_HOSTS", "*")]).await;
    let (status, body) = any.upload_as(&format!("evil.test:{}", any.port)).await;
    assert_eq!(status, 202, "{body}");
}
