#!/usr/bin/env python3
"""The scenarios of scripts/compose-check, run against real containers
(podman through its Docker API, driven by docker-compose 1.29). Standard
library only. scripts/compose-check prepares the engine and the images, then
runs this; see docs/deploy.md.

The compose commands are the ones docs/deploy.md tells users to type
(`docker compose …`), with only the project name and the env file added:
COMMANDS below, checked against the document by scripts/check-deploy.
"""
import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CORPUS = Path(os.environ.get("PAGESTREAM_CORPUS", ROOT / ".deps/corpus"))
PROJECT = "pscheck"
API = "http://127.0.0.1:8080"
CLUSTER_FILE = "deploy/compose/cluster.yml"

# What a user types (docs/deploy.md), argument for argument after `docker compose`.
COMMANDS = {
    "up": ["up", "-d"],
    "scale": ["up", "-d", "--scale", "splitter=2", "--scale", "inferencer=2"],
    "down": ["down"],
    "down-volumes": ["down", "-v"],
    "cluster-up": ["-f", "docker-compose.yml", "-f", CLUSTER_FILE, "up", "-d"],
}
# The health endpoints the compose files' health checks probe (and this
# script reads): service -> URL inside the container.
HEALTH = {
    "nats": "http://127.0.0.1:8222/healthz",
    "ingress": "http://127.0.0.1:8080/readyz",
    "splitter": "http://127.0.0.1:9101/readyz",
    "inferencer": "http://127.0.0.1:9102/readyz",
    "uploader": "http://127.0.0.1:9103/readyz",
    "notifier": "http://127.0.0.1:9104/readyz",
}
ADMIN_PORT = {"splitter": 9101, "inferencer": 9102, "uploader": 9103}
STAGES = ["ingress", "splitter", "inferencer", "uploader"]
# The image variables the compose files read (scripts/build-images prints them).
IMAGE_VARS = ["PAGESTREAM_IMAGE", "NATS_IMAGE", "MINIO_IMAGE", "MC_IMAGE"]
THREE = ["fig_dbscan-jss.pdf", "text_R-intro.pdf", "scan_c03-29.pdf"]
MID_DOC = "text_R-intro.pdf"
HUGE = "huge_R-fullrefman.pdf"


def log(msg):
    print(f"[compose-check] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def run(cmd, check_rc=True, capture=True, timeout=900):
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=capture, timeout=timeout)
    if check_rc and p.returncode != 0:
        raise Failed(f"{' '.join(cmd)} exited {p.returncode}: {(p.stderr or '')[-3000:]}")
    return p


def podman(*args, check_rc=True):
    return run(["podman", *args], check_rc=check_rc)


class Compose:
    def __init__(self, env_file, cluster=False):
        self.base = ["docker-compose", "-p", PROJECT, "--env-file", str(env_file)]
        self.cluster = cluster

    def __call__(self, name, timeout=900):
        args = COMMANDS[name]
        if self.cluster and args[:1] != ["-f"]:
            args = ["-f", "docker-compose.yml", "-f", CLUSTER_FILE, *args]
        log(f"docker compose {' '.join(args)}")
        return run([*self.base, *args], timeout=timeout)


def containers(service=None, all_=False):
    """[(id, name, service)] of this project's containers."""
    args = ["ps", "--format", "json", "--filter", f"label=com.docker.compose.project={PROJECT}"]
    if all_:
        args.append("-a")
    if service:
        args += ["--filter", f"label=com.docker.compose.service={service}"]
    out = podman(*args).stdout.strip()
    rows = json.loads(out) if out else []
    return sorted((r["Id"], r["Names"][0], r["Labels"].get("com.docker.compose.service")) for r in rows)


def inspect(cid):
    return json.loads(podman("inspect", cid).stdout)[0]


