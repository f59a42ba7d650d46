//! The results contract, shared by the stage that writes results (the
//! uploader) and the one that serves them (the ingress):
//!
//! - [`layout`]: where each file of a document goes ([`layout::Keys`]) and
//!   what `manifest.json` and `pages/<n>.json` contain;
//! - [`coco`]: the COCO export of a document's detections;
//! - [`content`]: what each box says — words into regions, reading order;
//! - [`export`]: the Markdown and retrieval-chunk exports;
//! - [`config`]: the store's settings (keys of `[uploader]`);
//! - [`store`]: the local directory or S3 bucket they are written to, with
//!   atomic writes, reads and presigned links.
//!
//! Stages never depend on each other: what two stages share lives here, in
//! `pagestream-pipeline` or in `pagestream-schemas` (checked by
//! `tests/tests/layering.rs`).

pub mod coco;
pub mod config;
pub mod content;
pub mod export;
pub mod layout;
pub mod store;

pub use config::{ResultsConfig, Target};
pub use layout::{DetectionResult, Keys, Manifest, ManifestPage, PageResult, SourceInfo, TextBlock, MANIFEST_SCHEMA};
pub use store::ResultStore;
