"""The Python peer pagestream is compared with: what a team writes today in
one process — pypdfium2 renders each page at 150 DPI, rapid-layout runs the
same `layout_cdla` model on onnxruntime, and the same files are written as
pagestream's results contract (`<out>/<doc>/pages/<n>.png`,
`pages/<n>.json`, `manifest.json`). Run by `scripts/bench-compare`.

    python bench_peer.py [--yolo MODEL.onnx] OUT_DIR FILE.pdf [FILE.pdf ...]

--yolo: a YOLOv8 export (yolov8n_doclaynet, or its INT8 variant file) run
as Ultralytics' predictor does (letterbox 1024 on grey 114, RGB / 255,
score 0.25, class-wise NMS 0.45) on onnxruntime, instead of rapid-layout.

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
import numpy as np
import pypdfium2 as pdfium

DPI = 150.0


class Yolo:
    """YOLOv8 on onnxruntime (its defaults: one intra-op thread per core)."""

    def __init__(self, path: str):
        import ast

        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.size = self.input.shape[2]
        self.names = ast.literal_eval(self.session.get_modelmeta().custom_metadata_map["names"])

    def __call__(self, bgr):
        h, w = bgr.shape[:2]
        s = min(self.size / h, self.size / w)
        nw, nh = round(w * s), round(h * s)
        canvas = np.full((self.size, self.size, 3), 114, np.uint8)
        x0, y0 = (self.size - nw) // 2, (self.size - nh) // 2
        canvas[y0 : y0 + nh, x0 : x0 + nw] = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = (canvas[:, :, ::-1].astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        p = self.session.run(None, {self.input.name: np.ascontiguousarray(x)})[0][0].T
        scores = p[:, 4:]
        cls, conf = scores.argmax(1), scores.max(1)
        keep = conf > 0.25
        b, cls, conf = p[keep, :4], cls[keep], conf[keep]
        xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
        xyxy = (xyxy - [x0, y0, x0, y0]) / s
        boxes, out_scores, labels = [], [], []
        for c in sorted(set(cls.tolist())):
            i = np.where(cls == c)[0]
            rects = [[float(a), float(b_), float(c_ - a), float(d - b_)] for a, b_, c_, d in xyxy[i]]
            for j in np.array(cv2.dnn.NMSBoxes(rects, conf[i].tolist(), 0.25, 0.45)).flatten():
                boxes.append(xyxy[i[j]].clip(0, [w, h, w, h]))
                out_scores.append(float(conf[i[j]]))
                labels.append(self.names[c])
        return boxes, out_scores, labels


def main() -> None:
    args = sys.argv[1:]
    yolo = None
    if args and args[0] == "--yolo":
        yolo, args = args[1], args[2:]
    out, files = Path(args[0]), [Path(f) for f in args[1:]]
    if yolo:
        engine, model_name = Yolo(yolo), Path(yolo).name
    else:
        from rapid_layout import RapidLayout

        engine, model_name = RapidLayout(), "layout_cdla"  # onnxruntime's defaults: one intra-op thread per core
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
            if yolo:
                found = engine(img)
            else:
                res = engine(img)
                found = ([], [], []) if res.boxes is None else (res.boxes, res.scores, res.class_names)
            infer_ms = (time.perf_counter() - t1) * 1000.0
            detections = []
            for box, score, label in zip(*found):
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
                "model": {"name": model_name},
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
            "model": {"name": model_name},
            "pages": manifest_pages,
        }
        (out / doc_id / "manifest.json").write_text(json.dumps(manifest, indent=2))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pages": pages_total, "seconds": seconds, "cpu_s": cpu, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
