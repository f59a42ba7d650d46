#!/usr/bin/env python3
"""Reference OCR run: rapidocr-onnxruntime==1.4.4 (default config) on the scanned corpus pages.

Pages are rendered with pypdfium2 at 150 dpi (scale = 150/72, RGB, no alpha), handed to
RapidOCR as a PIL image (rapidocr converts RGB -> BGR itself), with all defaults
(det limit_type=min/736, cls on, rec batch 6, text_score 0.5).

Output: rapidocr_ref.json next to this script, plus pages/<pdf>_p<N>.png (the exact input
images, so a Rust port can separate rendering differences from OCR differences).

usage: venv/bin/python run_rapidocr.py [corpus_dir]
"""
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pypdfium2 as pdfium

HERE = Path(__file__).resolve().parent
CORPUS = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/corpus")
FILES = ["scan_c03-29.pdf", "scan_cardinal-rotated.pdf"]
DPI = 150


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    t0 = time.perf_counter()
    from rapidocr_onnxruntime import RapidOCR
    import rapidocr_onnxruntime

    engine = RapidOCR()
    load_s = time.perf_counter() - t0
    out = {
        "tool": "rapidocr-onnxruntime==1.4.4 (default config.yaml)",
        "onnxruntime": onnxruntime.__version__,
        "pypdfium2": str(pdfium.PYPDFIUM_INFO),
        "pdfium": str(pdfium.PDFIUM_INFO),
        "dpi": DPI,
        "render": "pypdfium2 PdfPage.render(scale=dpi/72).to_pil() -> RGB",
        "cpu_count": os.cpu_count(),
        "engine_load_s": round(load_s, 3),
        "rss_after_load_mib": round(rss_mib(), 1),
        "box_format": "4 points [x,y] clockwise from top-left, page pixel coords at 150 dpi",
        "pages": [],
    }
    (HERE / "pages").mkdir(exist_ok=True)
    for name in FILES:
        pdf = pdfium.PdfDocument(str(CORPUS / name))
        for i in range(len(pdf)):
            page = pdf[i]
            pil = page.render(scale=DPI / 72.0).to_pil().convert("RGB")
            png = HERE / "pages" / f"{Path(name).stem}_p{i + 1}.png"
            pil.save(png)
            arr = np.asarray(pil)
            t = time.perf_counter()
            result, elapse = engine(pil)
            wall = time.perf_counter() - t
            lines = []
            for box, text, score in result or []:
                lines.append(
                    {
                        "box": [[round(float(x), 1), round(float(y), 1)] for x, y in box],
                        "text": text,
                        "score": round(float(score), 5),
                    }
                )
            rec = {
                "file": name,
                "page": i + 1,
                "width": pil.width,
                "height": pil.height,
                "png": str(png.relative_to(HERE)),
                "png_rgb_sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
                "n_lines": len(lines),
                "det_s": round(elapse[0], 3) if elapse else None,
                "cls_s": round(elapse[1], 3) if elapse and len(elapse) > 1 else None,
                "rec_s": round(elapse[2], 3) if elapse and len(elapse) > 2 else None,
                "wall_s": round(wall, 3),
                "text": "\n".join(l["text"] for l in lines),
                "lines": lines,
            }
            out["pages"].append(rec)
            print(
                f"{name} p{i + 1} {pil.width}x{pil.height} lines={len(lines)} "
                f"det={rec['det_s']} cls={rec['cls_s']} rec={rec['rec_s']} wall={rec['wall_s']}",
                flush=True,
            )
    out["peak_rss_mib"] = round(rss_mib(), 1)
    (HERE / "rapidocr_ref.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print("peak RSS MiB", out["peak_rss_mib"], "load s", out["engine_load_s"])


if __name__ == "__main__":
    main()
