#!/usr/bin/env python3
"""Static checks of the deployment files against the code (run by
scripts/check-deploy; no container engine, Nomad or Kubernetes needed).

- compose (single node, and with deploy/compose/cluster.yml): every
  PAGESTREAM_* setting is one the configuration table knows; the cluster
  has 3 NATS nodes and gives every stage all of them with replicas = 3.
- compose against scripts/compose-check (deploy/local/compose_check.py):
  every stage and NATS node has a restart policy and a health check on the
  endpoint the script reads (the stages' /readyz on the port the
  Dockerfile binds, NATS's /healthz), every stage a mem_limit; the image
  variables are the ones scripts/build-images prints; docs/deploy.md shows
  exactly the compose commands the script runs.
- Nomad (deploy/nomad/pagestream.nomad.hcl, parsed with python-hcl2): one
  group per stage running that stage's binary from the image, a /readyz
  check, restart and resources, a canary update with auto-revert, a scaling
  policy on the stage's pagestream_queue_pending, known setting names.
- KEDA (deploy/k8s/*.yaml): every ScaledObject validates against the CRD
  schema in deploy/k8s/schema/, uses the nats-jetstream scaler with the
  metadata it requires, and names a stream and consumer the code creates.
- Grafana (deploy/grafana/pagestream.json): every query uses only metric
  names the code registers (with the exposition's _total / _bucket / _sum
  / _count suffixes).
- Documentation: the metrics table of docs/operations.md lists every
  metric the code registers, with its type and labels, and no other; no
  document (README.md, ARCHITECTURE.md, SECURITY.md, docs/*.md) names a
  metric the code does not register.
- Links: every relative markdown link in README.md, ARCHITECTURE.md,
  SECURITY.md, BENCHMARKS.md and docs/*.md names a file that exists and,
  with #anchor, a heading of that file (GitHub's anchor rules).

Usage: check.py MERGED_SINGLE.yml MERGED_CLUSTER.yml   (docker-compose
config output), or check.py --self-test ... to also prove that
broken files are caught.
"""
import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import hcl2
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["ingress", "splitter", "inferencer", "uploader"]
# Runs only with webhooks on (compose profile `webhooks`); Nomad and KEDA always deploy it.
OPTIONAL = ["notifier"]
WORKERS = ["splitter", "inferencer", "uploader", "notifier"]
PREFIX = "pagestream"
CONFIG_DOC = "docs/configuration.md"
METRICS_DOC = "docs/operations.md"
# Documents whose relative links must resolve; their metric names are checked too
# (BENCHMARKS.md only for links: it records measurements of past builds).
LINKED_DOCS = ["README.md", "ARCHITECTURE.md", "SECURITY.md", "BENCHMARKS.md"]
METRIC_DOCS = ["README.md", "ARCHITECTURE.md", "SECURITY.md"]


def known_settings():
    """PAGESTREAM_* names the configuration accepts: the table of
    docs/configuration.md (kept equal to the code by
    cli/tests/docs_config.rs) and the reserved names of
    pipeline/src/config.rs."""
    names = set(re.findall(r"^\| `(PAGESTREAM_[A-Z0-9_]+)` \|", (ROOT / CONFIG_DOC).read_text(), re.M))
    src = (ROOT / "pipeline/src/config.rs").read_text()
    reserved = re.search(r"const RESERVED_ENV: &\[&str\] = &\[(.*?)\];", src, re.S).group(1)
    names |= set(re.findall(r'"(PAGESTREAM_[A-Z0-9_]+)"', reserved))
    assert len(names) > 40, f"too few settings found: {sorted(names)}"
    return names


def registered_metrics():
    """name -> (kind, labels) of every metric in pipeline/src/metrics.rs's CATALOG."""
    src = (ROOT / "pipeline/src/metrics.rs").read_text()
    catalog = src[src.index("pub const CATALOG"):]
    catalog = catalog[: catalog.index("\n];")]
    defs = re.findall(r'def\(\s*"(pagestream_[a-z_]+)",\s*(Counter|Gauge|Histogram),\s*&\[([^\]]*)\]', catalog)
    assert len(defs) > 15, f"too few metrics found: {defs}"
    return {name: (kind.lower(), re.findall(r'"([a-z_]+)"', labels)) for name, kind, labels in defs}


