//! Served models: `GET /v1/models` (the live registry, grouped by model) and
//! the check that refuses a document whose model no live replica serves.

use http::StatusCode;
use pagestream_pipeline::registry::{ModelChoice, ServedModel};
use pagestream_schemas::SubmitOptions;

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

    /// The model a new document gets ([`resolve_model`](pagestream_pipeline::registry::resolve_model):
    /// its `model` option, else the default). A model asked for by name
    /// that no live replica serves is refused with 422 `model_unavailable`
    /// (a typo, a fleet that is down) unless the submitter asked to wait;
    /// a document for the default model waits (while its fleet starts, say).
    pub(crate) fn resolve_model(&self, opts: &SubmitOptions) -> Result<ModelChoice, ApiError> {
        let choice = self.live.resolve(
            opts.model.as_deref(),
            opts.wait_for_model.unwrap_or(false),
            self.ctx.config.default_model(),
        );
        if !choice.unavailable() {
            return Ok(choice);
        }
        let served: Vec<String> = self.live.models().into_keys().collect();
        let list = if served.is_empty() { "none right now".to_string() } else { served.join(", ") };
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "model_unavailable",
            format!(
                "no live inferencer serves model {:?} (served: {list}); \
                 pick one of GET /v1/models, or send wait_for_model=true to wait for a replica",
                choice.model
            ),
        ))
    }
}

/// How far back throughput is measured for `GET /v1/capacity`.
pub const THROUGHPUT_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

impl Ingress {
    /// `GET /v1/capacity`: the caller's tenant's usage against each of its
    /// limits (admins: every tenant with work, and every tenant named in
    /// `tenants.overrides`), the queue (documents queued or running, pages
    /// in flight), the pipeline's measured throughput and the wait it
    /// implies for a new document.
    pub(crate) async fn capacity(&self, caller: &crate::Caller) -> Result<Resp, ApiError> {
        use pagestream_pipeline::progress::count_events_since;
        use pagestream_pipeline::records::DocRecords;
        let unavailable = |e: &dyn std::fmt::Display| ApiError::unavailable(format!("reading capacity: {e:#}"));
        let records = DocRecords::new(&self.ctx.counters);
        let active = records.active_by_tenant().await.map_err(|e| unavailable(&e))?;
        let mut tenants: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        tenants.insert(caller.tenant().to_string());
        if caller.admin {
            tenants.extend(active.keys().cloned());
            let config = &self.ctx.config.tenants;
            tenants.extend(config.overrides.iter().filter_map(|o| o.split_whitespace().next().map(str::to_string)));
        }
        let mut rows = Vec::new();
        for tenant in &tenants {
            let owner = (tenant != pagestream_pipeline::tenants::ANONYMOUS).then_some(tenant.as_str());
            let limits = self.ctx.config.tenants.limits_for(owner);
            let pages_last_hour: u64 = records
                .pages_within(tenant, std::time::Duration::from_secs(3600))
                .await
                .map_err(|e| unavailable(&e))?
                .iter()
                .map(|(_, n)| u64::from(*n))
                .sum();
            rows.push(serde_json::json!({
                "tenant": tenant,
                "limits": {
                    "max_documents": limits.max_documents,
                    "pages_per_hour": limits.pages_per_hour,
                    "max_pages_in_flight": limits.max_pages_in_flight,
                    "weight": limits.weight,
                },
                "usage": {
                    "documents": active.get(tenant).copied().unwrap_or(0),
                    "pages_last_hour": pages_last_hour,
                },
            }));
        }
        let (js, names) = (&self.ctx.js, &self.ctx.names);
        let mut pages_in_flight = 0u64;
        for stream in [names.pages_stream(), names.inferred_stream()] {
            let mut s = js.get_stream(&stream).await.map_err(|e| unavailable(&e))?;
            pages_in_flight += s.info().await.map_err(|e| unavailable(&e))?.state.messages;
        }
        let documents: usize = active.values().sum();
        let prefix = &names.prefix;
        let (pages, finished) = tokio::try_join!(
            count_events_since(js, names, format!("{prefix}.events.*.page.uploaded.*"), THROUGHPUT_WINDOW),
            count_events_since(js, names, format!("{prefix}.events.*.doc.completed"), THROUGHPUT_WINDOW),
        )
        .map_err(|e| unavailable(&e))?;
        let window = THROUGHPUT_WINDOW.as_secs_f64();
        let pages_per_sec = pages as f64 / window;
        // Pages still to come: those in flight, plus the documents queued
        // or running at the mean size of those finished in the window.
        let mean_pages = if finished > 0 { pages as f64 / finished as f64 } else { 1.0 };
        let estimated_wait_secs = (pages_per_sec > 0.0)
            .then(|| ((pages_in_flight as f64 + documents as f64 * mean_pages) / pages_per_sec).ceil());
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "tenant": caller.tenant(),
                "tenants": rows,
                "queue": {"documents": documents, "pages_in_flight": pages_in_flight},
                "throughput": {
                    "window_secs": THROUGHPUT_WINDOW.as_secs(),
                    "pages": pages,
                    "documents": finished,
                    "pages_per_sec": (pages_per_sec * 1000.0).round() / 1000.0,
                },
                "estimated_wait_secs": estimated_wait_secs,
            }),
        ))
    }
}
