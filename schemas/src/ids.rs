//! Document ids: they become NATS subject tokens and path components, so the
//! alphabet is restricted to what is safe in both.

/// Why a document id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid doc_id {id:?}: {reason}")]
pub struct DocIdError {
    pub id: String,
    pub reason: &'static str,
}

/// Maximum length of a document id.
pub const MAX_DOC_ID_LEN: usize = 64;

/// Accepts 1–64 characters of `[A-Za-z0-9_-]`: safe as a NATS subject token
/// (no `.`, `*`, `>` or whitespace), an object key and a directory name.
pub fn validate_doc_id(id: &str) -> Result<(), DocIdError> {
    let err = |reason| Err(DocIdError { id: id.chars().take(80).collect(), reason });
    if id.is_empty() {
        return err("must not be empty");
    }
    if id.len() > MAX_DOC_ID_LEN {
        return err("longer than 64 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return err("only A-Z, a-z, 0-9, '-' and '_' are allowed");
    }
    Ok(())
}