def code_queues():
    """(stream, consumer) pairs the code provisions, for the default prefix."""
    up = PREFIX.upper()
    pairs = set()
    for d in json.loads((ROOT / "nats/consumers.json").read_text()):
        pairs.add((d["stream"].replace("{PREFIX}", up), d["config"]["durable_name"]))
    model = json.loads((ROOT / "nats/model_consumer.json").read_text())
    for manifest in (ROOT / "models").glob("*/model.toml"):
        name = manifest.parent.name
        pairs.add((model["stream"].replace("{PREFIX}", up), model["config"]["durable_name"].replace("{model}", name)))
    return pairs


def unq(v):
    """python-hcl2 keeps string quotes and wraps expressions in ${…}."""
    if isinstance(v, str) and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1]
    return v


def blocks(node, key):
    return node.get(key, []) if isinstance(node, dict) else []


def named(node, key):
    """Labelled blocks (`group "x" {…}`) as {label: body}."""
    out = {}
    for b in blocks(node, key):
        for label, body in b.items():
            out[unq(label)] = body
    return out


def check_compose(merged, cluster, known, errors):
    where = "compose" + (" (cluster)" if cluster else "")
    services = merged.get("services", {})
    for stage in STAGES + [s for s in OPTIONAL if s in services]:
        svc = services.get(stage)
        if svc is None:
            errors.append(f"{where}: no {stage} service")
            continue
        if svc.get("command") != [stage]:
            errors.append(f"{where}: service {stage} runs {svc.get('command')}, not [{stage!r}]")
        env = svc.get("environment", {}) or {}
        for name in env:
            if name.startswith("PAGESTREAM_") and name not in known:
                errors.append(f"{where}: service {stage} sets {name}, which is not a setting")
        if cluster:
            if str(env.get("PAGESTREAM_NATS_REPLICAS")) != "3":
                errors.append(f"{where}: service {stage} does not set PAGESTREAM_NATS_REPLICAS=3")
            urls = [u for u in str(env.get("PAGESTREAM_NATS_URL", "")).split(",") if u]
            if len(urls) != 3:
                errors.append(f"{where}: service {stage} gets {len(urls)} NATS URLs, not the 3 nodes")
    if cluster:
        nodes = [n for n, s in services.items() if "--cluster_name" in (s.get("command") or [])]
        if len(nodes) != 3:
            errors.append(f"{where}: {len(nodes)} clustered NATS nodes ({nodes}), expected 3")
        for n in nodes:
            cmd = services[n]["command"]
            if "--user" not in cmd or "-js" not in cmd:
                errors.append(f"{where}: NATS node {n} runs without JetStream or without client auth")


