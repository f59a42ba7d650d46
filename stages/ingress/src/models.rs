//! Served models: `GET /v1/models` (the live registry, grouped by model) and
//! the check that refuses a document whose model no live replica serves.

use http::StatusCode;
use pagestream_pipeline::registry::ServedModel;

use crate::error::{json_response, ApiError, Resp};
use crate::Ingress;

/// The public JSON of one served model.
fn model_json(m: &ServedModel) -> serde_json::Value {
    let mut backends: Vec<&str> = m.replicas.iter().map(|r| r.backend.as_str()).collect();
    backends.sort_unstable();
    backends.dedup();
    let mut devices: Vec<&str> = m.replicas.iter().map(|r| r.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    let labels = m.replicas.iter().find(|r| !r.canary).or(m.replicas.first()).map(|r| r.labels.clone());
    serde_json::json!({
        "name": m.name,
        "replicas": m.replicas.len(),
        "canary_replicas": m.replicas.iter().filter(|r| r.canary).count(),
        "sha256": m.weights(),
        "labels": labels.unwrap_or_default(),
        "backends": backends,
        "devices": devices,
        "instances": m.replicas.iter().map(|r| serde_json::json!({
            "replica": r.replica,
            "host": r.host,
            "sha256": r.sha256,
            "backend": r.backend,
            "device": r.device,
            "batch_size": r.batch_size,
            "canary": r.canary,
            "started_at": r.started_at,
        })).collect::<Vec<_>>(),
    })
}

impl Ingress {
    /// `GET /v1/models`: every model a live inferencer serves, and the default.
    pub(crate) fn models(&self) -> Result<Resp, ApiError> {
        let models: Vec<serde_json::Value> = self.live.models().values().map(model_json).collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"default": self.ctx.config.default_model(), "models": models}),
        ))
    }

    /// The model a new document gets: `asked`, else the default. A model
    /// asked for by name that no live replica serves is refused with 422
    /// `model_unavailable` (a typo, a fleet that is down) unless the
    /// submitter asked to wait; the default model is the deployment's own
    /// promise, so a document for it waits (while its fleet starts, say).
    /// Returns the model, its fleet's weights when they agree on one, and
    /// whether the document waits for a replica if none is live.
    pub(crate) fn resolve_model(
        &self,
        asked: Option<&str>,
        wait: bool,
    ) -> Result<(String, Option<String>, bool), ApiError> {
        let model = asked.unwrap_or(self.ctx.config.default_model()).to_string();
        let wait = wait || asked.is_none();
        match self.live.get(&model) {
            Some(fleet) => {
                let sha = match fleet.weights()[..] {
                    [one] => Some(one.to_string()),
                    _ => None,
                };
                Ok((model, sha, wait))
            }
            None if wait => Ok((model, None, wait)),
            None => {
                let served: Vec<String> = self.live.models().into_keys().collect();
                let list = if served.is_empty() { "none right now".to_string() } else { served.join(", ") };
                Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "model_unavailable",
                    format!(
                        "no live inferencer serves model {model:?} (served: {list}); \
                         pick one of GET /v1/models, or send wait_for_model=true to wait for a replica"
                    ),
                ))
            }
        }
    }
}
