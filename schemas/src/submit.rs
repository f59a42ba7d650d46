//! A document submission as the HTTP API and the command line take it: a
//! [`SubmitRequest`], typed, parsed once from whichever form carries it
//! (query-string parameters, multipart text fields, the `title` and
//! `options` of a JSON body, command-line flags) with [`SubmitRequest::set`],
//! and checked by one set of rules ([`SubmitRequest::validate`]) that a
//! [`DocumentSubmitted`](crate::DocumentSubmitted)'s decoding applies to its
//! `options` too ([`SubmitOptions::validate`]).
//!
//! What depends on the deployment — whether the model is served, where a
//! webhook may point — is the ingress's check, not this module's.

use std::borrow::Cow;

use crate::{dpi_range_text, validate_callback_url, validate_model_name, CallbackEvents, Priority, SubmitOptions};

/// Longest `title`, in characters.
pub const MAX_TITLE_CHARS: usize = 500;
/// Longest `filename`, in characters.
pub const MAX_FILENAME_CHARS: usize = 255;

/// One option's value as an input form carries it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionValue<'a> {
    /// A query-string parameter, a multipart text field, a JSON string.
    Text(&'a str),
    /// A JSON number: its value, and its text as the JSON wrote it (what
    /// an option that is text, or an error message, sees).
    Number { value: f64, text: &'a str },
    /// A JSON boolean.
    Bool(bool),
}

impl OptionValue<'_> {
    /// The value as text (`true`, `150`, …).
    fn text(&self) -> Cow<'_, str> {
        match *self {
            OptionValue::Text(s) => Cow::Borrowed(s),
            OptionValue::Number { text, .. } => Cow::Borrowed(text),
            OptionValue::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
        }
    }
}

/// An option refused: which one, and why in the words the HTTP API
/// answers with (422 `invalid_option`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidOption {
    /// The option's wire name (`dpi`, `model`, …).
    pub option: &'static str,
    pub message: String,
}

impl InvalidOption {
    fn new(option: &'static str, message: String) -> Self {
        InvalidOption { option, message }
    }

    /// The refusal as a `DocumentSubmitted`'s decoding words it, naming
    /// the field in `options`: `options.dpi 5000 is outside 10..=1200`,
    /// `options.model: model name …`.
    pub fn in_options(&self) -> String {
        match self.option {
            "model" => format!("options.model: {}", self.message),
            _ => format!("options.{}", self.message),
        }
    }
}

// The rules, one function per option; `SubmitRequest::set` applies each to
// the value it parsed, `validate` to every value held.