def compose_check_module():
    """deploy/local/compose_check.py (standard library only; importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("compose_check", ROOT / "deploy/local/compose_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def probe_url(test):
    """The URL a compose health check probes: pagestream-probe URL (stages),
    wget … URL (NATS)."""
    test = list(test or [])
    if test[:1] == ["CMD"] and len(test) >= 3 and test[1] in ("pagestream-probe", "wget"):
        return test[-1]
    return None


def check_compose_live(merged, cluster, cc, raw_files, dockerfile, deploy_doc, build_images, errors):
    """The compose files agree with what scripts/compose-check runs and reads."""
    where = "compose" + (" (cluster)" if cluster else "")
    services = merged.get("services", {})
    for name, svc in services.items():
        kind = "nats" if name == "nats" or re.fullmatch(r"nats-\d+", name) else name
        if kind not in cc.HEALTH:
            continue
        if svc.get("restart") not in ("unless-stopped", "always", "on-failure"):
            errors.append(f"{where}: service {name} has no restart policy")
        url = probe_url((svc.get("healthcheck") or {}).get("test"))
        if url != cc.HEALTH[kind]:
            errors.append(f"{where}: service {name}'s health check probes {url}, scripts/compose-check reads {cc.HEALTH[kind]}")
        if kind != "nats" and not svc.get("mem_limit"):
            errors.append(f"{where}: service {name} has no mem_limit")
        deps = svc.get("depends_on") or {}
        if kind != "nats" and (not isinstance(deps, dict) or (deps.get("nats") or {}).get("condition") != "service_healthy"):
            errors.append(f"{where}: service {name} does not wait for a healthy NATS (depends_on condition)")
    for stage in STAGES + OPTIONAL:
        port = cc.HEALTH[stage].split(":")[2].split("/")[0]
        var = "PAGESTREAM_INGRESS_ADDR" if stage == "ingress" else f"PAGESTREAM_{stage.upper()}_ADMIN_ADDR"
        if f"{var}=0.0.0.0:{port}" not in dockerfile:
            errors.append(f"Dockerfile: {var} does not bind 0.0.0.0:{port}, the port of {stage}'s health check")
    used = set()
    for text in raw_files:
        used |= set(re.findall(r"^\s*image:\s*\$\{([A-Z_]+):-[^}]+\}", text, re.M))
        for line in re.findall(r"^\s*image:.*$", text, re.M):
            if "${" not in line:
                errors.append(f"{where}: `{line.strip()}` is not chosen by a variable")
    if used != set(cc.IMAGE_VARS):
        errors.append(f"{where}: image variables {sorted(used)}, scripts/compose-check sets {sorted(cc.IMAGE_VARS)}")
    printed = set(re.findall(r"^([A-Z_]+)=\$", build_images, re.M))
    if printed != set(cc.IMAGE_VARS):
        errors.append(f"scripts/build-images prints {sorted(printed)}, scripts/compose-check reads {sorted(cc.IMAGE_VARS)}")
    for name, args in cc.COMMANDS.items():
        line = "docker compose " + " ".join(args)
        if not re.search(rf"^\s*{re.escape(line)}\s*$", deploy_doc, re.M):
            errors.append(f"docs/deploy.md: no line `{line}` (the command scripts/compose-check runs as {name!r})")


def env_names_in(task):
    names = set()
    for env in blocks(task, "env"):
        names |= {k for k in env if not k.startswith("__")}
    for tpl in blocks(task, "template"):
        names |= set(re.findall(r"^\s*(PAGESTREAM_[A-Z0-9_]+)=", unq(tpl.get("data", "")), re.M))
    return names


def check_nomad(doc, known, metrics, errors):
    jobs = named(doc, "job")
    if list(jobs) != ["pagestream"]:
        errors.append(f"nomad: expected one job `pagestream`, found {list(jobs)}")
        return
    job = jobs["pagestream"]
    update = (blocks(job, "update") or [{}])[0]
    if not (update.get("canary", 0) >= 1 and update.get("auto_revert") is True):
        errors.append("nomad: the update block needs a canary and auto_revert = true")
    groups = named(job, "group")
    if sorted(groups) != sorted(STAGES + OPTIONAL):
        errors.append(f"nomad: groups {sorted(groups)}, expected one per stage {sorted(STAGES + OPTIONAL)}")
    for stage, group in groups.items():
        checks = [c for s in blocks(group, "service") for c in blocks(s, "check")]
        if not any(unq(c.get("path")) == "/readyz" and unq(c.get("type")) == "http" for c in checks):
            errors.append(f"nomad: group {stage} has no http check on /readyz")
        if not blocks(group, "restart"):
            errors.append(f"nomad: group {stage} has no restart policy")
        tasks = named(group, "task")
        task = tasks.get(stage)
        if task is None:
            errors.append(f"nomad: group {stage} has no task {stage}")
            continue
        cfg = (blocks(task, "config") or [{}])[0]
        if unq(task.get("driver")) != "docker" or cfg.get("image") != "${var.image}":
            errors.append(f"nomad: task {stage} must run the docker image var.image")
        if [unq(a) for a in cfg.get("args", [])] != [stage]:
            errors.append(f"nomad: task {stage} runs {cfg.get('args')}, not the {stage} binary")
        if not blocks(task, "resources"):
            errors.append(f"nomad: task {stage} has no resources")
        names = env_names_in(task)
        for name in sorted(names - known):
            errors.append(f"nomad: task {stage} sets {name}, which is not a setting")
        if "PAGESTREAM_NATS_URL" not in names:
            errors.append(f"nomad: task {stage} gets no PAGESTREAM_NATS_URL")
        if stage in WORKERS:
            queries = [
                unq(c.get("query", ""))
                for s in blocks(group, "scaling")
                for p in blocks(s, "policy")
                for cs in blocks(p, "check")
                for c in cs.values()
            ]
            want = f'pagestream_queue_pending{{stage=\\"{stage}\\"}}'
            if not any(want in q or want.replace("\\", "") in q for q in queries):
                errors.append(f"nomad: group {stage} has no scaling policy on pagestream_queue_pending{{stage={stage!r}}}")
            for q in queries:
                for metric in re.findall(r"pagestream_[a-z_]+", q):
                    if metric not in metrics:
                        errors.append(f"nomad: group {stage} queries {metric}, which the code does not register")


def metric_base(name):
    for suffix in ["_bucket", "_sum", "_count", "_total"]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_grafana(dash, metrics, errors):
    exprs = [t.get("expr", "") for p in dash.get("panels", []) for t in p.get("targets", [])]
    if len(exprs) < 10:
        errors.append(f"grafana: only {len(exprs)} queries")
    used = set()
    for e in exprs:
        for m in re.findall(r"pagestream_[a-z_]+", e):
            used.add(m)
            if m not in metrics and metric_base(m) not in metrics:
                errors.append(f"grafana: query uses {m}, which the code does not register: {e}")
    for m in metrics:
        if m not in used and not any(metric_base(u) == m or u.startswith(m + "_") for u in used):
            errors.append(f"grafana: no panel shows {m}")


def check_metrics_docs(docs, metrics, errors):
    # The metrics table of METRICS_DOC: | `name` | type | `label`, … | meaning |
    rows = {}
    for name, kind, labels in re.findall(r"^\| `(pagestream_[a-z_]+)` \| (counter|gauge|histogram) \| ([^|]*) \|",
                                         docs[METRICS_DOC], re.M):
        rows[name] = (kind, re.findall(r"`([a-z_]+)`", labels))
    for m, (kind, labels) in sorted(metrics.items()):
        if m not in rows:
            errors.append(f"{METRICS_DOC}: metric {m} is registered by the code but not in the metrics table")
        elif rows[m] != (kind, labels):
            errors.append(f"{METRICS_DOC}: metrics table row of {m} says {rows[m]}, the code registers {(kind, labels)}")
    for path, text in sorted(docs.items()):
        if path not in METRIC_DOCS and not path.startswith("docs/"):
            continue
        for m in sorted(set(re.findall(r"`(pagestream_[a-z_]+)", text))):
            if m not in metrics and metric_base(m) not in metrics and not m.startswith("pagestream_e2e"):
                errors.append(f"{path}: documents metric {m}, which the code does not register")


def strip_code(text):
    """The text without fenced code blocks and with inline code spans kept as
    plain words (so `[x](y)` in code is no link, but [`x`](y) still is)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            if fence is None:
                fence = m.group(1)[:3]
            elif line.strip().startswith(fence):
                fence = None
            out.append("")
            continue
        out.append("" if fence else re.sub(r"`+([^`]*)`+", lambda c: c.group(1).replace("[", "(").replace("]", ")"), line))
    return "\n".join(out)


