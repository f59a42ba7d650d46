//! The API as the tests use it: a document's status, submissions whose
//! acceptance is asserted, `/metrics` read as text.

use std::path::Path;

use pagestream::client::{Answer, ApiClient};
use serde_json::{json, Value};

use crate::corpus;

/// `GET /v1/documents/{id}`'s JSON, whatever the answer's status.
pub async fn status(client: &ApiClient, id: &str) -> Value {
    client.get(&format!("/v1/documents/{id}")).await.unwrap().json
}

/// `GET /v1/documents/{id}`'s JSON, asserting that the document is known
/// (a 2xx answer).
pub async fn status_ok(client: &ApiClient, id: &str) -> Value {
    let ans = client.get(&format!("/v1/documents/{id}")).await.unwrap();
    assert!(ans.status.is_success(), "{}", ans.json);
    ans.json
}

/// Whether a status JSON's `state` is terminal.
pub fn is_terminal(status: &Value) -> bool {
    pagestream::client::is_terminal(status["state"].as_str().unwrap_or(""))
}

/// The id of a submission, asserting that it was accepted (202).
pub fn accepted(ans: &Answer) -> String {
    assert_eq!(ans.status, 202, "{}", ans.json);
    ans.json["id"].as_str().unwrap().to_string()
}

/// Streams the PDF at `file` (raw body, the file name as title, query
/// `options`); asserts 202 and returns the document's id.
pub async fn submit(client: &ApiClient, file: &Path, options: &[(&str, String)]) -> String {
    accepted(&client.submit_file_with(file, None, options, None).await.unwrap())
}

/// Uploads the corpus PDF `pdf` as `multipart/form-data` with `fields`;
/// asserts 202 and returns the document's id.
pub async fn upload(client: &ApiClient, pdf: &str, fields: &[(&str, &str)]) -> String {
    let (status, json) = upload_answer(client, pdf, fields).await;
    assert_eq!(status, 202, "{json}");
    json["id"].as_str().unwrap().to_string()
}

/// [`upload`] without the assertion: the answer's status and JSON.
pub async fn upload_answer(client: &ApiClient, pdf: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    let bytes = std::fs::read(corpus(pdf)).unwrap();
    let ans = client.submit_multipart(pdf, bytes, fields).await.unwrap();
    (ans.status.as_u16(), ans.json)
}

/// `POST /v1/documents` with `{"url": url}` (and `"options"` when given):
/// the answer's status and JSON.
pub async fn by_url(client: &ApiClient, url: &str, options: Option<Value>) -> (u16, Value) {
    let body = match options {
        Some(options) => json!({ "url": url, "options": options }),
        None => json!({ "url": url }),
    };
    let ans = client.post_json("/v1/documents", &body, None).await.unwrap();
    (ans.status.as_u16(), ans.json)
}

/// `GET /metrics` as text (`None`: no answer), whatever the status.
pub async fn try_metrics_text(client: &ApiClient) -> Option<String> {
    let (_, body) = client.get_bytes("/metrics").await.ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// `GET /metrics` of the admin port `port` on this machine, whatever the
/// status.
pub async fn admin_metrics(port: u16) -> String {
    try_metrics_text(&ApiClient::new(format!("http://127.0.0.1:{port}"))).await.expect("an answer from /metrics")
}

/// `GET /metrics` as text, asserting a 200 answer.
pub async fn metrics_text(client: &ApiClient) -> String {
    let (status, body) = client.get_bytes("/metrics").await.unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the series `series` (its name and labels exactly as
/// exported, e.g. `pagestream_pages_total{stage="splitter"}`) in `text`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse::<f64>().unwrap())
}

/// Every series of the metric family `name` with one label: (label value,
/// value), e.g. `pagestream_model_pages_total{model="…"}`.
pub fn metric_by_label(text: &str, name: &str, label: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}{{{label}=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once("\"} "))
        .map(|(v, n)| (v.to_string(), n.trim().parse::<f64>().unwrap()))
        .collect()
}
