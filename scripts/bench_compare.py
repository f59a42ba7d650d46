"""Side-by-side comparison, one invocation, the same PDFs for every contender
(run by `scripts/bench-compare`, which installs and builds first):

  stages      the four stage binaries as separate processes (release) and a
              nats-server, as in production; PDFs submitted over HTTP
  all-in-one  `pagestream run --embedded-nats` (release): every stage in one
              process, plus the nats-server it starts
  peer        scripts/bench_peer.py: pypdfium2 + rapid-layout in one Python
              process writing the same files
  bound       the model alone on pre-decoded pages (bench-infer --bound),
              best thread layout: what no pipeline can beat

Runs alternate (stages, all-in-one, peer; N rounds) and the table shows
medians. Per run: wall time from the first upload to the last terminal state
(the peer: from its first page to its last file; process start-up and model
loading excluded for everyone), CPU seconds of every process involved over
that time, each process's peak RSS (VmHWM) and the JetStream store's peak
size (sampled every 0.25 s). Nothing here asserts a time.

    python bench_compare.py --bin target/release --venv .deps/venv [--runs 3] [--models M,M@V] FILE.pdf...

--models: the contenders run once per model (the stages and `pagestream run`
serving it, the peer running the same weights file, the bound of that
model): e.g. `yolov8n_doclaynet,yolov8n_doclaynet@int8` compares a variant
with its model, each against the peer with the same file and its own bound.
"""
import argparse
import json
import tomllib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
TERMINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return 0.0


def hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list:
    """Child processes started by any thread of `pid`."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class ChildPeaks(threading.Thread):
    """Peak RSS of the children of some processes (the splitter's
    render-worker, which a splitter may restart), by name, every 0.25 s."""

    def __init__(self, parents: list):
        super().__init__(daemon=True)
        self.parents, self.peaks, self.stop = parents, {}, threading.Event()

    def run(self):
        while not self.stop.wait(0.25):
            for parent in self.parents:
                for c in children(parent):
                    name = comm(c)
                    if name == "render-worker":
                        self.peaks[name] = max(self.peaks.get(name, 0.0), hwm_mib(c))


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


class StoreSampler(threading.Thread):
    """Peak size of a directory, sampled until stopped."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, dir_bytes(self.path))
            self.stop.wait(0.25)


def http(method: str, url: str, body: bytes = None, headers: dict = None) -> dict:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def wait_ready(url: str, within: float = 120.0):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/readyz", timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {within} s")


def submit_and_wait(api: str, files: list) -> tuple:
    """Uploads every file, waits until all are terminal; (pages, seconds)."""
    started = time.perf_counter()
    ids = []
    for f in files:
        ans = http(
            "POST",
            f"{api}/v1/documents?filename={f.name}",
            f.read_bytes(),
            {"content-type": "application/pdf"},
        )
        ids.append(ans["id"])
    return wait_all(api, ids, started)


def wait_all(api: str, ids: list, started: float) -> tuple:
    """Waits until every document is terminal (each must be `completed`);
    (pages, seconds from `started`)."""
    pages, pending = 0, set(ids)
    deadline = time.time() + 3600
    while pending:
        if time.time() > deadline:
            raise SystemExit(f"documents not finished within an hour: {pending}")
        for doc in list(pending):
            st = http("GET", f"{api}/v1/documents/{doc}")
            if st["state"] in TERMINAL:
                if st["state"] != "completed":
                    raise SystemExit(f"document {doc} ended {st['state']}: {st.get('error')}")
                pages += st["pages"]["uploaded"]
                pending.discard(doc)
        time.sleep(0.1)
    return pages, time.perf_counter() - started


def stop(procs: list):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# What each pagestream contender reads besides the boxes. The peer reads no
# text: the rows compared with it run without OCR (the text layer, which
# costs ~5% of a render, stays on as it is by default).
SETTINGS = {
    "text": {"PAGESTREAM_INFERENCER_OCR": "never"},
    "no text": {"PAGESTREAM_INFERENCER_OCR": "never", "PAGESTREAM_SPLITTER_TEXT_LAYER": "false"},
    "text + OCR": {"PAGESTREAM_INFERENCER_OCR": "auto"},
}


def base_env(work: Path, settings: dict = None) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "PAGESTREAM_NATS_PREFIX": "bench",
            "PAGESTREAM_UPLOADER_DIR": str(work / "out"),
            "PAGESTREAM_LOG": env.get("PAGESTREAM_LOG", "warn"),
            **(settings or {}),
        }
    )
    return env