def slug(heading):
    """GitHub's anchor for a heading: links and code marks dropped, lower
    case, punctuation but - and _ removed, spaces turned into -."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(text):
    """Every heading's anchor in a markdown text (repeats get -1, -2, …)."""
    seen, out = {}, set()
    for line in strip_code(text).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def check_links(docs, errors):
    """Relative links [text](path#anchor) of each document name an existing
    file and, for a markdown file, one of its headings."""
    for path, text in sorted(docs.items()):
        base = (ROOT / path).parent
        for target in re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", strip_code(text)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (base / file).resolve() if file else (ROOT / path).resolve()
            try:
                rel = dest.relative_to(ROOT).as_posix()
            except ValueError:
                errors.append(f"{path}: link {target} leaves the repository")
                continue
            if not dest.exists():
                errors.append(f"{path}: link {target} names {rel}, which does not exist")
                continue
            if anchor and dest.suffix == ".md":
                body = docs[rel] if rel in docs else dest.read_text()
                if anchor.lower() not in anchors(body):
                    errors.append(f"{path}: link {target}: {rel} has no heading with the anchor #{anchor}")


def read_docs():
    """path (relative to the repository) -> text of every document checked."""
    paths = LINKED_DOCS + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    return {p: (ROOT / p).read_text() for p in paths}


