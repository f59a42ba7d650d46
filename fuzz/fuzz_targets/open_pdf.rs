//! Any bytes as a PDF: the splitter's open-and-render path ends with an
//! `OpenFailed`, or `Opened` then one event per page — never a crash or hang.
#![no_main]

use std::collections::HashSet;
use std::io::Write;

use libfuzzer_sys::fuzz_target;
use pagestream_splitter::render::{RenderEvent, RenderRequest, Renderer};

fuzz_target!(|data: &[u8]| {
    let lib = pagestream_splitter::SplitterConfig::default().pdfium_library;
    let renderer = Renderer::in_process(&lib).expect("libpdfium (run scripts/setup)");
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(data).unwrap();
    let mut events = renderer.render(RenderRequest {
        pdf: file.path().to_path_buf(),
        password: None,
        dpi: 36.0,
        max_pixels: 1 << 20,
        pages: 1..=u32::MAX,
        skip: HashSet::new(),
    });
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        match events.recv().await {
            Some(RenderEvent::Opened { page_count }) => {
                let mut seen = 0;
                while let Some(ev) = events.recv().await {
                    assert!(matches!(ev, RenderEvent::Page(_) | RenderEvent::PageFailed { .. }));
                    seen += 1;
                }
                assert_eq!(seen, page_count);
            }
            Some(RenderEvent::OpenFailed { .. }) => {}
            other => panic!("unexpected first event {other:?}"),
        }
    });
});
