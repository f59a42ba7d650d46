//! The end-to-end tests, one test binary: each file of this directory is a
//! module (tests are named `<file>::<test>`, e.g. `chaos::kills_…`).
//!
//! One binary instead of one per file: each of the 36 linked the whole
//! workspace and its dependencies again (14-22 s of one core each, ~550 s in
//! all, the largest part of the test build). nextest still runs every test
//! in a process of its own. Run one file's tests with
//! `cargo nextest run -p pagestream-e2e -E 'test(/^chaos::/)'`.

mod api;
mod bad_input;
mod browser;
mod by_reference;
mod chaos;
mod cli;
mod cli_tls;
mod client_view;
mod cluster;
mod content;
mod counters;
mod e2e_http;
mod engines;
mod fleets;
mod flow;
mod hostile;
mod layering;
mod live_results;
mod load;
mod logs;
mod models;
mod ocr;
mod parity;
mod quantized;
mod rebinding;
mod redelivery;
mod retries;
mod scale_out;
mod sealed;
mod shutdown;
mod tenants;
mod tenants_split;
mod text_layer;
mod traces;
mod webhooks;
mod webhooks_tenants;
