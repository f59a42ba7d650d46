//! What each box says, end to end: the text layer's words reach the page
//! JSON (each detection with `text`, `order`, `text_source`; text outside
//! every region in `unassigned_text`), every word exactly once; the
//! Markdown and chunks exports, from the API and from the CLI's `--follow`.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use pagestream_e2e::api::upload;
use pagestream_e2e::procs::bin_dir;
use pagestream_e2e::{corpus, Harness};
use serde_json::Value;

/// Words (split on white space) of every text in a page JSON, counted.
fn words_of(page: &Value) -> HashMap<String, usize> {
    let mut words = HashMap::new();
    let texts = page["detections"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page["unassigned_text"].as_array().into_iter().flatten())
        .map(|d| d["text"].as_str().expect("every region has text (possibly empty)").to_string());
    for t in texts {
        for w in t.split_whitespace() {
            *words.entry(w.to_string()).or_default() += 1;
        }
    }
    words
}

/// The words of the text layer of `pdf`'s pages (the splitter's own).
async fn text_layer(pdf: &str, dpi: f32) -> Vec<HashMap<String, usize>> {
    let mut pages = Vec::new();
    for p in pagestream_e2e::rendered(&corpus(pdf), dpi, 1..=u32::MAX).await {
        let mut words = HashMap::new();
        for w in p.text.map(|t| t.words).unwrap_or_default() {
            *words.entry(w.text).or_default() += 1;
        }
        pages.push(words);
    }
    pages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_word_lands_once_in_reading_order_and_exports_follow() {
    let h = Harness::start(|c| c.uploader.crops = vec!["figure".into(), "table".into()]).await.unwrap();
    let born_digital = upload(&h.client, "fig_dbscan-jss.pdf", &[("dpi", "72")]).await;
    let scan = upload(&h.client, "scan_cardinal-rotated.pdf", &[("dpi", "72")]).await;
    for id in [&born_digital, &scan] {
        let st = h.wait_terminal(id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
    }

    // Every word of the text layer is in exactly one region or block.
    let layer = text_layer("fig_dbscan-jss.pdf", 72.0).await;
    assert_eq!(layer.len(), 28);
    let mut with_text = 0;
    for (i, expected) in layer.iter().enumerate() {
        let page = h.result(&born_digital, &format!("pages/{}.json", i + 1));
        assert_eq!(&words_of(&page), expected, "page {}: words lost or duplicated", i + 1);
        let dets = page["detections"].as_array().unwrap();
        let blocks = page["unassigned_text"].as_array().map_or(&[][..], |v| v.as_slice());
        // `order` numbers detections and blocks together: 0..n, each once.
        let mut orders: Vec<u64> =
            dets.iter().chain(blocks).map(|d| d["order"].as_u64().expect("every item is ordered")).collect();
        orders.sort_unstable();
        assert_eq!(orders, (0..orders.len() as u64).collect::<Vec<_>>(), "page {}", i + 1);
        for d in dets {
            let source = d["text_source"].as_str().unwrap();
            let empty = d["text"].as_str().unwrap().is_empty();
            assert!(matches!((source, empty), ("text_layer", false) | ("none", true)), "page {}: {d}", i + 1);
            with_text += usize::from(!empty);
        }
    }
    assert!(with_text > 100, "only {with_text} regions got text");

    // Crops (uploader.crops = figure, table): each such region's image is
    // beside its page, named in its JSON, the box's size, served by the API.
    let mut crops = 0;
    for n in 1..=28 {
        let page = h.result(&born_digital, &format!("pages/{n}.json"));
        for d in page["detections"].as_array().unwrap() {
            let role = pagestream_results::content::role(d["label"].as_str().unwrap());
            let cropped =
                matches!(role, pagestream_results::content::Role::Figure | pagestream_results::content::Role::Table);
            let Some(rel) = d["crop"].as_str() else {
                assert!(!cropped, "page {n}: a {role:?} without its crop: {d}");
                continue;
            };
            assert!(cropped, "page {n}: a {role:?} cropped: {d}");
            assert_eq!(rel, format!("pages/{n}-{}.png", d["order"]));
            let b: Vec<f64> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let (status, png) =
                h.client.get_bytes(&format!("/v1/documents/{born_digital}/results/{rel}")).await.unwrap();
            assert_eq!(status, 200, "{rel}");
            let img = image::load_from_memory(&png).unwrap();
            assert!(
                (f64::from(img.width()) - (b[2] - b[0])).abs() <= 2.0,
                "{rel}: {}x{} for {b:?}",
                img.width(),
                img.height()
            );
            assert!(
                (f64::from(img.height()) - (b[3] - b[1])).abs() <= 2.0,
                "{rel}: {}x{} for {b:?}",
                img.width(),
                img.height()
            );
            crops += 1;
        }
    }
    assert!(crops >= 5, "only {crops} figures and tables cropped");
    // A scan has no text layer: every region says so.
    for n in 1..=4 {
        let page = h.result(&scan, &format!("pages/{n}.json"));
        for d in page["detections"].as_array().unwrap() {
            assert_eq!((d["text_source"].as_str(), d["text"].as_str()), (Some("none"), Some("")), "{d}");
        }
    }

    // Markdown: every page marked, in order, with the article's text.
    let (status, body) =
        h.client.get_bytes(&format!("/v1/documents/{born_digital}/results?format=markdown")).await.unwrap();
    assert_eq!(status, 200);
    let md = String::from_utf8(body.to_vec()).unwrap();
    let marks: Vec<usize> =
        (1..=28).map(|n| md.find(&format!("<!-- page {n} -->")).expect("each page marked")).collect();
    assert!(marks.windows(2).all(|w| w[0] < w[1]), "pages in order");
    assert!(md.contains("DBSCAN"), "the article's text is there");
    // Chunks: JSON Lines with stable ids, in page order, none empty.
    let (status, body) =
        h.client.get_bytes(&format!("/v1/documents/{born_digital}/results?format=chunks")).await.unwrap();
    assert_eq!(status, 200);
    let chunks: Vec<Value> =
        String::from_utf8(body.to_vec()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(chunks.len() >= with_text / 2, "{} chunks", chunks.len());
    let mut last = (0, 0);
    for c in &chunks {
        let (page, order) = (c["page"].as_u64().unwrap(), c["order"].as_u64().unwrap());
        assert_eq!(c["id"].as_str().unwrap(), format!("{born_digital}:{page}:{order}"));
        assert!((page, order) > last, "chunks in reading order: {last:?} then {c}");
        assert!(!c["text"].as_str().unwrap().is_empty());
        last = (page, order);
    }
    // A format that does not exist is refused, naming the ones that do.
    let ans = h.client.get(&format!("/v1/documents/{born_digital}/results?format=docx")).await.unwrap();
    assert_eq!((ans.status.as_u16(), ans.json["error"]["code"].as_str()), (400, Some("invalid_format")));
    assert!(ans.json["error"]["message"].as_str().unwrap().contains("markdown"));

    // The CLI prints the same Markdown, following the document.
    let out = Command::new(bin_dir().join("pagestream"))
        .args(["results", &born_digital, "--follow", "--format", "markdown"])
        .env("PAGESTREAM_URL", h.pipeline.base_url())
        .env_remove("PAGESTREAM_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), md, "the CLI's Markdown is the API's");
    h.stop().await.unwrap();
}

/// A born-digital two-column paper (the acmart sample, committed under
/// tests/fixtures/corpus): its Markdown holds the abstract's first sentence
/// before the introduction's, the first column (abstract, CCS concepts)
/// before the second (keywords, introduction), and the figure's caption
/// right after the figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_column_paper_reads_column_by_column() {
    let h = Harness::start(|_| {}).await.unwrap();
    let pdf = pagestream_e2e::repo_root().join("tests/fixtures/corpus/fig_acm-sample-sigconf.pdf");
    // At the default 150 dpi. (At 100 dpi the layout model merges the
    // figure's caption with the right column's first heading into one box
    // across both columns, and XY-cut then finds no column gap below the
    // figure: noisy boxes are its weak spot; see BENCHMARKS.md.)
    let id = pagestream_e2e::api::submit(&h.client, &pdf, &[]).await;
    let st = h.wait_terminal(&id, Duration::from_secs(300)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    let (status, body) = h.client.get_bytes(&format!("/v1/documents/{id}/results?format=markdown")).await.unwrap();
    assert_eq!(status, 200);
    let md = String::from_utf8(body.to_vec()).unwrap();
    let at = |needle: &str| md.find(needle).unwrap_or_else(|| panic!("{needle:?} is not in the Markdown:\n{md}"));
    let order = [
        "The Name of the Title Is Hope",
        "A clear and well-documented LATEX document is presented",
        "CCS CONCEPTS",
        "KEYWORDS",
        "ACM’s consolidated article template, introduced in 2017",
        "<!-- page 2 -->",
    ];
    for pair in order.windows(2) {
        assert!(at(pair[0]) < at(pair[1]), "{:?} should come before {:?}:\n{md}", pair[0], pair[1]);
    }
    let figure = at("<!-- figure");
    let caption = at("*Figure 1: Seattle Mariners at Spring Training, 2010.*");
    assert_eq!(md[figure..].find("\n\n").map(|n| figure + n + 2), Some(caption), "right after it:\n{md}");
    h.stop().await.unwrap();
}
