//! Messages exchanged between pagestream stages — the public contract for
//! anyone who publishes jobs or reads results from NATS directly.
//!
//! Every message is MessagePack encoded **as a map with field names**
//! ([`encode`]), carries `v` (the schema major version, [`VERSION`]) and
//! `doc_id`. Unknown fields are ignored, absent optional fields take their
//! defaults, and a message whose `v` is not [`VERSION`] is rejected by
//! [`decode`] with [`DecodeError::UnsupportedVersion`] (a permanent error: the
//! stages send it to the dead-letter stream).
//!
//! This crate knows nothing about NATS, storage or HTTP: it is types, codecs
//! and validation only. The machine-readable description for other languages
//! is `schemas/messages.schema.json`; golden vectors are in `schemas/golden/`.

mod content;
mod ids;
mod messages;
mod submit;

pub use content::{OcrMode, PageText, TextSource, Word, MAX_PAGE_TEXT_BYTES, MAX_PAGE_WORDS};
pub use ids::{validate_doc_id, DocIdError};
pub use messages::*;
pub use submit::{InvalidOption, OptionValue, SubmitRequest, MAX_FILENAME_CHARS, MAX_TITLE_CHARS};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The schema major version every message carries in `v`.
pub const VERSION: u32 = 1;

/// The model served and chosen when no setting names one
/// (`inferencer.model`'s default, hence `pipeline.default_model`'s).
pub const DEFAULT_MODEL: &str = "layout_cdla";

/// Rendering resolutions accepted anywhere (`options.dpi`, the upload's
/// `dpi` field, `splitter.dpi`), in dots per inch.
pub const DPI_RANGE: std::ops::RangeInclusive<f32> = 10.0..=1200.0;

/// `DPI_RANGE` as messages write it: `10..=1200`.
pub fn dpi_range_text() -> String {
    format!("{}..={}", DPI_RANGE.start(), DPI_RANGE.end())
}

/// Why a payload could not be decoded. Every variant is permanent: retrying
/// the same bytes cannot succeed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a MessagePack map with a `v` field: {0}")]
    Malformed(String),
    #[error("unsupported schema version v={found} (this build reads v={VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("invalid {kind} message: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// A message type with a stable name and its own validation rules.
pub trait Message: Serialize + DeserializeOwned {
    /// Name used in errors and dead-letter records, e.g. `DocumentSubmitted`.
    const KIND: &'static str;
    /// Checks invariants serde cannot express (ids, exactly-one-of fields).
    fn validate(&self) -> Result<(), String>;
    /// The document the message is about, if it names one.
    fn doc_id(&self) -> Option<&str> {
        None
    }
    /// The page the message is about, for page messages.
    fn page(&self) -> Option<u32> {
        None
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Encodes a message as a MessagePack map with field names.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    // Serialising plain structs of strings, numbers and byte buffers into a
    // Vec cannot fail; a failure here is a bug in this crate.
    rmp_serde::to_vec_named(msg).expect("schema types always serialise")
}

/// Decodes and validates a message; checks the version before the fields so
/// that a future major version is reported as such, not as a missing field.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, DecodeError> {
    let head: VersionOnly = rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if head.v != VERSION {
        return Err(DecodeError::UnsupportedVersion { found: head.v });
    }
    let msg: M =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Invalid { kind: M::KIND, reason: e.to_string() })?;
    msg.validate().map_err(|reason| DecodeError::Invalid { kind: M::KIND, reason })?;
    Ok(msg)
}

#[cfg(test)]
mod tests;
