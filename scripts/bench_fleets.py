"""Model fleets, measured (run by `scripts/bench-fleets`). Not a test:
numbers go to BENCHMARKS.md.

  routing   the production layout (stage processes, one model) with the
            binaries in --before (e.g. a build of the commit before model
            routing) and in --bin, alternating, medians: the cost of
            per-model subjects, consumers and the registry.
  fleets    two inferencer fleets on one NATS server: layout_cdla on ONNX
            Runtime and yolov8n_doclaynet on tract (~10x slower per page
            here). The layout_cdla documents alone, then the same documents
            submitted together with yolov8n_doclaynet documents: how long
            each fleet's documents take, pages/s per model, and whether the
            fast fleet waits behind the slow one.

    python bench_fleets.py --bin target/release [--before DIR] [--runs 3] FILE.pdf...
"""
import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import bench_compare as bc


def start_stages(args, bin_dir: Path, work: Path, inferencers: list) -> tuple:
    """nats-server + ingress/splitter/uploader + one inferencer per (model, backend)."""
    nats_port, api_port = bc.free_port(), bc.free_port()
    log = open(work / "stages.log", "w")
    nats = subprocess.Popen(
        [str(args.deps / "bin/nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(work / "nats")],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    env = bc.base_env(work)
    env.update(
        {
            "PAGESTREAM_NATS_URL": f"nats://127.0.0.1:{nats_port}",
            "PAGESTREAM_INGRESS_ADDR": f"127.0.0.1:{api_port}",
            "PAGESTREAM_SPLITTER_ADMIN_ADDR": "",
            "PAGESTREAM_UPLOADER_ADMIN_ADDR": "",
        }
    )
    procs = [nats]
    for s in ["ingress", "splitter", "uploader"]:
        procs.append(subprocess.Popen([str(bin_dir / s)], env=env, stdout=subprocess.DEVNULL, stderr=log))
    admins = []
    for model, backend in inferencers:
        e = dict(env)
        admin = f"127.0.0.1:{bc.free_port()}"
        e.update(
            {
                "PAGESTREAM_INFERENCER_MODEL": model,
                "PAGESTREAM_INFERENCER_BACKEND": backend,
                "PAGESTREAM_INFERENCER_ADMIN_ADDR": admin,
            }
        )
        procs.append(subprocess.Popen([str(bin_dir / "inferencer")], env=e, stdout=subprocess.DEVNULL, stderr=log))
        admins.append(admin)
    api = f"http://127.0.0.1:{api_port}"
    bc.wait_ready(api)
    for a in admins:
        bc.wait_ready("http://" + a)
    return api, procs


def submit(api: str, files: list, model: str = None) -> list:
    ids = []
    for f in files:
        q = f"filename={f.name}" + (f"&model={model}" if model else "")
        ids.append(bc.http("POST", f"{api}/v1/documents?{q}", f.read_bytes(), {"content-type": "application/pdf"})["id"])
    return ids


def routing(args, files):
    rows = {"before": [], "after": []}
    for r in range(args.runs):
        for label, bin_dir in (("before", args.before), ("after", args.bin)):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                api, procs = start_stages(args, bin_dir, work, [("layout_cdla", "ort")])
                try:
                    started = time.perf_counter()
                    ids = submit(api, files)
                    pages, secs = bc.wait_all(api, ids, started)
                finally:
                    bc.stop(procs[1:] + procs[:1])
            rows[label].append(pages / secs)
            print(f"[routing] round {r + 1} {label}: {pages} pages in {secs:.1f} s = {pages / secs:.2f} pages/s", flush=True)
    b, a = statistics.median(rows["before"]), statistics.median(rows["after"])
    print(f"\nrouting overhead, one model, stage processes, median of {args.runs}:")
    print(f"  before (one `inferencer` consumer): {b:.2f} pages/s")
    print(f"  after  (per-model subject+consumer, registry): {a:.2f} pages/s  ({a / b:.3f}x)")


def fleets(args, files, slow_files):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        api, procs = start_stages(args, args.bin, work, [("layout_cdla", "ort"), ("yolov8n_doclaynet", "tract")])
        try:
            started = time.perf_counter()
            pages, alone = bc.wait_all(api, submit(api, files), started)
            print(f"[fleets] layout_cdla alone: {pages} pages in {alone:.1f} s = {pages / alone:.2f} pages/s", flush=True)
            started = time.perf_counter()
            slow_ids = submit(api, slow_files, "yolov8n_doclaynet")
            fast_ids = submit(api, files)
            out = {}

            def watch(name, ids):
                out[name] = bc.wait_all(api, ids, started)

            threads = [threading.Thread(target=watch, args=a) for a in (("fast", fast_ids), ("slow", slow_ids))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            bc.stop(procs[1:] + procs[:1])
    fp, fs = out["fast"]
    sp, ss = out["slow"]
    print("\ntwo fleets on one machine (2 cores), documents submitted together:")
    print(f"  layout_cdla (ORT):       {fp} pages in {fs:.1f} s = {fp / fs:.2f} pages/s (alone: {pages / alone:.2f}; {fs / alone:.2f}x the time)")
    print(f"  yolov8n_doclaynet (tract): {sp} pages in {ss:.1f} s = {sp / ss:.2f} pages/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, required=True)
    ap.add_argument("--before", type=Path)
    ap.add_argument("--deps", type=Path, default=bc.ROOT / ".deps")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slow", type=Path, action="append", default=[], help="PDFs for the slow fleet")
    ap.add_argument("files", type=Path, nargs="+")
    args = ap.parse_args()
    if args.before:
        routing(args, args.files)
    fleets(args, args.files, args.slow or args.files[:1])


if __name__ == "__main__":
    main()
