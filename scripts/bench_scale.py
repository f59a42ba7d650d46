"""How cost grows with page count (run by `scripts/bench-scale`): one PDF
through the stage processes (release) and a nats-server with monitoring.
Prints first-result latency, pages/s, the peak RSS of every process
(nats-server included), the JetStream store's peak, status GET latency
early and late in the document, NATS messages and bytes per page of the
uploader's connection, and optionally how long a small document submitted
mid-run takes (`--small FILE`).

    python bench_scale.py --bin target/release FILE.pdf [--small SMALL.pdf]
"""
import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_compare import (
    ROOT,
    StoreSampler,
    base_env,
    free_port,
    hwm_mib,
    http,
    stop,
    wait_ready,
)


def get_latency_ms(api: str, doc: str, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        http("GET", f"{api}/v1/documents/{doc}")
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def connz(monitor: str) -> dict:
    with urllib.request.urlopen(f"{monitor}/connz?limit=1024", timeout=10) as r:
        return {c.get("name", ""): c for c in json.load(r)["connections"]}


def live_mib(monitor: str) -> float:
    """What JetStream itself accounts as stored (live messages), in MiB."""
    with urllib.request.urlopen(f"{monitor}/jsz", timeout=10) as r:
        return json.load(r).get("storage", 0) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, required=True)
    ap.add_argument("--deps", type=Path, default=ROOT / ".deps")
    ap.add_argument("--small", type=Path, help="submitted once the big document has 20 pages done")
    ap.add_argument("file", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    nats_port, mon_port, api_port = free_port(), free_port(), free_port()
    store = work / "nats"
    log = open(work / "stages.log", "w")
    nats = subprocess.Popen(
        [str(args.deps / "bin/nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port),
         "-m", str(mon_port), "-sd", str(store)],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    env = base_env(work)
    env.update({
        "PAGESTREAM_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "PAGESTREAM_INGRESS_ADDR": f"127.0.0.1:{api_port}",
        "PAGESTREAM_SPLITTER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "PAGESTREAM_INFERENCER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "PAGESTREAM_UPLOADER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
    })
    stages = {s: subprocess.Popen([str(args.bin / s)], env=env, stdout=subprocess.DEVNULL, stderr=log)
              for s in ["ingress", "splitter", "inferencer", "uploader"]}
    api, monitor = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{mon_port}"
    try:
        wait_ready(api)
        for s in ["splitter", "inferencer", "uploader"]:
            wait_ready("http://" + env[f"PAGESTREAM_{s.upper()}_ADMIN_ADDR"])
        sampler = StoreSampler(store)
        sampler.start()
        up0 = connz(monitor).get("uploader", {})
        started = time.perf_counter()
        doc = http("POST", f"{api}/v1/documents?filename={args.file.name}", args.file.read_bytes(),
                   {"content-type": "application/pdf"})["id"]
        first = early = small_s = None
        small = None
        last_report = time.perf_counter()
        live_peak = 0.0
        while True:
            live_peak = max(live_peak, live_mib(monitor))
            st = http("GET", f"{api}/v1/documents/{doc}")
            done = st["pages"]["uploaded"] + st["pages"]["failed"]
            if first is None and done >= 1:
                first = time.perf_counter() - started
            if early is None and done >= 20:
                early = get_latency_ms(api, doc)
                if args.small:
                    small_at = time.perf_counter()
                    small = http("POST", f"{api}/v1/documents?filename={args.small.name}",
                                 args.small.read_bytes(), {"content-type": "application/pdf"})["id"]
            if small and small_s is None:
                if http("GET", f"{api}/v1/documents/{small}")["state"] in ("completed", "completed_with_errors"):
                    small_s = time.perf_counter() - small_at
                    small_big_done = done
            if st["state"] in ("completed", "completed_with_errors", "failed", "cancelled"):
                break
            if time.perf_counter() - last_report > 60:
                last_report = time.perf_counter()
                print(f"[{last_report - started:6.0f} s] {done} pages done, nats-server peak {hwm_mib(nats.pid):.0f} MiB, "
                      f"store on disk peak {sampler.peak / 2**20:.1f} MiB, live {live_peak:.1f} MiB, "
                      f"status GET {get_latency_ms(api, doc, 3):.1f} ms", flush=True)
            time.sleep(1.0)
        wall = time.perf_counter() - started
        late = get_latency_ms(api, doc)
        up1 = connz(monitor).get("uploader", {})
        pages = st["page_count"]
        sampler.stop.set()
        rss = {k: hwm_mib(p.pid) for k, p in {"nats-server": nats, **stages}.items()}
        print(f"# bench-scale {time.strftime('%Y-%m-%d %H:%M')}: {args.file.name}, {pages} pages, state {st['state']}")
        print(f"wall {wall:.1f} s = {pages / wall:.2f} pages/s; first result {first:.2f} s after upload")
        print("peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
        print(f"JetStream store peak: {sampler.peak / 2**20:.1f} MiB on disk, {live_peak:.1f} MiB live (jsz storage)")
        early_s = f"{early:.1f} ms after 20 pages" if early is not None else "(fewer than 20 pages)"
        print(f"status GET median: {early_s}, {late:.1f} ms at the end")
        if up0 and up1:
            msgs = (up1["in_msgs"] - up0["in_msgs"]) / pages
            sent = (up1["out_bytes"] - up0["out_bytes"]) / pages
            print(f"uploader connection per page: {msgs:.1f} messages sent to NATS, {sent / 1024:.1f} KiB received")
        if small_s is not None:
            print(f"small document {args.small.name}: completed {small_s:.1f} s after submission, "
                  f"while the big one had {small_big_done} of {pages} pages done")
        manifest = json.loads((work / "out" / doc / "manifest.json").read_text())
        ok = sum(1 for p in manifest["pages"] if p["status"] == "ok")
        print(f"manifest: status {manifest['status']}, {len(manifest['pages'])} pages listed, {ok} ok")
    finally:
        stop(list(stages.values()) + [nats])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
