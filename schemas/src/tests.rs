//! Golden vectors and decoding rules. Set `PAGESTREAM_BLESS=1` to rewrite the
//! golden files after a deliberate schema change (then review the diff).

use std::path::PathBuf;

use serde_bytes::ByteBuf;

use super::*;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn submitted() -> DocumentSubmitted {
    DocumentSubmitted {
        v: VERSION,
        doc_id: "01JDOC0000000000000000000A".into(),
        title: Some("Annual report".into()),
        source: Source {
            blob: Some("uploads/01JDOC0000000000000000000A".into()),
            filename: Some("report.pdf".into()),
            bytes: Some(419062),
            ..Source::default()
        },
        options: SubmitOptions { dpi: Some(150.0), ..SubmitOptions::default() },
        submitted_at: Some("2026-11-28T12:00:00Z".into()),
        start_page: None,
        owner: None,
    }
}

fn rendered() -> PageRendered {
    PageRendered {
        v: VERSION,
        doc_id: "doc-1".into(),
        page: 2,
        page_count: 28,
        width: 1275,
        height: 1650,
        dpi: 150.0,
        image: ImageRef { format: "png".into(), inline: Some(ByteBuf::from(vec![0x89, b'P', b'N', b'G'])), blob: None },
        render_ms: Some(9.5),
        text: None,
        ocr: None,
    }
}

fn inferred() -> PageInferred {
    PageInferred {
        v: VERSION,
        doc_id: "doc-1".into(),
        page: 2,
        page_count: 28,
        width: 1275,
        height: 1650,
        dpi: 150.0,
        model: ModelRef { name: "layout_cdla".into(), sha256: "25b1f27e".into() },
        detections: vec![Detection { label: "text".into(), score: 0.875, bbox: [10.0, 20.5, 300.0, 400.25] }],
        image: Some(ImageRef { format: "png".into(), inline: None, blob: Some("pages/doc-1/2.png".into()) }),
        timings: Timings { render_ms: Some(9.5), infer_ms: Some(150.0), ocr_ms: None },
        error: None,
        text: None,
    }
}

fn event() -> Event {
    Event {
        v: VERSION,
        doc_id: "doc-1".into(),
        stage: "splitter".into(),
        state: EventState::Split,
        page: None,
        error: None,
        info: Some(DocInfo { title: Some("Annual report".into()), page_count: Some(28), ..DocInfo::default() }),
        ms: None,
        at: "2026-11-28T12:00:01Z".into(),
    }
}

fn cancelled() -> DocumentCancelled {
    DocumentCancelled {
        v: VERSION,
        doc_id: "01JDOC0000000000000000000A".into(),
        reason: Some("requested by the API".into()),
        at: "2026-11-28T12:00:03Z".into(),
    }
}

fn failed() -> DocumentFailed {
    DocumentFailed {
        v: VERSION,
        doc_id: "doc-2".into(),
        stage: "splitter".into(),
        error: ErrorInfo::new("pdf_unreadable", "pdfium could not open the document: format error"),
        title: None,
        source: Source::default(),
        at: "2026-11-28T12:00:02Z".into(),
    }
}

fn check_golden<M: Message + PartialEq + std::fmt::Debug>(name: &str, msg: &M) {
    let bytes = encode(msg);
    let path = golden_dir().join(format!("{name}.msgpack"));
    if std::env::var_os("PAGESTREAM_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
    }
    let golden =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (PAGESTREAM_BLESS=1 creates it)", path.display()));
    let decoded: M = decode(&golden).expect("golden vector decodes");
    assert_eq!(&decoded, msg, "{name}: golden vector decodes to the sample");
    assert_eq!(bytes, golden, "{name}: encoding is byte-identical to the golden vector");
}

#[test]
fn golden_vectors_round_trip() {
    check_golden("document_submitted", &submitted());
    check_golden("page_rendered", &rendered());
    check_golden("page_inferred", &inferred());
    check_golden("event_split", &event());
    check_golden("document_failed", &failed());
    check_golden("document_cancelled", &cancelled());
}

#[test]
fn encoding_uses_field_names() {
    let bytes = encode(&submitted());
    let as_json: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(as_json["doc_id"], "01JDOC0000000000000000000A");
    assert_eq!(as_json["v"], 1);
    assert_eq!(as_json["source"]["blob"], "uploads/01JDOC0000000000000000000A");
}

