//! Readiness latch: a process is ready when every component it registered
//! (NATS streams bound, pdfium loaded, model loaded, …) said so.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, bool>>>,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Health { components: Arc::default(), metrics }
    }

    /// Declares a component, not ready yet.
    pub fn register(&self, name: &str) {
        self.components.lock().expect("health lock").insert(name.into(), false);
        self.metrics.set_ready(false);
    }

    pub fn set_ready(&self, name: &str, ready: bool) {
        let mut c = self.components.lock().expect("health lock");
        c.insert(name.into(), ready);
        self.metrics.set_ready(c.values().all(|r| *r));
    }

    /// `None` when ready, else the components that are not.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let c = self.components.lock().expect("health lock");
        let waiting: Vec<String> = c.iter().filter(|(_, r)| !**r).map(|(n, _)| n.clone()).collect();
        if waiting.is_empty() && !c.is_empty() {
            None
        } else if c.is_empty() {
            Some(vec!["starting".into()])
        } else {
            Some(waiting)
        }
    }
}
