"""rapid-layout (the Python reference, same PP-PicoDet model on onnxruntime)
timed on the page images the Rust benchmark rendered. Called by
`bench-infer`; prints one JSON line.

    python bench_rapid_layout.py DIR THREADS
"""
import json
import sys
import time
from pathlib import Path

import cv2
from rapid_layout import RapidLayout

folder, threads = Path(sys.argv[1]), int(sys.argv[2])
engine = RapidLayout(engine_cfg={"intra_op_num_threads": threads, "inter_op_num_threads": 1})
# Decoded once up front, as OpenCV gives them (BGR): like the Rust side,
# only detection (pre-processing, model, post-processing) is timed.
pages = [cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))]
for img in pages[:2]:
    engine(img)  # warm-up
ms, boxes = [], 0
for img in pages:
    t = time.perf_counter()
    res = engine(img)
    ms.append((time.perf_counter() - t) * 1000.0)
    boxes += len(res.boxes) if res.boxes is not None else 0
print(json.dumps({"threads": threads, "ms": ms, "detections": boxes}))