#[test]
fn unknown_fields_are_ignored() {
    // PageInferred with a blob image holds no binary, so it maps to JSON.
    let mut map = serde_json::to_value(inferred()).unwrap();
    map["added_in_a_later_minor_version"] = serde_json::json!({"x": 1});
    let bytes = rmp_serde::to_vec_named(&map).unwrap();
    assert_eq!(decode::<PageInferred>(&bytes).unwrap(), inferred());
}

#[test]
fn unknown_major_version_is_rejected() {
    let mut msg = submitted();
    msg.v = 2;
    let err = decode::<DocumentSubmitted>(&encode(&msg)).unwrap_err();
    assert!(matches!(err, DecodeError::UnsupportedVersion { found: 2 }), "{err}");
}

#[test]
fn malformed_payloads_are_rejected() {
    for bytes in [&b""[..], b"\xc1", b"not msgpack at all", b"\x93\x01\x02\x03"] {
        assert!(matches!(decode::<DocumentSubmitted>(bytes), Err(DecodeError::Malformed(_))));
    }
}

#[test]
fn validation_catches_bad_fields() {
    let mut two_sources = submitted();
    two_sources.source.inline = Some(ByteBuf::from(b"%PDF-1.7".to_vec()));
    let err = decode::<DocumentSubmitted>(&encode(&two_sources)).unwrap_err();
    assert!(err.to_string().contains("exactly one"), "{err}");

    let mut bad_id = submitted();
    bad_id.doc_id = "a.b".into();
    let err = decode::<DocumentSubmitted>(&encode(&bad_id)).unwrap_err();
    assert!(err.to_string().contains("doc_id"), "{err}");

    let mut bad_page = rendered();
    bad_page.page = 29;
    let err = decode::<PageRendered>(&encode(&bad_page)).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");

    // Blob keys are bound to their document (and page).
    for key in ["uploads/someone-else", "pages/x/1.png"] {
        let mut other = submitted();
        other.source.blob = Some(key.into());
        let err = decode::<DocumentSubmitted>(&encode(&other)).unwrap_err();
        assert!(err.to_string().contains("source.blob"), "{key}: {err}");
    }
    let mut own = submitted();
    own.source.blob = Some("incoming/report.pdf".into());
    decode::<DocumentSubmitted>(&encode(&own)).expect("a key outside uploads/ and pages/ is the publisher's");
    let mut stolen = rendered();
    stolen.image = ImageRef { format: "png".into(), inline: None, blob: Some("uploads/victim".into()) };
    let err = decode::<PageRendered>(&encode(&stolen)).unwrap_err();
    assert!(err.to_string().contains("image.blob"), "{err}");
    let mut fine = rendered();
    fine.image =
        ImageRef { format: "png".into(), inline: None, blob: Some(format!("pages/{}/{}.png", fine.doc_id, fine.page)) };
    decode::<PageRendered>(&encode(&fine)).expect("the page's own key");
}

#[test]
fn dead_letter_helpers_find_the_document_and_drop_passwords() {
    let mut sub = submitted();
    sub.options.password = Some("s3cret".into());
    sub.options.dpi = Some(1.0); // invalid: decode fails, the id is still found
    let bytes = encode(&sub);
    assert!(decode::<DocumentSubmitted>(&bytes).is_err());
    assert_eq!(peek_doc_id(&bytes).as_deref(), Some(sub.doc_id.as_str()));
    assert_eq!(peek_doc_id(b"\x93not a map"), None);
    let clean = without_passwords(&bytes);
    assert!(!clean.windows(6).any(|w| w == b"s3cret") && !clean.windows(8).any(|w| w == b"password"));
    assert!(bytes.windows(6).any(|w| w == b"s3cret"), "the original had it");
    assert_eq!(without_passwords(b"\x93not a map"), b"\x93not a map".to_vec());
}