def run_stages(args, files, work: Path, settings: dict) -> dict:
    nats_port, api_port = free_port(), free_port()
    store = work / "nats"
    log = open(work / "stages.log", "w")
    nats = subprocess.Popen(
        [str(args.deps / "bin/nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    env = base_env(work, settings)
    env.update(
        {
            "PAGESTREAM_NATS_URL": f"nats://127.0.0.1:{nats_port}",
            "PAGESTREAM_INGRESS_ADDR": f"127.0.0.1:{api_port}",
            "PAGESTREAM_SPLITTER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "PAGESTREAM_INFERENCER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "PAGESTREAM_UPLOADER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    stages = {}
    for s in ["ingress", "splitter", "inferencer", "uploader"]:
        stages[s] = subprocess.Popen([str(args.bin / s)], env=env, stdout=subprocess.DEVNULL, stderr=log)
    api = f"http://127.0.0.1:{api_port}"
    wait_ready(api)
    for s in ["splitter", "inferencer", "uploader"]:
        wait_ready("http://" + env[f"PAGESTREAM_{s.upper()}_ADMIN_ADDR"])
    procs = {"nats-server": nats, **stages}
    sampler = StoreSampler(store)
    sampler.start()
    workers = ChildPeaks([stages["splitter"].pid])
    workers.start()
    cpu0 = {k: cpu_s(p.pid) for k, p in procs.items()}
    pages, secs = submit_and_wait(api, files)
    per = {k: cpu_s(p.pid) - cpu0[k] for k, p in procs.items()}
    rss = {k: hwm_mib(p.pid) for k, p in procs.items()}
    rss.update(workers.peaks)
    sampler.stop.set()
    workers.stop.set()
    stop(list(stages.values()) + [nats])
    return {"pages": pages, "seconds": secs, "cpu_s": sum(per.values()), "cpu": per, "rss": rss,
            "store_peak": sampler.peak}


def run_all_in_one(args, files, work: Path, settings: dict) -> dict:
    api_port = free_port()
    store = work / "nats"
    env = base_env(work, settings)
    env["PAGESTREAM_INGRESS_ADDR"] = f"127.0.0.1:{api_port}"
    log = open(work / "run.log", "w")
    p = subprocess.Popen(
        [str(args.bin / "pagestream"), "run", "--embedded-nats", "--nats-store", str(store)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    api = f"http://127.0.0.1:{api_port}"
    wait_ready(api, 180)
    nats = [c for c in children(p.pid) if comm(c) == "nats-server"]
    sampler = StoreSampler(store)
    sampler.start()
    workers = ChildPeaks([p.pid])
    workers.start()
    pids = {"pagestream": p.pid, **{"nats-server": c for c in nats}}
    cpu0 = {k: cpu_s(pid) for k, pid in pids.items()}
    pages, secs = submit_and_wait(api, files)
    per = {k: cpu_s(pid) - cpu0[k] for k, pid in pids.items()}
    rss = {k: hwm_mib(pid) for k, pid in pids.items()}
    rss.update(workers.peaks)
    sampler.stop.set()
    workers.stop.set()
    stop([p])
    return {"pages": pages, "seconds": secs, "cpu_s": sum(per.values()), "cpu": per, "rss": rss,
            "store_peak": sampler.peak}


def weights_file(args, model: str) -> Path:
    """The weights file a model (or `model@variant`) runs, from its manifest."""
    base, _, variant = model.partition("@")
    m = tomllib.loads((ROOT / "models" / base / "model.toml").read_text())
    name = m["variants"][variant]["file"] if variant else m["weights"]["file"]
    return args.deps / "models" / name


def run_peer(args, files, work: Path, model: str = "layout_cdla") -> dict:
    out = work / "peer"
    # rapid-layout runs layout_cdla itself; any other model (a YOLOv8 export,
    # or a variant file) runs in the peer's own YOLOv8 loop.
    engine = [] if model == "layout_cdla" else ["--yolo", str(weights_file(args, model))]
    p = subprocess.Popen(
        [str(args.venv / "bin/python"), str(ROOT / "scripts/bench_peer.py"), *engine, str(out)]
        + [str(f) for f in files],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stdout, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"bench_peer.py failed ({p.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {
        "pages": res["pages"],
        "seconds": res["seconds"],
        "cpu_s": res["cpu_s"],
        "rss": {"python": res["peak_rss_mib"]},
        "store_peak": 0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, required=True)
    ap.add_argument("--deps", type=Path, default=ROOT / ".deps")
    ap.add_argument("--venv", type=Path, default=ROOT / ".deps/venv")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--text",
        action="store_true",
        help="also the stages with the text layer off, and with OCR on (auto: the scans)",
    )
    ap.add_argument("--models", default="layout_cdla", help="comma-separated: the contenders run with each")
    ap.add_argument("files", type=Path, nargs="+")
    args = ap.parse_args()
    files = [f.resolve() for f in args.files]
    models = args.models.split(",")

    load = os.getloadavg()
    print(f"# bench-compare {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f}")
    print(f"# files: {', '.join(f.name for f in files)}; models: {', '.join(models)}")

    def ours(fn, settings, model):
        env = {**SETTINGS[settings], "PAGESTREAM_INFERENCER_MODEL": model, "PAGESTREAM_PIPELINE_DEFAULT_MODEL": model}
        return lambda a, f, w: fn(a, f, w, env)

    def tag(name, model):
        return name if len(models) == 1 else f"{name} [{model}]"

    contenders = []  # (name, model, run)
    for model in models:
        contenders += [
            (tag("stages", model), model, ours(run_stages, "text", model)),
            (tag("all-in-one", model), model, ours(run_all_in_one, "text", model)),
        ]
        if args.text and model == models[0]:
            contenders += [
                (tag("stages, text off", model), model, ours(run_stages, "no text", model)),
                (tag("stages, OCR auto", model), model, ours(run_stages, "text + OCR", model)),
            ]
        contenders.append((tag("peer", model), model, lambda a, f, w, m=model: run_peer(a, f, w, m)))
    results = {name: [] for name, _, _ in contenders}
    for r in range(args.runs):
        for name, _, fn in contenders:
            work = Path(tempfile.mkdtemp(prefix="bench-"))
            try:
                res = fn(args, files, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results[name].append(res)
            rss = ", ".join(f"{k} {v:.0f}" for k, v in res["rss"].items())
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in res.get("cpu", {}).items())
            print(
                f"run {r + 1} {name:<10} {res['pages']} pages {res['seconds']:.1f} s "
                f"= {res['pages'] / res['seconds']:.2f} pages/s, CPU {res['cpu_s']:.1f} s, "
                f"peak RSS MiB: {rss}, store peak {res['store_peak'] / 2**20:.1f} MiB"
                + (f"; CPU s per process: {cpu}" if cpu else ""),
                flush=True,
            )

    bounds = {}
    for model in models:
        bound_out = subprocess.run(
            [str(args.bin / "bench-infer"), "--bound"] + [str(f) for f in files],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PAGESTREAM_INFERENCER_MODEL": model},
        ).stdout
        bounds[model] = json.loads(bound_out.strip().splitlines()[-1])
        layouts = ", ".join(f"{l['threads']} thread(s) {l['pages_per_s']:.2f}" for l in bounds[model]["layouts"])
        print(f"bound [{model}]: {bounds[model]['pages']} pages; ORT {layouts} pages/s")

    def pps(name):
        return statistics.median(r["pages"] / r["seconds"] for r in results[name])

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    first_peer = pps(tag("peer", models[0]))
    print()
    print(
        f"| contender | pages | wall s | pages/s | × peer [{models[0]}] | × peer, same model | × own bound "
        "| CPU s/page | peak RSS MiB | JetStream store peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, model, _ in contenders:
        bound_pps = bounds[model]["best_pages_per_s"]
        pages = results[name][0]["pages"]
        keys = results[name][0]["rss"].keys()
        rss = ", ".join(f"{k} {max(r['rss'].get(k, 0) for r in results[name]):.0f}" for k in keys)
        total = max(sum(r["rss"].values()) for r in results[name])
        store = max(r["store_peak"] for r in results[name]) / 2**20
        print(
            f"| {name} | {pages} | {med(name, 'seconds'):.1f} | {pps(name):.2f} | {pps(name) / first_peer:.2f} | "
            f"{pps(name) / pps(tag('peer', model)):.2f} | {pps(name) / bound_pps:.2f} | "
            f"{med(name, 'cpu_s') / pages:.3f} | {rss} (sum {total:.0f}) | {store:.1f} |"
        )
    for model in models:
        bound = bounds[model]
        bound_pps = bound["best_pages_per_s"]
        best = max(bound["layouts"], key=lambda l: l["pages_per_s"])
        print(
            f"| bound [{model}] (ORT, {best['threads']} thread(s), {best['sessions']} session(s), decoded pages) | "
            f"{bound['pages']} | {bound['pages'] / bound_pps:.1f} | {bound_pps:.2f} | {bound_pps / first_peer:.2f} | "
            f"{bound_pps / pps(tag('peer', model)):.2f} | 1.00 | {best['cpu_s_per_page']:.3f} | — | — |"
        )
    if args.text:
        on, off = pps(tag("stages", models[0])), pps(tag("stages, text off", models[0]))
        print(f"\ntext layer on / off: {on:.2f} / {off:.2f} pages/s = {on / off:.3f} "
              f"(costs {100 * (1 - on / off):.1f}% of pages/s)")
        per_run = [a["pages"] / a["seconds"] / (b["pages"] / b["seconds"])
                   for a, b in zip(results[tag("stages", models[0])], results[tag("stages, text off", models[0])])]
        print("per run (on / off): " + ", ".join(f"{x:.3f}" for x in per_run))
    print(f"\nmedians of {args.runs} alternating runs; RSS and store: the largest of the runs")


if __name__ == "__main__":
    sys.exit(main())