class HealthTicker(threading.Thread):
    """podman runs health checks from systemd timers; there is no systemd
    here, so this runs them (`podman healthcheck run`) as the timers would:
    every 2 s for a container not yet healthy, every 15 s otherwise."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.last = {}

    def run(self):
        while not self.stop.is_set():
            try:
                now = time.monotonic()
                for cid, _, service in containers():
                    if health_kind(service) not in HEALTH:
                        continue
                    healthy, at = self.last.get(cid, (False, 0))
                    if now - at < (15 if healthy else 2):
                        continue
                    rc = subprocess.run(["podman", "healthcheck", "run", cid], capture_output=True).returncode
                    self.last[cid] = (rc == 0, now)
            except Exception:  # a container gone between ps and run
                pass
            self.stop.wait(1)


def health_kind(service):
    """nats-2, nats-3 (the cluster's nodes) are checked as nats."""
    return "nats" if re.fullmatch(r"nats(-\d+)?", service or "") else service


# The 503s the API answered (with Retry-After) and were retried, as a client
# should: [(seconds since the check started, method path)].
RETRIED = []
STARTED = time.monotonic()


def http(method, path, token, body=None, ctype=None, timeout=30, patience=60):
    """One API call; a 503 `unavailable` (a dependency failing over) is
    retried after its Retry-After for up to `patience` seconds."""
    t0 = time.monotonic()
    while True:
        req = urllib.request.Request(API + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {token}")
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
                return json.loads(data) if r.headers.get("content-type", "").startswith("application/json") else data
        except urllib.error.HTTPError as e:
            retry = e.headers.get("Retry-After")
            if e.code != 503 or retry is None or time.monotonic() - t0 > patience:
                raise Failed(f"{method} {path}: HTTP {e.code} {e.read()[:500]!r}") from e
            RETRIED.append((time.monotonic() - STARTED, f"{method} {path}"))
            log(f"{method} {path}: 503, retrying after {retry} s")
            time.sleep(float(retry))


def wait_healthy(services, since=None, timeout=300):
    """Waits until every container of `services` is healthy and the API
    answers /readyz on the published port. Returns {service: seconds from
    `since` (default: now) until its containers were all first seen
    healthy} (the health checks run every 2 s until then: HealthTicker)."""
    t0 = time.monotonic()
    since = t0 if since is None else since
    first = {}  # container name -> seconds from `since` when first seen healthy
    while True:
        states, seen, of = {}, set(), {}
        for cid, name, service in containers():
            if service in services:
                st = inspect(cid)["State"]
                states[name] = (st.get("Health") or st.get("Healthcheck") or {}).get("Status", st["Status"])
                seen.add(service)
                of[name] = service
                if states[name] == "healthy":
                    first.setdefault(name, time.monotonic() - since)
        ready = False
        try:
            with urllib.request.urlopen(API + "/readyz", timeout=2) as r:
                ready = r.status == 200
        except (urllib.error.URLError, OSError):
            pass
        if ready and seen == set(services) and all(v == "healthy" for v in states.values()):
            per = {}
            for name, service in of.items():
                per[service] = max(per.get(service, 0), first[name])
            return per
        if time.monotonic() - t0 > timeout:
            raise Failed(f"not healthy after {timeout} s: {states}, API ready: {ready}")
        time.sleep(1)


def healthy_at(per):
    """'nats 5 s, ingress 12 s, …': when each service was first seen healthy."""
    return ", ".join(f"{s} {v:.0f} s" for s, v in sorted(per.items(), key=lambda kv: kv[1]))


def submit(token, name):
    data = (CORPUS / name).read_bytes()
    r = http("POST", f"/v1/documents?filename={name}&title={name}", token, data, "application/pdf", timeout=120)
    check(r.get("id"), f"submit {name}: {r}")
    log(f"submitted {name}: {r['id']}")
    return r["id"]


def status(token, doc):
    return http("GET", f"/v1/documents/{doc}", token)


TERMINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


def wait_done(token, docs, timeout=1800, during=None):
    """Waits for every document to end; `during(statuses)` is called each
    second until then. Returns {doc: status}."""
    t0 = time.monotonic()
    while True:
        sts = {d: status(token, d) for d in docs}
        if during:
            during(sts)
        if all(s["state"] in TERMINAL for s in sts.values()):
            return sts
        if time.monotonic() - t0 > timeout:
            raise Failed(f"documents not done after {timeout} s: {[(d, s['state'], s.get('pages')) for d, s in sts.items()]}")
        time.sleep(1)


def s3_objects(prefix=""):
    """{key: size} in the results bucket, listed from inside the S3 container."""
    (cid, _, _), = containers("minio")
    code = (
        "import boto3, json, os\n"
        "s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:9000', region_name='us-east-1',"
        " aws_access_key_id=os.environ['MINIO_ROOT_USER'], aws_secret_access_key=os.environ['MINIO_ROOT_PASSWORD'])\n"
        "out = {}\n"
        f"for page in s3.get_paginator('list_objects_v2').paginate(Bucket='results', Prefix={prefix!r}):\n"
        "    out.update({o['Key']: o['Size'] for o in page.get('Contents', [])})\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(podman("exec", cid, "python3", "-c", code).stdout)


def s3_get(key):
    (cid, _, _), = containers("minio")
    code = (
        "import boto3, os, sys\n"
        "s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:9000', region_name='us-east-1',"
        " aws_access_key_id=os.environ['MINIO_ROOT_USER'], aws_secret_access_key=os.environ['MINIO_ROOT_PASSWORD'])\n"
        f"sys.stdout.write(s3.get_object(Bucket='results', Key={key!r})['Body'].read().decode())\n"
    )
    return podman("exec", cid, "python3", "-c", code).stdout


def page_events(token, doc):
    """{page: number of `uploaded` page events} from the document's event
    stream, replayed from its start (it ends after the terminal state)."""
    req = urllib.request.Request(f"{API}/v1/documents/{doc}/events", headers={"Authorization": f"Bearer {token}"})
    counts, event = {}, None
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "page":
                d = json.loads(line[5:])
                if d.get("page_state") == "uploaded":
                    counts[d["page"]] = counts.get(d["page"], 0) + 1
    return counts


def verify_results(token, doc, name):
    """Every page's results are in S3 exactly as the manifest lists them,
    and each page was uploaded exactly once. Returns the page count."""
    st = status(token, doc)
    check(st["state"] == "completed", f"{name}: state {st['state']} ({st.get('error')}, failed pages {st.get('failed_pages')})")
    n = st["page_count"]
    pages = st["pages"]
    check(pages["uploaded"] == n and pages["failed"] == 0, f"{name}: {n} pages but counts {pages}")
    keys = s3_objects(f"{doc}/")
    manifest = json.loads(s3_get(f"{doc}/manifest.json"))
    check(manifest["status"] == "completed" and manifest["page_count"] == n, f"{name}: manifest {manifest['status']}, {manifest['page_count']} pages")
    listed = [p["page"] for p in manifest["pages"]]
    check(sorted(listed) == list(range(1, n + 1)), f"{name}: manifest lists pages {listed[:10]}… not 1..{n} once each")
    missing = [p for p in range(1, n + 1) if f"{doc}/pages/{p}.json" not in keys or f"{doc}/pages/{p}.png" not in keys]
    check(not missing, f"{name}: pages without results in S3: {missing[:20]}")
    extra = sorted(k for k in keys if not re.fullmatch(rf"{doc}/(manifest\.json|pages/\d+\.(json|png))", k))
    check(not extra, f"{name}: unexpected objects {extra[:10]}")
    events = page_events(token, doc)
    dup = {p: c for p, c in events.items() if c != 1}
    lost = [p for p in range(1, n + 1) if p not in events]
    check(not dup and not lost, f"{name}: uploaded events: duplicated {dup}, missing {lost[:20]}")
    return n


def metrics(cid, port):
    script = f'exec 3<>/dev/tcp/127.0.0.1/{port}; printf "GET /metrics HTTP/1.0\\r\\n\\r\\n" >&3; cat <&3'
    return podman("exec", cid, "bash", "-c", script).stdout


def metric(text, name, labels):
    pat = re.compile(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
    total = 0.0
    for lab, val in pat.findall(text):
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(val)
    return total


def cgroup_dir(cid):
    st = inspect(cid)["State"]
    path = st.get("CgroupPath") or ""
    for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]:
        p = Path(base + path)
        if path and p.is_dir():
            return p
    raise Failed(f"no memory cgroup for {cid[:12]} ({path!r})")


def memory_figures(cid):
    d = cgroup_dir(cid)
    read = lambda f: (d / f).read_text() if (d / f).exists() else ""
    peak = read("memory.max_usage_in_bytes") or read("memory.peak")
    limit = read("memory.limit_in_bytes") or read("memory.max")
    oom = re.search(r"oom_kill (\d+)", read("memory.oom_control") or read("memory.events"))
    stat = dict(line.split() for line in read("memory.stat").splitlines() if line)
    return {
        "peak": int(peak) if peak.strip().isdigit() else None,
        "limit": int(limit) if limit.strip().isdigit() else None,
        "oom_kills": int(oom.group(1)) if oom else 0,
        "rss": int(stat.get("total_rss", stat.get("anon", 0))),
    }


class StatsSampler(threading.Thread):
    """`podman stats` every 10 s: the runtime's own view of each container's
    memory (usage without the page cache it can drop); keeps the maximum."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max = {}

    def run(self):
        while not self.stop.is_set():
            p = subprocess.run(["podman", "stats", "--no-stream", "--format", "json"], capture_output=True, text=True)
            try:
                for row in json.loads(p.stdout or "[]"):
                    name = row.get("name") or row.get("Name")
                    used = parse_size((row.get("mem_usage") or row.get("MemUsage") or "0B / 0B").split("/")[0])
                    self.max[name] = max(self.max.get(name, 0), used)
            except (ValueError, KeyError):
                pass
            self.stop.wait(10)


def parse_size(s):
    m = re.match(r"\s*([0-9.]+)\s*([kKMGT]?i?B)?", s)
    if not m:
        return 0
    mult = {"B": 1, "kB": 1e3, "KB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 2**20, "GB": 1e9, "GiB": 2**30}.get(m.group(2) or "B", 1)
    return int(float(m.group(1)) * mult)


def mib(n):
    return "—" if n is None else f"{n / 2**20:.0f}"


def kill9(cid, what):
    pid = inspect(cid)["State"]["Pid"]
    check(pid > 0, f"{what}: no pid")
    os.kill(pid, 9)
    log(f"kill -9 {what} (pid {pid})")


def restarted(cid, before, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = inspect(cid)
        if st.get("RestartCount", 0) > before and st["State"]["Status"] == "running":
            return
        time.sleep(0.5)
    raise Failed(f"{cid[:12]} was not restarted by its restart policy")


def image_sizes(images):
    out = {}
    for var in IMAGE_VARS:
        ref = images[var]
        out.setdefault(ref, int(json.loads(podman("image", "inspect", ref).stdout)[0]["Size"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="skip the 2415-page document")
    a = ap.parse_args()
    out = Path(a.out)
    images = dict(line.split("=", 1) for line in Path(a.images).read_text().split() if "=" in line)
    token = secrets.token_hex(16)
    env_file = out / "check.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        "NATS_USER": "pagestream", "NATS_PASSWORD": secrets.token_hex(16),
        "MINIO_ROOT_USER": "pagestream", "MINIO_ROOT_PASSWORD": secrets.token_hex(16),
        "PAGESTREAM_API_TOKENS": token, "NATS_CLUSTER_PASSWORD": secrets.token_hex(16),
        "PAGESTREAM_NOTIFIER_SECRET": "", **images}.items()))
    env_file.chmod(0o600)
    rows = []  # (what, figure)
    killed = []
    compose = Compose(env_file)
    ticker = HealthTicker()
    ticker.start()

    # A run before this one may have left its containers.
    for cluster in (True, False):
        run([*Compose(env_file, cluster).base, *(["-f", "docker-compose.yml", "-f", CLUSTER_FILE] if cluster else []),
             "down", "-v", "--remove-orphans"], check_rc=False)
    sizes = image_sizes(images)
    for ref, size in sizes.items():
        rows.append((f"image {ref}", f"{size / 1e6:.0f} MB"))

    try:
        # --- single node -------------------------------------------------
        t0 = time.monotonic()
        compose("up")
        up_s = time.monotonic() - t0
        per = wait_healthy(["nats"] + STAGES, since=t0)
        ready = time.monotonic() - t0
        rows.append(("single node: `up -d` to every container healthy and the API ready",
                     f"{ready:.1f} s (`up -d` returned at {up_s:.1f} s; first seen healthy: {healthy_at(per)})"))
        log(f"healthy in {ready:.1f} s ({healthy_at(per)})")

        t0 = time.monotonic()
        docs = {submit(token, n): n for n in THREE}
        sts = wait_done(token, docs)
        took = time.monotonic() - t0
        pages = sum(verify_results(token, d, n) for d, n in docs.items())
        rows.append((f"3 PDFs ({', '.join(THREE)}) through the API, 1 replica each", f"{pages} pages in {took:.1f} s = {pages / took:.2f} pages/s; all in S3"))
        earlier = list(docs)

        # --- scale ---------------------------------------------------------
        compose("scale")
        wait_healthy(["nats"] + STAGES)
        reps = {s: containers(s) for s in ("splitter", "inferencer")}
        check(all(len(v) == 2 for v in reps.values()), f"scale: replicas {[(s, len(v)) for s, v in reps.items()]}")

        # --- kill -9 mid-document (while scaled) ---------------------------
        t0 = time.monotonic()
        doc = submit(token, MID_DOC)
        victims = {"inferencer": reps["inferencer"][0], "splitter": reps["splitter"][1]}
        done_kill = set()

        def during(sts):
            st = sts[doc]
            n = st.get("page_count") or 0
            up = st["pages"]["uploaded"]
            if n and "inferencer" not in done_kill and up >= n * 0.2:
                cid, name, _ = victims["inferencer"]
                rc = inspect(cid).get("RestartCount", 0)
                kill9(cid, f"{name} at {up}/{n} pages uploaded")
                restarted(cid, rc)
                done_kill.add("inferencer")
                killed.append(f"{name} (kill -9 at {up}/{n} pages)")
            elif n and "splitter" not in done_kill and st["pages"]["rendered"] < n and up >= n * 0.4:
                cid, name, _ = victims["splitter"]
                rc = inspect(cid).get("RestartCount", 0)
                kill9(cid, f"{name} at {up}/{n} pages uploaded")
                restarted(cid, rc)
                done_kill.add("splitter")
                killed.append(f"{name} (kill -9 at {up}/{n} pages)")

        wait_done(token, [doc], during=during)
        took = time.monotonic() - t0
        n = verify_results(token, doc, MID_DOC)
        check("inferencer" in done_kill, "the document ended before an inferencer could be killed mid-document")
        rows.append((f"{MID_DOC}, 2 splitters + 2 inferencers, {len(done_kill)} kill -9 mid-document",
                     f"{n} pages in {took:.1f} s; lost 0, duplicated 0 (manifest, S3 keys, one `uploaded` event per page)"))
        earlier.append(doc)

        # Both replicas of each scaled stage take pages: the 3 PDFs again,
        # at once, counted by each replica's own /metrics (before and after:
        # a replica killed above restarted its counters at 0).
        before = {cid: metric(metrics(cid, ADMIN_PORT[s]), "pagestream_pages_total", {"stage": s})
                  for s, v in reps.items() for cid, _, _ in v}
        t0 = time.monotonic()
        again = {submit(token, n): n for n in THREE}
        wait_done(token, list(again))
        took = time.monotonic() - t0
        pages = sum(verify_results(token, d, n + " (scaled)") for d, n in again.items())
        earlier += list(again)
        per = []
        for s, v in reps.items():
            for cid, name, _ in v:
                delta = metric(metrics(cid, ADMIN_PORT[s]), "pagestream_pages_total", {"stage": s}) - before[cid]
                per.append((name, delta))
                check(delta > 0, f"scale: replica {name} took no page (pagestream_pages_total +{delta})")
        rows.append((f"scaled to 2 splitters + 2 inferencers: the 3 PDFs again",
                     f"{pages} pages in {took:.1f} s = {pages / took:.2f} pages/s; pages per replica (its pagestream_pages_total): "
                     + ", ".join(f"{name} {int(v)}" for name, v in per)))

        # What the single-node containers used so far (the scan's pages are
        # OCR'd: the inferencer's largest working set), and no OOM kill:
        # the killed replicas were restarted in their own container.
        peaks = []
        for cid, name, service in containers():
            if service not in STAGES:
                continue
            st, m = inspect(cid), memory_figures(cid)
            check(not st["State"].get("OOMKilled") and m["oom_kills"] == 0,
                  f"{name}: OOM killed (oom_kill {m['oom_kills']}) with the 3 PDFs (limit {mib(m['limit'])} MiB)")
            peaks.append(f"{name} {mib(m['peak'])}/{mib(m['limit'])}")
        rows.append(("single node, peak/limit MiB (cgroup) after the 3 PDFs twice (the scan OCR'd), scaling and the kills; OOM kills 0",
                     ", ".join(peaks)))

        # --- down, up: volumes keep the documents ----------------------------
        compose("down")
        t0 = time.monotonic()
        compose("up")
        up_s = time.monotonic() - t0
        per = wait_healthy(["nats"] + STAGES, since=t0)
        rows.append(("single node: `down`, `up -d` (volumes kept) to healthy",
                     f"{time.monotonic() - t0:.1f} s (`up -d` returned at {up_s:.1f} s; first seen healthy: {healthy_at(per)})"))
        listed = http("GET", "/v1/documents?limit=100", token)
        items = listed.get("documents", listed.get("items", [])) if isinstance(listed, dict) else listed
        ids = {d.get("id") for d in items}
        gone = [d for d in earlier if d not in ids]
        check(not gone, f"after down/up: documents no longer listed: {gone}")
        rows.append(("after `down` / `up -d`", f"all {len(earlier)} earlier documents still listed"))

        # --- memory: the 2415-page document under the limits ------------------
        if not a.quick:
            sampler = StatsSampler()
            sampler.start()
            restarts = {cid: inspect(cid).get("RestartCount", 0) for cid, _, _ in containers()}
            t0 = time.monotonic()
            doc = submit(token, HUGE)
            last = [0, time.monotonic()]

            def progress(sts):
                st = sts[doc]
                if time.monotonic() - last[1] > 60:
                    log(f"{HUGE}: {st['pages']} of {st.get('page_count')}")
                    last[1] = time.monotonic()

            wait_done(token, [doc], timeout=2400, during=progress)
            took = time.monotonic() - t0
            n = verify_results(token, doc, HUGE)
            sampler.stop.set()
            rows.append((f"{HUGE} under the memory limits, 1 replica each", f"{n} pages in {took:.0f} s = {n / took:.2f} pages/s"))
            for cid, name, service in containers():
                st = inspect(cid)
                m = memory_figures(cid)
                rc = st.get("RestartCount", 0) - restarts.get(cid, 0)
                check(not st["State"].get("OOMKilled") and m["oom_kills"] == 0 and rc == 0,
                      f"{name}: OOM killed or restarted during {HUGE} (oom_kill {m['oom_kills']}, restarts {rc})")
                rows.append((f"memory {service} ({name})",
                             f"peak {mib(m['peak'])} MiB (cgroup, with page cache), podman stats max {mib(sampler.max.get(name))} MiB, "
                             + (f"limit {mib(m['limit'])} MiB" if m['limit'] and m['limit'] < 2**50 else "no limit") + ", OOM kills 0"))
        compose("down-volumes")

        # --- cluster -----------------------------------------------------------
        cluster = Compose(env_file, cluster=True)
        t0 = time.monotonic()
        cluster("cluster-up")
        up_s = time.monotonic() - t0
        per = wait_healthy(["nats", "nats-2", "nats-3"] + STAGES, since=t0)
        ready = time.monotonic() - t0
        rows.append(("cluster: 3 NATS nodes, nats.replicas=3, `up -d` to healthy",
                     f"{ready:.1f} s (`up -d` returned at {up_s:.1f} s; first seen healthy: {healthy_at(per)})"))
        t0 = time.monotonic()
        doc = submit(token, MID_DOC)
        stopped = []

        def stop_one(sts):
            st = sts[doc]
            n = st.get("page_count") or 0
            if n and not stopped and st["pages"]["uploaded"] >= n * 0.25:
                (cid, name, _), = containers("nats-2")
                log(f"podman stop {name} at {st['pages']['uploaded']}/{n} pages uploaded")
                podman("stop", "-t", "0", cid)
                stopped.append(f"{name} (stopped at {st['pages']['uploaded']}/{n} pages)")

        wait_done(token, [doc], during=stop_one)
        took = time.monotonic() - t0
        check(stopped, "cluster: the document ended before a NATS node could be stopped")
        n = verify_results(token, doc, MID_DOC + " (cluster)")
        killed += stopped
        during = [t for t, _ in RETRIED if t >= t0 - STARTED]
        answered = (f"the API answered {len(during)} request(s) 503 + Retry-After within {max(during) - min(during) + 2:.0f} s of the stop, then served again"
                    if during else "every API request answered")
        rows.append((f"cluster: {MID_DOC} with one NATS node stopped mid-document",
                     f"{n} pages in {took:.1f} s; completed, lost 0, duplicated 0; {answered}"))
        cluster("down-volumes")
    finally:
        ticker.stop.set()
        rows.append(("killed", "; ".join(killed) or "nothing"))
        rows.append(("API answers 503 + Retry-After, retried by this check", ", ".join(f"{w} at {t:.0f} s" for t, w in RETRIED) or "none"))
        rows.append(("lost or duplicated pages", "none found" if not sys.exc_info()[0] else "CHECK FAILED (see above)"))
        table = "| what | figure |\n|---|---|\n" + "".join(f"| {w} | {f} |\n" for w, f in rows)
        (out / "summary.md").write_text(table)
        print(table)
        if sys.exc_info()[0]:
            logs = out / "logs"
            logs.mkdir(exist_ok=True)
            for cid, name, _ in containers(all_=True):
                (logs / f"{name}.log").write_text(podman("logs", "--tail", "300", cid, check_rc=False).stderr +
                                                   podman("logs", "--tail", "300", cid, check_rc=False).stdout)
            log(f"container logs in {logs}; containers left running for inspection (docker-compose -p {PROJECT} down -v)")


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        print(f"[compose-check] FAILED: {e}", file=sys.stderr)
        sys.exit(1)
