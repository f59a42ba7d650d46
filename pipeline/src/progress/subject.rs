//! Event subjects read back: `<p>.events.<doc>.doc.<state>` and
//! `<p>.events.<doc>.page.<state>.<page>` (built by [`Names::doc_event`]
//! and [`Names::page_event`]).

use pagestream_schemas::EventState;

use crate::nats::Names;

/// What an event subject names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSubject<'a> {
    /// A document-level event.
    Doc { doc_id: &'a str, state: EventState },
    /// A page event.
    Page { doc_id: &'a str, state: EventState, page: u32 },
}

impl<'a> EventSubject<'a> {
    /// Parses `subject` of the pipeline named `names`; `None` for anything
    /// else (another prefix, an unknown state, a malformed page number).
    pub fn parse(names: &Names, subject: &'a str) -> Option<EventSubject<'a>> {
        let rest = subject.strip_prefix(names.prefix.as_str())?.strip_prefix(".events.")?;
        // Document ids never contain '.', so the id ends at the first one.
        let (doc_id, rest) = rest.split_once('.')?;
        if doc_id.is_empty() {
            return None;
        }
        match rest.split_once('.')? {
            ("doc", state) => Some(EventSubject::Doc { doc_id, state: EventState::parse(state)? }),
            ("page", rest) => {
                let (state, page) = rest.split_once('.')?;
                let page = page.parse().ok().filter(|p| *p >= 1)?;
                Some(EventSubject::Page { doc_id, state: EventState::parse(state)?, page })
            }
            _ => None,
        }
    }

    pub fn doc_id(&self) -> &'a str {
        match self {
            EventSubject::Doc { doc_id, .. } | EventSubject::Page { doc_id, .. } => doc_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_names_builds() {
        let names = Names::new("ps-1");
        for state in EventState::ALL {
            let doc = names.doc_event("01JDOC", state);
            assert_eq!(EventSubject::parse(&names, &doc), Some(EventSubject::Doc { doc_id: "01JDOC", state }));
            let page = names.page_event("01JDOC", state, 42);
            assert_eq!(
                EventSubject::parse(&names, &page),
                Some(EventSubject::Page { doc_id: "01JDOC", state, page: 42 })
            );
            assert_eq!(EventSubject::parse(&names, &page).unwrap().doc_id(), "01JDOC");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let names = Names::new("ps");
        for bad in [
            "other.events.d.doc.queued",
            "ps2.events.d.doc.queued",
            "ps.docs.submitted",
            "ps.events.d.doc.done",
            "ps.events.d.doc",
            "ps.events..doc.queued",
            "ps.events.d.page.rendered",
            "ps.events.d.page.rendered.x",
            "ps.events.d.page.rendered.0",
            "ps.events.d.page.rendered.-1",
            "ps.events.d.item.rendered.1",
        ] {
            assert_eq!(EventSubject::parse(&names, bad), None, "{bad}");
        }
    }
}
