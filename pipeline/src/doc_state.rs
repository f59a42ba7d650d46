//! The document state machine: the state users see, folded from the
//! document-level events (`queued`, `split`, `failed`, `completed`,
//! `cancelled`) in the order they were recorded.

use std::collections::BTreeSet;

use pagestream_schemas::{EventState, FinalStatus};
use serde::{Deserialize, Serialize};

/// Document state as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocState {
    Queued,
    Running,
    Completed,
    CompletedWithErrors,
    Failed,
    Cancelled,
}

/// Every document state, in lifecycle order.
pub const ALL_STATES: [DocState; 6] = [
    DocState::Queued,
    DocState::Running,
    DocState::Completed,
    DocState::CompletedWithErrors,
    DocState::Failed,
    DocState::Cancelled,
];

impl DocState {
    pub fn is_terminal(self) -> bool {
        matches!(self, DocState::Completed | DocState::CompletedWithErrors | DocState::Failed | DocState::Cancelled)
    }

    /// Finished with results (some pages may have failed).
    pub fn succeeded(self) -> bool {
        matches!(self, DocState::Completed | DocState::CompletedWithErrors)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DocState::Queued => "queued",
            DocState::Running => "running",
            DocState::Completed => "completed",
            DocState::CompletedWithErrors => "completed_with_errors",
            DocState::Failed => "failed",
            DocState::Cancelled => "cancelled",
        }
    }

    /// Parses a state name as used by the API (`?status=`).
    pub fn parse(s: &str) -> Option<DocState> {
        ALL_STATES.into_iter().find(|st| st.as_str() == s)
    }

    /// The state after document-level event `event` (with the final status
    /// the uploader recorded, for `completed`), given the state before.
    /// The first terminal state sticks: a `completed` arriving after a
    /// cancellation (a page finishing in the race) does not undo it, and a
    /// cancellation after completion changes nothing. `failed` followed by
    /// the uploader's `completed` (status failed) stays failed. Page-level
    /// states change nothing.
    pub fn after(self, event: EventState, final_status: Option<FinalStatus>) -> DocState {
        let next = match event {
            EventState::Queued => DocState::Queued,
            EventState::Split => DocState::Running,
            EventState::Failed => DocState::Failed,
            EventState::Cancelled => DocState::Cancelled,
            EventState::Completed => final_status.map_or(DocState::Completed, DocState::from),
            EventState::Rendered | EventState::Inferred | EventState::Uploaded => return self,
        };
        if self.is_terminal() {
            return self;
        }
        if next == DocState::Queued && self == DocState::Running {
            return self;
        }
        next
    }

    /// Whether a document whose document-level events are `events` may be
    /// in this state (a cheap pre-filter for listings, before its status is
    /// read): exact for `queued` and `running`, a superset for the terminal
    /// states (a `completed` event may carry any final status).
    pub fn could_be(self, events: &BTreeSet<EventState>) -> bool {
        let has = |s: EventState| events.contains(&s);
        let terminal = has(EventState::Completed) || has(EventState::Failed) || has(EventState::Cancelled);
        match self {
            DocState::Queued => !has(EventState::Split) && !terminal,
            DocState::Running => has(EventState::Split) && !terminal,
            DocState::Completed | DocState::CompletedWithErrors => has(EventState::Completed),
            DocState::Failed => has(EventState::Failed) || has(EventState::Completed),
            DocState::Cancelled => has(EventState::Cancelled) || has(EventState::Completed),
        }
    }
}

impl From<FinalStatus> for DocState {
    fn from(s: FinalStatus) -> DocState {
        match s {
            FinalStatus::Completed => DocState::Completed,
            FinalStatus::CompletedWithErrors => DocState::CompletedWithErrors,
            FinalStatus::Failed => DocState::Failed,
            FinalStatus::Cancelled => DocState::Cancelled,
        }
    }
}

