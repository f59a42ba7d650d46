#!/usr/bin/env python3
"""OCR side by side: pagestream's OCR (target/release/ocr-compare, ONNX Runtime)
against rapidocr-onnxruntime 1.4.4 in Python, the same PP-OCRv4 models, on the
scanned corpus pages of tests/reference/ocr/rapidocr_ref.json, 150 dpi, the
same cores; each contender in its own process, alternating, medians.

Timed: the OCR of each page (det + cls + rec), not the render and not the
model load (both printed). Peak RSS: the contender's process (wait4).

usage: bench_ocr.py --bin target/release --python .deps/venv/bin/python [--runs N]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests/reference/ocr/rapidocr_ref.json"

PEER = r'''
import json, sys, time
from pathlib import Path
import pypdfium2 as pdfium
t = time.perf_counter()
from rapidocr_onnxruntime import RapidOCR
engine = RapidOCR()
load_s = time.perf_counter() - t
pages = []
for file, n in json.loads(sys.argv[2]):
    pdf = pdfium.PdfDocument(str(Path(sys.argv[1]) / file))
    pil = pdf[n - 1].render(scale=150 / 72.0).to_pil().convert("RGB")
    t = time.perf_counter()
    result, _ = engine(pil)
    pages.append({"file": file, "page": n, "wall_s": time.perf_counter() - t, "n_lines": len(result or [])})
print(json.dumps({"load_s": load_s, "pages": pages}))
'''


def run(cmd, env=None):
    """Runs cmd to the end; returns stdout, stderr and its peak RSS in MiB."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o, e = out.read().decode(), err.read().decode()
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {e[-2000:]}")
    return o, e, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, required=True)
    ap.add_argument("--python", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ref = json.loads(REF.read_text())
    pages = [(p["file"], p["page"]) for p in ref["pages"]]
    load = os.getloadavg()
    print(f"# bench-ocr {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {load[0]:.2f}; "
          f"{len(pages)} scanned pages at 150 dpi")
    results = {"pagestream": [], "rapidocr": []}
    rss = {"pagestream": [], "rapidocr": []}
    loads = {"pagestream": [], "rapidocr": []}
    for r in range(args.runs):
        for name in ["rapidocr", "pagestream"]:
            if name == "rapidocr":
                out, err, peak = run([str(args.python), "-c", PEER, str(args.corpus), json.dumps(pages)])
                doc = json.loads(out.strip().splitlines()[-1])
                loads[name].append(doc["load_s"])
            else:
                with tempfile.NamedTemporaryFile(suffix=".json") as f:
                    env = dict(os.environ, PAGESTREAM_CORPUS=str(args.corpus))
                    out, err, peak = run([str(args.bin / "ocr-compare"), "--json", f.name], env)
                    doc = json.loads(Path(f.name).read_text())
                for line in err.splitlines():
                    if line.startswith("loaded "):
                        loads[name].append(float(line.split(" in ")[1].split()[0]))
            rss[name].append(peak)
            results[name].append({(p["file"], p["page"]): p["wall_s"] for p in doc["pages"]})
            total = sum(results[name][-1].values())
            print(f"run {r + 1} {name:<10} OCR {total:.2f} s for {len(pages)} pages = "
                  f"{len(pages) / total:.3f} pages/s, peak RSS {rss[name][-1]:.0f} MiB", flush=True)

    def med(name, key):
        return statistics.median(run[key] for run in results[name])

    print()
    print("| page | rapidocr s | pagestream s | × rapidocr |")
    print("|---|---:|---:|---:|")
    for key in pages:
        a, b = med("rapidocr", key), med("pagestream", key)
        print(f"| {key[0]} p{key[1]} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    tot = {n: statistics.median(sum(run.values()) for run in results[n]) for n in results}
    print(f"| all {len(pages)} pages, pages/s | {len(pages) / tot['rapidocr']:.3f} | "
          f"{len(pages) / tot['pagestream']:.3f} | **{tot['rapidocr'] / tot['pagestream']:.2f}** |")
    print(f"| model load s | {statistics.median(loads['rapidocr']):.2f} | "
          f"{statistics.median(loads['pagestream']):.2f} | |")
    print(f"| peak RSS MiB | {max(rss['rapidocr']):.0f} | {max(rss['pagestream']):.0f} | |")
    print(f"\nmedians of {args.runs} alternating runs; peak RSS: the largest (pagestream's includes its pdfium render)")


if __name__ == "__main__":
    sys.exit(main())
