//! `tenants.max_pages_in_flight`: pages rendered and not yet finished
//! (uploaded or failed), all of one tenant's documents together.
//!
//! Each turn of a tenant with a limit records its document on
//! `<p>.active.<tenant>.<doc>.<page_count>` (stream `<P>_ACTIVE`, one
//! message per subject). Before each page, the splitter lists the tenant's
//! subjects (one stream-info request) and reads each document's counters
//! (three key reads, as the per-document bound does); a document whose
//! pages are all finished is purged from the list. Above the limit the turn
//! waits, then yields, exactly as at the per-document bound. Cost: nothing
//! for a tenant without a limit (the default).

use futures::TryStreamExt as _;
use pagestream_pipeline::consumer::StageError;
use pagestream_schemas::EventState;

use crate::Splitter;

/// Pages rendered and not yet finished (`done`: uploaded or failed), of a
/// document or a tenant.
pub(crate) fn in_flight(rendered: u32, done: u32) -> u32 {
    rendered.saturating_sub(done)
}

/// The document and page count of an active subject
/// (`<p>.active.<tenant>.<doc>.<page_count>`).
fn active_subject(subject: &str) -> Option<(&str, u32)> {
    let mut rest = subject.rsplitn(3, '.');
    let (Some(count), Some(doc)) = (rest.next(), rest.next()) else { return None };
    Some((doc, count.parse().ok()?))
}

/// What one active document of a tenant counts, from its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Active {
    /// Every page finished: it leaves the tenant's list.
    Finished,
    /// Its pages in flight.
    InFlight(u32),
}

fn active(page_count: u32, rendered: u32, done: u32) -> Active {
    if done >= page_count {
        Active::Finished
    } else {
        Active::InFlight(in_flight(rendered, done))
    }
}

impl Splitter {
    /// The limit of `owner`'s tenant (0: none).
    pub(crate) fn tenant_page_limit(&self, owner: Option<&str>) -> u32 {
        self.ctx.config.tenants.limits_for(owner).max_pages_in_flight
    }

    /// Records that `doc_id` of `tenant` has pages being split.
    pub(crate) async fn record_active(&self, tenant: &str, doc_id: &str, page_count: u32) -> Result<(), StageError> {
        let subject = self.ctx.names.active(tenant, doc_id, page_count);
        let ack = self.ctx.js.publish(subject, bytes::Bytes::new()).await.map_err(StageError::publish)?;
        ack.await.map_err(StageError::publish)?;
        Ok(())
    }

    /// Pages of `tenant` rendered and not yet uploaded or failed.
    pub(crate) async fn tenant_pages_in_flight(&self, tenant: &str) -> Result<u32, StageError> {
        let names = &self.ctx.names;
        let stream = self.ctx.js.get_stream(names.active_stream()).await.map_err(StageError::nats)?;
        let mut info = stream.info_with_subjects(names.tenant_active(tenant)).await.map_err(StageError::nats)?;
        let mut docs = Vec::new();
        while let Some((subject, _)) = info.try_next().await.map_err(StageError::nats)? {
            let Some((doc, count)) = active_subject(&subject) else { continue };
            docs.push((subject.clone(), doc.to_string(), count));
        }
        let counters = &self.ctx.counters;
        let mut total = 0u32;
        for (subject, doc, page_count) in docs {
            let (rendered, uploaded, failed) = tokio::try_join!(
                counters.get(&doc, EventState::Rendered),
                counters.get(&doc, EventState::Uploaded),
                counters.get(&doc, EventState::Failed),
            )
            .map_err(StageError::nats)?;
            match active(page_count, rendered.len(), uploaded.union_len(&failed)) {
                Active::Finished => {
                    let _ = stream.purge().filter(subject).await;
                }
                Active::InFlight(n) => total += n,
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_subjects_name_the_document_and_its_page_count() {
        assert_eq!(active_subject("p.active.0123456789abcdef.doc-1.28"), Some(("doc-1", 28)));
        assert_eq!(active_subject("p.active.t.d.x"), None, "no page count");
        assert_eq!(active_subject("28"), None);
    }

    #[test]
    fn a_document_counts_its_unfinished_pages_until_all_are_done() {
        assert_eq!(active(28, 10, 4), Active::InFlight(6));
        assert_eq!(active(28, 4, 4), Active::InFlight(0));
        // Counters read at different moments: done ahead of rendered is 0.
        assert_eq!(active(28, 3, 4), Active::InFlight(0));
        assert_eq!(active(28, 28, 28), Active::Finished);
        assert_eq!(active(4, 4, 5), Active::Finished);
        assert_eq!(in_flight(7, 2), 5);
    }
}