impl std::fmt::Display for DocState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EventState as E;

    fn fold(events: &[(EventState, Option<FinalStatus>)]) -> DocState {
        events.iter().fold(DocState::Queued, |st, (ev, fin)| st.after(*ev, *fin))
    }

    #[test]
    fn lifecycle_and_final_statuses() {
        assert_eq!(fold(&[(E::Queued, None)]), DocState::Queued);
        assert_eq!(fold(&[(E::Queued, None), (E::Split, None)]), DocState::Running);
        assert_eq!(fold(&[(E::Split, None), (E::Completed, None)]), DocState::Completed);
        for fin in FinalStatus::ALL {
            let st = fold(&[(E::Queued, None), (E::Split, None), (E::Completed, Some(fin))]);
            assert_eq!(st.as_str(), fin.as_str(), "a completed event with status {fin}");
            assert!(st.is_terminal());
        }
    }

    #[test]
    fn the_first_terminal_state_sticks() {
        // A page finishing in the race with a cancellation.
        let st = fold(&[(E::Split, None), (E::Cancelled, None), (E::Completed, Some(FinalStatus::Completed))]);
        assert_eq!(st, DocState::Cancelled);
        // Cancelling a finished document changes nothing.
        let st =
            fold(&[(E::Split, None), (E::Completed, Some(FinalStatus::CompletedWithErrors)), (E::Cancelled, None)]);
        assert_eq!(st, DocState::CompletedWithErrors);
        // The splitter's failure, then the uploader's manifest (status failed).
        let st = fold(&[(E::Split, None), (E::Failed, None), (E::Completed, Some(FinalStatus::Failed))]);
        assert_eq!(st, DocState::Failed);
        // Failed, then a late completed with another status: still failed.
        let st = fold(&[(E::Failed, None), (E::Completed, Some(FinalStatus::Completed))]);
        assert_eq!(st, DocState::Failed);
    }

    #[test]
    fn a_late_queued_does_not_undo_running_and_page_states_change_nothing() {
        // The splitter's `queued` (waiting for a model) recorded after `split`.
        assert_eq!(fold(&[(E::Split, None), (E::Queued, None)]), DocState::Running);
        for page_state in [E::Rendered, E::Inferred, E::Uploaded] {
            assert_eq!(DocState::Running.after(page_state, None), DocState::Running);
            assert_eq!(DocState::Queued.after(page_state, None), DocState::Queued);
        }
    }

    #[test]
    fn names_parse_back_and_serialise_as_themselves() {
        for st in ALL_STATES {
            assert_eq!(DocState::parse(st.as_str()), Some(st));
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
            assert_eq!(serde_json::from_value::<DocState>(st.as_str().into()).unwrap(), st);
        }
        assert_eq!(DocState::parse("done"), None);
        let terminal: Vec<DocState> = ALL_STATES.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal.len(), 4);
        assert!(!terminal.contains(&DocState::Queued) && !terminal.contains(&DocState::Running));
        let succeeded: Vec<DocState> = ALL_STATES.into_iter().filter(|s| s.succeeded()).collect();
        assert_eq!(succeeded, [DocState::Completed, DocState::CompletedWithErrors]);
    }

    #[test]
    fn list_prefilter() {
        let set = |s: &[EventState]| s.iter().copied().collect::<BTreeSet<_>>();
        assert!(DocState::Queued.could_be(&set(&[E::Queued])));
        assert!(!DocState::Queued.could_be(&set(&[E::Queued, E::Split])));
        assert!(DocState::Running.could_be(&set(&[E::Queued, E::Split])));
        assert!(!DocState::Running.could_be(&set(&[E::Queued, E::Split, E::Cancelled])));
        assert!(DocState::Cancelled.could_be(&set(&[E::Queued, E::Cancelled])));
        assert!(DocState::Failed.could_be(&set(&[E::Queued, E::Failed])));
        assert!(!DocState::Completed.could_be(&set(&[E::Queued, E::Failed])));
    }
}