def check_keda(docs, schema, queues, errors, metrics=None):
    metrics = registered_metrics() if metrics is None else metrics
    scaled = [d for d in docs if d and d.get("kind") == "ScaledObject"]
    if not scaled:
        errors.append("keda: no ScaledObject")
    seen = set()
    for d in scaled:
        name = d.get("metadata", {}).get("name", "?")
        if d.get("apiVersion") != "keda.sh/v1alpha1":
            errors.append(f"keda: {name}: apiVersion {d.get('apiVersion')}")
        for e in jsonschema.Draft7Validator(schema).iter_errors(d):
            errors.append(f"keda: {name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        for t in d.get("spec", {}).get("triggers", []):
            if t.get("type") == "prometheus":
                # A backlog spread over per-tenant consumers (the splitter's
                # turns) is read from the stages' own queue gauge.
                md = t.get("metadata", {})
                for key in ["serverAddress", "query", "threshold"]:
                    if key not in md:
                        errors.append(f"keda: {name}: metadata.{key} missing")
                query = md.get("query", "")
                used = re.findall(r"(pagestream_[a-z_]+)\{([^}]*)\}", query)
                if not used:
                    errors.append(f"keda: {name}: query {query!r} reads no pagestream metric")
                for metric, sel in used:
                    if metric not in metrics:
                        errors.append(f"keda: {name}: query reads {metric}, which the code does not register")
                        continue
                    for label in re.findall(r"([a-z_]+)\s*=", sel):
                        if label not in metrics[metric][1]:
                            errors.append(f"keda: {name}: {metric} has no label {label}")
                    m = re.search(r'stage="([a-z]+)"', sel)
                    c = re.search(r'consumer="([a-z_]+)"', sel)
                    if m and c:
                        seen.add((f"prometheus:{m.group(1)}", c.group(1)))
                continue
            if t.get("type") != "nats-jetstream":
                errors.append(f"keda: {name}: trigger type {t.get('type')}, expected nats-jetstream or prometheus")
                continue
            md = t.get("metadata", {})
            for key in ["natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"]:
                if key not in md:
                    errors.append(f"keda: {name}: metadata.{key} missing")
            pair = (md.get("stream"), md.get("consumer"))
            if pair not in queues:
                errors.append(f"keda: {name}: stream/consumer {pair} is not one the code creates {sorted(queues)}")
            seen.add(pair)
    # The splitter's backlog is its tenants' turns (one consumer per tenant,
    # summed in pagestream_queue_pending{stage="splitter",consumer="turns"}).
    for stream, consumer in [("prometheus:splitter", "turns"), ("PAGESTREAM_INFERRED", "uploader"),
                             ("PAGESTREAM_EVENTS", "notifier")]:
        if (stream, consumer) not in seen:
            errors.append(f"keda: no ScaledObject for {consumer} ({stream})")
    if not any(c.startswith("inferencer_") for _, c in seen):
        errors.append("keda: no ScaledObject for an inferencer model consumer")


def live_inputs():
    return (compose_check_module(),
            [(ROOT / f).read_text() for f in ["docker-compose.yml", "deploy/compose/cluster.yml"]],
            (ROOT / "Dockerfile").read_text(), (ROOT / "docs/deploy.md").read_text(),
            (ROOT / "scripts/build-images").read_text())


def run(single, cluster, nomad, keda_docs, dash, docs, live=None):
    known, metrics, queues = known_settings(), registered_metrics(), code_queues()
    schema = json.loads((ROOT / "deploy/k8s/schema/scaledobject-v1alpha1.json").read_text())
    errors = []
    check_compose(single, False, known, errors)
    check_compose(cluster, True, known, errors)
    live = live or live_inputs()
    check_compose_live(single, False, *live, errors)
    check_compose_live(cluster, True, *live, errors)
    check_nomad(nomad, known, metrics, errors)
    check_keda(keda_docs, schema, queues, errors)
    check_grafana(dash, metrics, errors)
    check_metrics_docs(docs, metrics, errors)
    check_links(docs, errors)
    return errors


def main():
    args = sys.argv[1:]
    self_test = args[:1] == ["--self-test"]
    if self_test:
        args = args[1:]
    single, cluster = (yaml.safe_load(Path(a).read_text()) for a in args)
    nomad = hcl2.load(open(ROOT / "deploy/nomad/pagestream.nomad.hcl"))
    keda_docs = []
    for f in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        keda_docs += list(yaml.safe_load_all(f.read_text()))
    dash = json.loads((ROOT / "deploy/grafana/pagestream.json").read_text())
    docs = read_docs()
    errors = run(single, cluster, nomad, keda_docs, dash, docs)
    for e in errors:
        print(f"check-deploy: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    if self_test:
        # Each kind of mistake must be caught.
        bad_single = copy.deepcopy(single)
        bad_single["services"]["splitter"]["environment"]["PAGESTREAM_SPLITTER_BOGUS"] = "1"
        bad_single["services"]["inferencer"]["healthcheck"]["test"][-1] = "http://127.0.0.1:9102/livez"
        del bad_single["services"]["uploader"]["mem_limit"]
        bad_cluster = copy.deepcopy(cluster)
        bad_cluster["services"]["uploader"]["environment"]["PAGESTREAM_NATS_REPLICAS"] = "1"
        del bad_cluster["services"]["nats-3"]["restart"]
        cc, raw, dockerfile, deploy_doc, build_images = live_inputs()
        bad_live = (cc, [raw[0].replace("${NATS_IMAGE:-", "${NATS_IMG:-"), raw[1]], dockerfile,
                    deploy_doc.replace("docker compose down -v", "docker compose down --volumes"), build_images)
        bad_nomad = copy.deepcopy(nomad)
        group = named(bad_nomad["job"][0]['"pagestream"'], "group")["inferencer"]
        group["service"][0]["check"][0]["path"] = '"/livez"'
        job = bad_nomad["job"][0]['"pagestream"']
        job["group"] = [g for g in job["group"] if '"notifier"' not in g]
        bad_keda = copy.deepcopy(keda_docs)
        bad_keda[0]["spec"]["triggers"][0]["metadata"]["query"] = (
            'max(pagestream_queue_pending{stage="splitter",consumer="turns",tenant="x"})')
        bad_keda[2]["spec"]["triggers"][0]["metadata"]["consumer"] = "uploader_typo"
        bad_keda[1]["spec"]["minReplicaCount"] = "one"
        bad_dash = copy.deepcopy(dash)
        bad_dash["panels"][0]["targets"][0]["expr"] = "rate(pagestream_pagez_total[1m])"
        bad_docs = dict(docs)
        bad_docs[METRICS_DOC] = docs[METRICS_DOC].replace("pagestream_queue_redelivered", "pagestream_queue_redeliverd").replace(
            "| `pagestream_sse_clients` | gauge |", "| `pagestream_sse_clients` | counter |")
        bad_docs["README.md"] = docs["README.md"] + (
            "\n[gone](docs/no-such-file.md) [moved](docs/operations.md#no-such-heading) [here](#no-such-anchor)"
            " `[not a link](nowhere.md)`\n```\n[in a code block](nowhere-either.md)\n```\n")
        bad_dash["panels"] = [p for p in bad_dash["panels"] if "pagestream_model_info" not in json.dumps(p)]
        found = run(bad_single, bad_cluster, bad_nomad, bad_keda, bad_dash, bad_docs, bad_live)
        wants = ["PAGESTREAM_SPLITTER_BOGUS", "PAGESTREAM_NATS_REPLICAS=3",
                 "inferencer's health check probes http://127.0.0.1:9102/livez", "service uploader has no mem_limit",
                 "service nats-3 has no restart policy", "'NATS_IMG'", "no line `docker compose down -v`", "group inferencer has no http check",
                 "expected one per stage ['inferencer', 'ingress', 'notifier'",
                 "pagestream_queue_pending has no label tenant", "uploader_typo", "minReplicaCount", "pagestream_pagez_total",
                 "metric pagestream_queue_redelivered is registered", "documents metric pagestream_queue_redeliverd",
                 "row of pagestream_sse_clients says ('counter', [])", "no panel shows pagestream_model_info",
                 "link docs/no-such-file.md names docs/no-such-file.md, which does not exist",
                 "docs/operations.md has no heading with the anchor #no-such-heading",
                 "README.md has no heading with the anchor #no-such-anchor"]
        missed = [w for w in wants if not any(w in e for e in found)]
        missed += [f"(wrongly) {w}" for w in ["nowhere.md", "nowhere-either.md"] if any(w in e for e in found)]
        if missed:
            print(f"check-deploy: self-test: mistakes not caught: {missed} (found: {found})", file=sys.stderr)
            sys.exit(1)
    print(f"[check-deploy] compose (single, cluster; health checks, restarts, memory limits, images and commands "
          f"as scripts/compose-check runs them), Nomad, {sum(1 for d in keda_docs if d)} KEDA objects and the "
          f"Grafana dashboard OK; {METRICS_DOC} documents every metric; links in {len(docs)} documents resolve",
          file=sys.stderr)


if __name__ == "__main__":
    main()