/// `title` and `filename`: at most `max` characters, no control characters.
fn text_rule(option: &'static str, value: &str, max: usize) -> Result<(), InvalidOption> {
    if value.chars().count() > max {
        return Err(InvalidOption::new(option, format!("{option} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidOption::new(option, format!("{option} contains control characters")));
    }
    Ok(())
}

/// `dpi`: within [`crate::DPI_RANGE`] (a NaN or an infinity is not).
fn dpi_rule(dpi: f32) -> Result<(), InvalidOption> {
    if dpi.is_finite() && crate::DPI_RANGE.contains(&dpi) {
        return Ok(());
    }
    Err(InvalidOption::new("dpi", format!("dpi {dpi} is outside {}", dpi_range_text())))
}

/// `model`: a model name ([`validate_model_name`]).
fn model_rule(model: &str) -> Result<(), InvalidOption> {
    validate_model_name(model).map_err(|e| InvalidOption::new("model", e))
}

/// `callback_url`: a webhook URL's syntax ([`validate_callback_url`]).
fn callback_url_rule(url: &str) -> Result<(), InvalidOption> {
    validate_callback_url(url).map_err(|e| InvalidOption::new("callback_url", format!("callback_url {e}")))
}

impl SubmitOptions {
    /// The rules on the options themselves (dpi range, model name, webhook
    /// URL syntax): [`SubmitRequest::validate`] and a
    /// `DocumentSubmitted`'s decoding apply them.
    pub fn validate(&self) -> Result<(), InvalidOption> {
        if let Some(dpi) = self.dpi {
            dpi_rule(dpi)?;
        }
        if let Some(model) = &self.model {
            model_rule(model)?;
        }
        if let Some(url) = &self.callback_url {
            callback_url_rule(url)?;
        }
        Ok(())
    }
}

/// A submission's title, file name and options, typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubmitRequest {
    /// Human title (blank: none).
    pub title: Option<String>,
    /// The file name (blank: none); an upload's own part name wins.
    pub filename: Option<String>,
    /// The options as the document's `DocumentSubmitted` carries them
    /// (before the ingress decides its model).
    pub options: SubmitOptions,
}

impl SubmitRequest {
    /// Sets the option `key` from `value`, as each input form gives it,
    /// refusing a value that does not parse or breaks its rule. A later
    /// value replaces an earlier one; an empty `model`, `title`,
    /// `filename` or `password` clears it, an empty `priority`,
    /// `callback_url`, `callback_events` or `ocr` is ignored, and so is an
    /// unknown key.
    ///
    /// `callback_url` is kept as given: its syntax is checked with the
    /// deployment's policy on where webhooks may point (the ingress's
    /// `check_callback`, through the same [`validate_callback_url`]), after
    /// whether webhooks are on at all.
    pub fn set(&mut self, key: &str, value: OptionValue<'_>) -> Result<(), InvalidOption> {
        let text = value.text();
        let opts = &mut self.options;
        match key {
            "title" => {
                text_rule("title", &text, MAX_TITLE_CHARS)?;
                self.title = Some(text.into_owned()).filter(|t| !t.trim().is_empty());
            }
            "filename" => {
                text_rule("filename", &text, MAX_FILENAME_CHARS)?;
                self.filename = Some(text.into_owned()).filter(|t| !t.trim().is_empty());
            }
            "dpi" => {
                let dpi = match value {
                    OptionValue::Number { value, .. } => value as f32,
                    _ => {
                        text.parse().map_err(|_| InvalidOption::new("dpi", format!("dpi {text:?} is not a number")))?
                    }
                };
                dpi_rule(dpi)?;
                opts.dpi = Some(dpi);
            }
            "model" => {
                if !text.is_empty() {
                    model_rule(&text)?;
                }
                opts.model = Some(text.into_owned()).filter(|m| !m.is_empty());
            }
            "wait_for_model" => {
                let wait = match (value, text.as_ref()) {
                    (OptionValue::Bool(b), _) => b,
                    (_, "true" | "1") => true,
                    (_, "false" | "0" | "") => false,
                    _ => {
                        return Err(InvalidOption::new(
                            "wait_for_model",
                            format!("wait_for_model {text:?} is not true or false"),
                        ))
                    }
                };
                opts.wait_for_model = Some(wait);
            }
            "callback_url" if !text.is_empty() => opts.callback_url = Some(text.into_owned()),
            "callback_events" if !text.is_empty() => {
                let events = CallbackEvents::parse(&text).ok_or_else(|| {
                    InvalidOption::new(
                        "callback_events",
                        format!("callback_events {text:?} is not one of document, page"),
                    )
                })?;
                opts.callback_events = Some(events);
            }
            "password" => opts.password = Some(text.into_owned()).filter(|p| !p.is_empty()),
            "ocr" if !text.is_empty() => {
                let mode = crate::OcrMode::parse(&text).ok_or_else(|| {
                    InvalidOption::new("ocr", format!("ocr {text:?} is not one of auto, always, never"))
                })?;
                opts.ocr = Some(mode);
            }
            "priority" if !text.is_empty() => {
                let priority = Priority::parse(&text).ok_or_else(|| {
                    InvalidOption::new("priority", format!("priority {text:?} is not one of high, normal, low"))
                })?;
                opts.priority = Some(priority);
            }
            _ => {}
        }
        Ok(())
    }

    /// [`SubmitRequest::set`] for each of `fields` in turn (a query
    /// string's parameters, a form's text fields).
    pub fn set_all<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), InvalidOption> {
        for (k, v) in fields {
            self.set(k.as_ref(), OptionValue::Text(v.as_ref()))?;
        }
        Ok(())
    }

    /// Every rule on every value held (those [`SubmitRequest::set`]
    /// applies one at a time): for a request built otherwise than by
    /// parsing.
    pub fn validate(&self) -> Result<(), InvalidOption> {
        if let Some(title) = &self.title {
            text_rule("title", title, MAX_TITLE_CHARS)?;
        }
        if let Some(filename) = &self.filename {
            text_rule("filename", filename, MAX_FILENAME_CHARS)?;
        }
        self.options.validate()
    }

    /// The options as query-string parameters or form fields, for a
    /// client to send (what [`SubmitRequest::set`] reads back); the title
    /// and file name are not among them.
    pub fn option_fields(&self) -> Vec<(&'static str, String)> {
        let o = &self.options;
        let mut fields = Vec::new();
        if let Some(dpi) = o.dpi {
            fields.push(("dpi", dpi.to_string()));
        }
        if let Some(model) = &o.model {
            fields.push(("model", model.clone()));
        }
        if let Some(priority) = o.priority {
            fields.push(("priority", priority.as_str().to_string()));
        }
        if let Some(wait) = o.wait_for_model {
            fields.push(("wait_for_model", wait.to_string()));
        }
        if let Some(password) = &o.password {
            fields.push(("password", password.clone()));
        }
        if let Some(url) = &o.callback_url {
            fields.push(("callback_url", url.clone()));
        }
        if let Some(events) = o.callback_events {
            fields.push(("callback_events", events.as_str().to_string()));
        }
        if let Some(ocr) = o.ocr {
            fields.push(("ocr", ocr.as_str().to_string()));
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, DocumentSubmitted, Source, VERSION};

    fn parsed(fields: &[(&str, &str)]) -> Result<SubmitRequest, InvalidOption> {
        let mut r = SubmitRequest::default();
        r.set_all(fields.iter().copied())?;
        Ok(r)
    }

    fn refusal(key: &str, value: OptionValue<'_>) -> InvalidOption {
        let mut r = SubmitRequest::default();
        r.set(key, value).expect_err(key)
    }

    fn text(s: &str) -> OptionValue<'_> {
        OptionValue::Text(s)
    }

    /// A JSON value as the ingress hands it over.
    fn json(v: &serde_json::Value, f: impl FnOnce(OptionValue<'_>)) {
        match v {
            serde_json::Value::String(s) => f(OptionValue::Text(s)),
            serde_json::Value::Number(n) => {
                let text = n.to_string();
                f(OptionValue::Number { value: n.as_f64().unwrap(), text: &text })
            }
            serde_json::Value::Bool(b) => f(OptionValue::Bool(*b)),
            other => panic!("not an option value: {other}"),
        }
    }

    fn from_json(body: serde_json::Value) -> Result<SubmitRequest, InvalidOption> {
        let mut r = SubmitRequest::default();
        for (k, v) in body.as_object().unwrap() {
            let mut out = Ok(());
            json(v, |value| out = r.set(k, value));
            out?;
        }
        Ok(r)
    }

    #[test]
    fn every_option_parses_into_its_type() {
        let r = parsed(&[
            ("title", "Annual report"),
            ("filename", "report.pdf"),
            ("dpi", "150.5"),
            ("model", "layout_cdla"),
            ("password", "s3cret"),
            ("priority", "high"),
            ("wait_for_model", "1"),
            ("callback_url", "https://example.com/hook"),
            ("callback_events", "page"),
            ("ocr", "always"),
        ])
        .unwrap();
        assert_eq!(r.options.ocr, Some(crate::OcrMode::Always));
        assert_eq!(r.title.as_deref(), Some("Annual report"));
        assert_eq!(r.filename.as_deref(), Some("report.pdf"));
        let o = &r.options;
        assert_eq!(o.dpi, Some(150.5));
        assert_eq!(o.model.as_deref(), Some("layout_cdla"));
        assert_eq!(o.password.as_deref(), Some("s3cret"));
        assert_eq!(o.priority, Some(Priority::High));
        assert_eq!(o.wait_for_model, Some(true));
        assert_eq!(o.callback_url.as_deref(), Some("https://example.com/hook"));
        assert_eq!(o.callback_events, Some(CallbackEvents::Page));
        assert_eq!(r.validate(), Ok(()));
        assert!(!format!("{r:?}").contains("s3cret"), "the password is redacted: {r:?}");
        for (value, want) in [("true", true), ("1", true), ("false", false), ("0", false), ("", false)] {
            assert_eq!(parsed(&[("wait_for_model", value)]).unwrap().options.wait_for_model, Some(want), "{value:?}");
        }
        for p in Priority::ALL {
            assert_eq!(parsed(&[("priority", p.as_str())]).unwrap().options.priority, Some(p));
        }
    }

    #[test]
    fn unknown_options_are_ignored_and_later_values_win() {
        let r = parsed(&[("file", "x"), ("frobnicate", "1"), ("dpi", "100"), ("dpi", "200")]).unwrap();
        assert_eq!(r.options.dpi, Some(200.0));
        assert_eq!(SubmitRequest { options: r.options.clone(), ..SubmitRequest::default() }, r);
        // Empty values: clear a model, title or password; leave the rest.
        let r = parsed(&[
            ("model", "m"),
            ("model", ""),
            ("title", "t"),
            ("title", "   "),
            ("priority", "low"),
            ("priority", ""),
            ("callback_url", ""),
            ("callback_events", ""),
            ("password", ""),
        ])
        .unwrap();
        assert_eq!((r.options.model, r.title, r.options.priority), (None, None, Some(Priority::Low)));
        assert_eq!((r.options.callback_url, r.options.callback_events, r.options.password), (None, None, None));
    }

    #[test]
    fn bad_values_are_refused_with_the_api_wording() {
        let cases = [
            ("dpi", "lots", "dpi \"lots\" is not a number"),
            ("dpi", "5000", "dpi 5000 is outside 10..=1200"),
            ("dpi", "9.5", "dpi 9.5 is outside 10..=1200"),
            ("dpi", "NaN", "dpi NaN is outside 10..=1200"),
            ("model", "a b", "model name \"a b\" may contain only A-Z, a-z, 0-9, `_` and `-`, and one `@` before a variant (layout_cdla@int8)"),
            ("wait_for_model", "yes", "wait_for_model \"yes\" is not true or false"),
            ("priority", "urgent", "priority \"urgent\" is not one of high, normal, low"),
            ("callback_events", "all", "callback_events \"all\" is not one of document, page"),
            ("ocr", "sometimes", "ocr \"sometimes\" is not one of auto, always, never"),
            ("filename", "a\u{7}b", "filename contains control characters"),
        ];
        for (key, value, message) in cases {
            let err = refusal(key, text(value));
            assert_eq!((err.option, err.message.as_str()), (key, message), "{key}={value:?}");
        }
        let long = "t".repeat(MAX_TITLE_CHARS + 1);
        assert_eq!(refusal("title", text(&long)).message, "title is longer than 500 characters");
        assert!(parsed(&[("title", &"t".repeat(MAX_TITLE_CHARS))]).is_ok());
        assert_eq!(refusal("filename", text(&"f".repeat(256))).message, "filename is longer than 255 characters");
        // Checked on the raw value, before a blank one is dropped.
        assert_eq!(refusal("title", text("\t")).message, "title contains control characters");
        // Refused: nothing changes.
        let mut r = parsed(&[("dpi", "100")]).unwrap();
        assert!(r.set("dpi", text("5000")).is_err());
        assert_eq!(r.options.dpi, Some(100.0));
    }

    #[test]
    fn json_values_parse_as_their_text_would() {
        let typed = from_json(serde_json::json!({
            "dpi": 150, "model": "layout_cdla", "priority": "low", "wait_for_model": true,
            "callback_url": "https://example.com/h", "callback_events": "document", "password": "pw",
        }))
        .unwrap();
        let strings = from_json(serde_json::json!({
            "dpi": "150", "model": "layout_cdla", "priority": "low", "wait_for_model": "true",
            "callback_url": "https://example.com/h", "callback_events": "document", "password": "pw",
        }))
        .unwrap();
        assert_eq!(typed, strings);
        assert_eq!(from_json(serde_json::json!({"wait_for_model": 0})).unwrap().options.wait_for_model, Some(false));
        assert_eq!(from_json(serde_json::json!({"dpi": 72.5})).unwrap().options.dpi, Some(72.5));
        // A number where text is wanted is its JSON text; a boolean where a
        // number is wanted is refused with its text.
        assert_eq!(from_json(serde_json::json!({"model": 5})).unwrap().options.model.as_deref(), Some("5"));
        let err = from_json(serde_json::json!({"dpi": true})).unwrap_err();
        assert_eq!(err.message, "dpi \"true\" is not a number");
        let err = from_json(serde_json::json!({"wait_for_model": 1.0})).unwrap_err();
        assert_eq!(err.message, "wait_for_model \"1.0\" is not true or false");
        let err = from_json(serde_json::json!({"priority": 1})).unwrap_err();
        assert_eq!(err.message, "priority \"1\" is not one of high, normal, low");
        let err = from_json(serde_json::json!({"dpi": 5000})).unwrap_err();
        assert_eq!(err.message, "dpi 5000 is outside 10..=1200");
    }

    #[test]
    fn the_three_forms_agree() {
        let fields = [
            ("dpi", "200"),
            ("model", "yolo_v8"),
            ("priority", "high"),
            ("wait_for_model", "true"),
            ("callback_url", "https://example.com/h"),
            ("callback_events", "page"),
            ("ocr", "never"),
        ];
        // Query string and form fields are text: the same pairs.
        let query = parsed(&fields).unwrap();
        // A JSON body's options, typed as a client writes them.
        let body = from_json(serde_json::json!({
            "dpi": 200, "model": "yolo_v8", "priority": "high", "wait_for_model": true,
            "callback_url": "https://example.com/h", "callback_events": "page", "ocr": "never",
        }))
        .unwrap();
        assert_eq!(query, body);
        // What a client sends reads back as the same request, and the
        // options as serialised (a JSON body from the CLI) too.
        let fields_back = query.option_fields();
        assert_eq!(parsed(&fields_back.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>()).unwrap(), query);
        assert_eq!(from_json(serde_json::to_value(&query.options).unwrap()).unwrap(), query);
    }

    #[test]
    fn validate_applies_the_rules_set_applies() {
        let ok = SubmitRequest { title: Some("t".into()), ..SubmitRequest::default() };
        assert_eq!(ok.validate(), Ok(()));
        let mut r = ok.clone();
        r.options.dpi = Some(5000.0);
        assert_eq!(r.validate().unwrap_err(), refusal("dpi", text("5000")));
        let mut r = ok.clone();
        r.options.model = Some("a.b".into());
        assert_eq!(r.validate().unwrap_err(), refusal("model", text("a.b")));
        let mut r = ok.clone();
        r.title = Some("x".repeat(MAX_TITLE_CHARS + 1));
        assert_eq!(r.validate().unwrap_err(), refusal("title", text(&"x".repeat(MAX_TITLE_CHARS + 1))));
        let mut r = ok;
        r.options.callback_url = Some("ftp://example.com".into());
        let err = r.validate().unwrap_err();
        assert_eq!(err.message, "callback_url must start with http:// or https://");
    }

    #[test]
    fn a_documents_decoding_applies_the_options_rules() {
        let sub = |options: SubmitOptions| DocumentSubmitted {
            v: VERSION,
            doc_id: "d1".into(),
            title: None,
            source: Source { blob: Some("uploads/d1".into()), ..Source::default() },
            options,
            submitted_at: None,
            start_page: None,
            owner: None,
        };
        let reason = |options: SubmitOptions| match decode::<DocumentSubmitted>(&encode(&sub(options))) {
            Err(crate::DecodeError::Invalid { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let dpi = SubmitOptions { dpi: Some(5000.0), ..SubmitOptions::default() };
        assert_eq!(reason(dpi.clone()), dpi.validate().unwrap_err().in_options());
        assert_eq!(reason(dpi), "options.dpi 5000 is outside 10..=1200");
        let model = SubmitOptions { model: Some("a b".into()), ..SubmitOptions::default() };
        assert_eq!(reason(model), "options.model: model name \"a b\" may contain only A-Z, a-z, 0-9, `_` and `-`, and one `@` before a variant (layout_cdla@int8)");
        let url = SubmitOptions { callback_url: Some("https://u:p@x.org".into()), ..SubmitOptions::default() };
        assert_eq!(reason(url), "options.callback_url must not contain credentials (user:password@)");
        // A title is the request's, not the message's: a long one decodes.
        let mut long = sub(SubmitOptions::default());
        long.title = Some("t".repeat(MAX_TITLE_CHARS + 1));
        assert!(decode::<DocumentSubmitted>(&encode(&long)).is_ok());
    }
}
