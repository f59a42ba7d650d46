"""The Python peer pagestream is compared with: what a team writes today in
one process — pypdfium2 renders each page at 150 DPI, rapid-layout runs the
same `layout_cdla` model on onnxruntime, and the same files are written as
pagestream's results contract (`<out>/<doc>/pages/<n>.png`,
`pages/<n>.json`, `manifest.json`). Run by `scripts/bench-compare`.

    python bench_peer.py OUT_DIR FILE.pdf [FILE.pdf ...]

Prints one JSON line: {"pages": N, "seconds": S, "cpu_s": C, "peak_rss_mib": M}
(time and CPU from the first page to the last file: imports and model
loading excluded, as they are for the Rust contenders).
"""
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import cv2
import pypdfium2 as pdfium
from rapid_layout import RapidLayout

DPI = 150.0


def main() -> None:
    out, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
    engine = RapidLayout()  # onnxruntime's defaults: one intra-op thread per core
    started, cpu0 = time.perf_counter(), time.process_time()
    pages_total = 0
    for n_doc, path in enumerate(files):
        doc_id = f"peer-{n_doc:03d}"
        pages_dir = out / doc_id / "pages"
        pages_dir.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        pdf = pdfium.PdfDocument(data)
        manifest_pages = []
        for i in range(len(pdf)):
            t0 = time.perf_counter()
            page = pdf[i]
            # BGR, as OpenCV and rapid-layout expect.
            img = page.render(scale=DPI / 72.0).to_numpy()
            page.close()
            render_ms = (time.perf_counter() - t0) * 1000.0
            t1 = time.perf_counter()
            res = engine(img)
            infer_ms = (time.perf_counter() - t1) * 1000.0
            detections = []
            if res.boxes is not None:
                for box, score, label in zip(res.boxes, res.scores, res.class_names):
                    detections.append(
                        {"label": str(label), "score": float(score), "bbox": [float(v) for v in box]}
                    )
            n = i + 1
            cv2.imwrite(str(pages_dir / f"{n}.png"), img)
            page_json = {
                "page": n,
                "width": int(img.shape[1]),
                "height": int(img.shape[0]),
                "dpi": DPI,
                "model": {"name": "layout_cdla"},
                "detections": detections,
                "timings": {"render_ms": render_ms, "infer_ms": infer_ms},
            }
            (pages_dir / f"{n}.json").write_text(json.dumps(page_json, indent=2))
            manifest_pages.append(
                {"page": n, "status": "ok", "detections": f"pages/{n}.json", "image": f"pages/{n}.png"}
            )
        pdf.close()
        pages_total += len(manifest_pages)
        manifest = {
            "schema": "pagestream.manifest/v1",
            "doc_id": doc_id,
            "title": path.name,
            "source": {"filename": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
            "page_count": len(manifest_pages),
            "status": "completed",
            "model": {"name": "layout_cdla"},
            "pages": manifest_pages,
        }
        (out / doc_id / "manifest.json").write_text(json.dumps(manifest, indent=2))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pages": pages_total, "seconds": seconds, "cpu_s": cpu, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