#[test]
fn doc_ids() {
    assert!(validate_doc_id("0193a0b2-7c4e-7d2a-9f00-aa11bb22cc33").is_ok());
    for bad in ["", "a b", "a.b", "a*", "a>", &"x".repeat(65), "é"] {
        assert!(validate_doc_id(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn passwords_never_show_in_debug_output() {
    let opts = SubmitOptions { password: Some("s3cret".into()), ..SubmitOptions::default() };
    assert!(!format!("{opts:?}").contains("s3cret"));
}

#[test]
fn priority_is_a_lowercase_name_and_scales_turns() {
    let mut sub = submitted();
    sub.options.priority = Some(Priority::High);
    sub.start_page = Some(9);
    let back: DocumentSubmitted = decode(&encode(&sub)).unwrap();
    assert_eq!(back.options.priority, Some(Priority::High));
    assert_eq!(back.start_page, Some(9));
    // Publishers write the name, as in JSON: {"priority": "low"}.
    #[derive(serde::Serialize)]
    struct RawOpts {
        priority: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Raw {
        v: u32,
        doc_id: &'static str,
        source: Source,
        options: RawOpts,
    }
    let raw = |priority| Raw {
        v: VERSION,
        doc_id: "d1",
        source: Source { blob: Some("k".into()), ..Source::default() },
        options: RawOpts { priority },
    };
    let low: DocumentSubmitted = decode(&rmp_serde::to_vec_named(&raw("low")).unwrap()).unwrap();
    assert_eq!(low.options.priority, Some(Priority::Low));
    let err = decode::<DocumentSubmitted>(&rmp_serde::to_vec_named(&raw("urgent")).unwrap()).unwrap_err().to_string();
    assert!(err.contains("urgent"), "{err}");
    assert_eq!(Priority::parse("low"), Some(Priority::Low));
    assert_eq!(Priority::parse("urgent"), None);
    assert_eq!((Priority::High.scale(8), Priority::Normal.scale(8), Priority::Low.scale(8)), (16, 8, 4));
    assert_eq!(Priority::Low.scale(1), 1);
    let mut zero = submitted();
    zero.start_page = Some(0);
    assert!(decode::<DocumentSubmitted>(&encode(&zero)).is_err());
}

#[test]
fn dpi_bounds_are_one_range_with_the_documented_wording() {
    assert_eq!(dpi_range_text(), "10..=1200");
    for (dpi, ok) in [(9.99, false), (10.0, true), (1200.0, true), (1200.5, false), (f32::NAN, false)] {
        let mut sub = submitted();
        sub.options.dpi = Some(dpi);
        let res = decode::<DocumentSubmitted>(&encode(&sub));
        assert_eq!(res.is_ok(), ok, "dpi {dpi}: {res:?}");
        if !ok {
            assert!(res.unwrap_err().to_string().contains("outside 10..=1200"), "dpi {dpi}");
        }
    }
}

#[test]
fn final_status_is_its_wire_name_and_the_json_schema_lists_every_one() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../messages.schema.json")).expect("the JSON schema parses");
    // DocInfo's status enum: the one naming completed_with_errors.
    fn find(v: &serde_json::Value) -> Option<&serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m
                .get("enum")
                .filter(|e| e.to_string().contains("completed_with_errors"))
                .or_else(|| m.values().find_map(find)),
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    let listed = find(&schema);
    let listed: Vec<&str> =
        listed.expect("status enum").as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    for status in FinalStatus::ALL {
        let info = DocInfo { status: Some(status), ..DocInfo::default() };
        // On the wire the status is its name, exactly as a string field carried it.
        #[derive(serde::Deserialize)]
        struct AsString {
            status: String,
        }
        let raw: AsString = rmp_serde::from_slice(&rmp_serde::to_vec_named(&info).unwrap()).unwrap();
        assert_eq!(raw.status, status.as_str());
        let back: DocInfo = rmp_serde::from_slice(&rmp_serde::to_vec_named(&info).unwrap()).unwrap();
        assert_eq!(back.status, Some(status));
        assert!(listed.contains(&status.as_str()), "{status} missing from messages.schema.json: {listed:?}");
    }
    assert_eq!(listed.len(), FinalStatus::ALL.len());
}

/// Pages rendered before pages stopped carrying the submission's options
/// (`schemas/compat/`, the golden vector of that time) still decode, the
/// field ignored: an inferencer updated first takes the older splitter's
/// pages.
#[test]
fn older_pages_with_options_still_decode() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("compat/page_rendered_with_options.msgpack");
    let bytes = std::fs::read(&path).unwrap();
    #[derive(serde::Deserialize)]
    struct WithOptions {
        options: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
    }
    let old: WithOptions = rmp_serde::from_slice(&bytes).expect("the vector is one with options");
    assert!(old.options.contains_key("dpi") || old.options.is_empty(), "{:?}", old.options.keys());
    assert_eq!(decode::<PageRendered>(&bytes).unwrap(), rendered());
}

#[test]
fn model_names_may_name_a_variant_after_one_at() {
    for ok in ["layout_cdla", "yolov8n_doclaynet@int8", "a-b@c_d"] {
        assert_eq!(validate_model_name(ok), Ok(()), "{ok}");
    }
    for bad in ["", "@int8", "layout_cdla@", "a@b@c", "a.b", "a b@int8", "layout_cdla@in.t8", "a*"] {
        let err = validate_model_name(bad).unwrap_err();
        assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
    }
}
