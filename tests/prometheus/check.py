#!/usr/bin/env python3
"""The dashboard and the alert rules against a real Prometheus scraping two live nodes.

Run by tests/prometheus/run.sh, which starts storescp, site B and site A (site A with a
certificate that expires in 5 days) and passes their ports and pids:

    check.py --work DIR --a-http PORT --b-http PORT --a-dicom PORT --b-link PORT
             --b-pid PID --pacs DIR --inputs DIR [--render PNG]

What it does, in order, each wait with a deadline:
 1. starts Prometheus (scrape and rule evaluation every second) on both nodes, with a
    test copy of deploy/prometheus/alerts.yaml whose windows and `for:` durations are
    short (see test_rules: every rewrite must apply, so a changed rule fails here);
 2. drives traffic: a study by DCMTK storescu into site A, an association with a wrong
    called AE title, TLS handshakes without a client certificate and with TLS 1.2 only;
 3. premise checks: everything arrived at storescp, the link-down alert is not firing, the
    certificate alert fires for site A's node certificate and not for site B's;
 4. stops site B, sends more objects, and waits for DicomGatewayLinkDown to fire for
    site-a -> site-b through Prometheus's own rule evaluation;
 5. every PromQL expression of the dashboard (template variables set to "all") parses and
    returns data; every alert expression parses and each metric it reads has data;
 6. every metric the dashboard and the rules use is exported by a node, except those in
    PENDING (defined in metrics.rs, to be set by the dispatcher), which are printed; a
    PENDING metric that is exported fails the test, so the list stays true;
 7. no label value that Prometheus stored holds a UID, the patient name or ID of the sent
    study (with a positive control: the destination names are found).
Exit status 0 only if everything passed.
"""

import argparse
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "deploy/grafana/dicom-gateway.json")
RULES = os.path.join(ROOT, "deploy/prometheus/alerts.yaml")
STORESCU = os.path.join(os.environ.get("DCMTK_BIN_DIR", "/usr/bin"), "storescu")

# Defined in gateway/src/metrics.rs but set by code that does not set them yet (the
# keystore). Remove a name once it is exported.
PENDING = {
    "dicom_gateway_kek_operations_total": "keystore: wrap/unwrap/rotate/shred",
}

FAILED = []


def log(msg):
    print(f"[prometheus {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check(ok, what):
    if ok:
        log(f"PASS: {what}")
    else:
        log(f"FAIL: {what}")
        FAILED.append(what)
    return ok


def wait_for(pred, timeout, interval=0.5):
    """Poll pred() until it returns something truthy (returned) or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def http_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def http_text(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Prom:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr, at=None):
        """(status, result list, error) of an instant query (now, or at Unix time `at`)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            d = http_json(url)
        except urllib.error.HTTPError as e:
            d = json.loads(e.read().decode() or "{}")
        except OSError as e:
            return "error", [], str(e)
        return d.get("status"), d.get("data", {}).get("result", []), d.get("error", "")

    def query_range(self, expr, start, end, step):
        url = self.base + "/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": start, "end": end, "step": step}
        )
        try:
            return http_json(url, timeout=20).get("data", {}).get("result", [])
        except OSError:
            return []

    def alerts(self):
        try:
            return http_json(self.base + "/api/v1/alerts")["data"]["alerts"]
        except (OSError, KeyError, ValueError):
            return []

    def firing(self, name, **labels):
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == name
            and a["state"] == "firing"
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def rules(self):
        return http_json(self.base + "/api/v1/rules")["data"]["groups"]


def test_rules(text):
    """The rules with short windows for a test run; every rewrite must apply."""
    rewrites = [
        (r"\[15m\]", "[20s]"),  # link down, integrity: windows
        (r"> 900\b", "> 20"),  # link down: oldest age threshold
        (r"for: \S+", "for: 0s"),  # every rule fires on its first evaluation
    ]
    lines = text.split("\n")
    for pattern, repl in rewrites:
        total = 0
        for i, line in enumerate(lines):
            if not line.lstrip().startswith("#"):
                lines[i], n = re.subn(pattern, repl, line)
                total += n
        if total == 0:
            check(False, f"test rules: rewrite {pattern!r} no longer applies to alerts.yaml")
    return "\n".join(lines)


def dashboard_exprs(dash):
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p["title"], t["expr"]))

    walk(dash["panels"])
    return out


def substitute(expr):
    """Template variables as Grafana sets them with "All" selected and a 30 s rate interval."""
    return (
        expr.replace("$node", ".*")
        .replace("$destination", ".*")
        .replace("$__rate_interval", "30s")
    )


METRIC = re.compile(r"\bdicom_gateway_[a-z0-9_]+")


def family(name, exported):
    """The metric family a sample or selector name belongs to."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            return name[: -len(suffix)]
    return name


def exported_families(text):
    """Families with at least one sample in a text exposition."""
    fams = set()
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            types[name] = kind
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        for f in types:
            if name == f or (types[f] == "histogram" and name in (f + "_bucket", f + "_sum", f + "_count")):
                fams.add(f)
    return fams


def storescu(port, files, called="GW_A"):
    return subprocess.run(
        [STORESCU, "-nh", "-to", "30", "-ta", "30", "-td", "60", "-aec", called, "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=300,
    )


def tls_attempt(port, tls12=False):
    """A TLS handshake to the link listener without a client certificate (or TLS 1.2 only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with ctx.wrap_socket(s) as t:
                # TLS 1.3: the server judges the (missing) client certificate after our
                # Finished; reading makes us see its verdict.
                t.settimeout(5)
                t.recv(1)
    except (OSError, ssl.SSLError):
        pass


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    for a in ("--a-http", "--b-http", "--a-dicom", "--b-link", "--b-pid"):
        ap.add_argument(a, type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--pacs", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--render", help="also draw the dashboard from this run into a PNG")
    args = ap.parse_args()

    with open(DASHBOARD) as f:
        dash = json.load(f)
    with open(RULES) as f:
        rules_text = f.read()
    with open(os.path.join(args.inputs, "markers.json")) as f:
        markers = json.load(f)
    study = sorted(
        os.path.join(args.inputs, "study", n) for n in os.listdir(os.path.join(args.inputs, "study"))
    )
    first, second = study[: len(study) - 5], study[len(study) - 5 :]

    # 1. Prometheus
    test_rules_path = os.path.join(args.work, "alerts-test.yaml")
    with open(test_rules_path, "w") as f:
        f.write(test_rules(rules_text))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    prom_port = s.getsockname()[1]
    s.close()
    cfg = os.path.join(args.work, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(
            f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{test_rules_path}]
scrape_configs:
  - job_name: dicom-gateway
    static_configs:
      - targets: ["127.0.0.1:{args.a_http}"]
        labels: {{instance: site-a}}
      - targets: ["127.0.0.1:{args.b_http}"]
        labels: {{instance: site-b}}
"""
        )
    r = subprocess.run(["promtool", "check", "config", cfg], capture_output=True, text=True)
    check(r.returncode == 0, "promtool check config (test config with the test rules)\n" + r.stdout + r.stderr)
    plog = open(os.path.join(args.work, "prometheus.log"), "w")
    prom_proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={cfg}",
            f"--storage.tsdb.path={os.path.join(args.work, 'tsdb')}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=plog,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    prom = Prom(prom_port)
    try:
        run(args, prom, prom_proc, dash, rules_text, markers, first, second)
    finally:
        prom_proc.terminate()
        try:
            prom_proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom_proc.kill()
    if FAILED:
        log(f"{len(FAILED)} check(s) failed")
        return 1
    log("all checks passed")
    return 0


def run(args, prom, prom_proc, dash, rules_text, markers, first, second):
    def targets_up():
        try:
            t = http_json(prom.base + "/api/v1/targets")["data"]["activeTargets"]
        except (OSError, KeyError, ValueError):
            return False
        return len(t) == 2 and all(x["health"] == "up" for x in t)

    if not check(wait_for(targets_up, 60), "Prometheus is up and scrapes both nodes"):
        raise SystemExit(1)
    groups = prom.rules()
    loaded = [r for g in groups for r in g["rules"]]
    check(len(loaded) >= 10 and all(r["health"] != "err" for r in loaded), f"{len(loaded)} rules loaded, none in error")
    t_start = time.time()

    # 2. traffic
    r = storescu(args.a_dicom, first)
    check(r.returncode == 0, f"storescu sent {len(first)} objects to site A\n{r.stderr[-2000:]}")
    r = storescu(args.a_dicom, first[:1], called="WRONG_AE")
    check(r.returncode != 0, "an association with a wrong called AE title is refused")
    for _ in range(3):
        tls_attempt(args.b_link)
    tls_attempt(args.b_link, tls12=True)

    def delivered():
        return len(os.listdir(args.pacs)) >= len(first)

    check(wait_for(delivered, 180), f"storescp received all {len(first)} objects through A and B")

    def value(expr):
        st, res, _ = prom.query(expr)
        return float(res[0]["value"][1]) if st == "success" and res else None

    n = len(first)
    check(
        wait_for(lambda: value('sum(dicom_gateway_forwarded_objects_total{instance="site-b"})') == n, 60),
        f"Prometheus saw site B forward {n} objects",
    )
    check(
        wait_for(lambda: (value('sum(dicom_gateway_tls_handshake_failures_total{instance="site-b"})') or 0) >= 4, 30),
        "Prometheus saw site B's TLS handshake failures",
    )
    # A few scrapes after the traffic, so that rate() and increase() over it have data.
    check(
        wait_for(
            lambda: (value('min(count_over_time(dicom_gateway_tls_handshake_failures_total{instance="site-b",reason="no_certificate"}[1m]))') or 0) >= 5,
            30,
        ),
        "premise: Prometheus has 5 samples of site B's TLS failure counter",
    )
    b_metrics = http_text(f"http://127.0.0.1:{args.b_http}/metrics")

    # 3. premises of the alert checks
    check(not prom.firing("DicomGatewayLinkDown"), "premise: DicomGatewayLinkDown is not firing while the link works")
    check(
        wait_for(lambda: prom.firing("DicomGatewayCertificateExpiring", instance="site-a", certificate="node"), 30),
        "DicomGatewayCertificateExpiring fires for site A's 5-day certificate",
    )
    check(
        not prom.firing("DicomGatewayCertificateExpiring", instance="site-b"),
        "control: it does not fire for site B (valid until 4096)",
    )

    # 4. the link goes down: B stops, A queues
    t_mid = time.time()
    os.kill(args.b_pid, signal.SIGTERM)
    check(wait_for(lambda: not alive(args.b_pid), 60), "site B stopped")
    r = storescu(args.a_dicom, second)
    check(r.returncode == 0, f"site A still accepts {len(second)} objects with B down")
    check(
        wait_for(lambda: (value('sum(dicom_gateway_queue_objects{instance="site-a"})') or 0) >= len(second), 30),
        "premise: site A's queue holds them",
    )
    fired = wait_for(lambda: prom.firing("DicomGatewayLinkDown", instance="site-a", destination="site-b"), 120)
    check(fired, "DicomGatewayLinkDown fires for site-a -> site-b through rule evaluation")
    wait_for(lambda: (value('sum(dicom_gateway_forward_failures_total{instance="site-a"})') or 0) > 0, 30)
    a_metrics = http_text(f"http://127.0.0.1:{args.a_http}/metrics")
    t_end = time.time()

    # 5. every expression parses and returns data
    # Each query is evaluated just before B stopped and at the end (when B's series are
    # stale but A's failures exist); data at either time counts.
    for title, expr in dashboard_exprs(dash):
        q = substitute(expr)
        st, res, err = prom.query(q, at=t_mid)
        if st == "success" and not res:
            st, res, err = prom.query(q, at=t_end)
        pending = [m for m in METRIC.findall(q) if family(m, PENDING) in PENDING]
        if st != "success":
            check(False, f"dashboard '{title}': {q} does not parse: {err}")
        elif res:
            check(True, f"dashboard '{title}': {len(res)} series")
        elif pending:
            log(f"PENDING: dashboard '{title}' has no data yet ({', '.join(sorted(set(pending)))} not exported)")
        else:
            check(False, f"dashboard '{title}': {q} returns no data")
    for g in prom.rules():
        for rule in g["rules"]:
            q = rule["query"]
            st, _, err = prom.query(q)
            check(st == "success", f"rule {rule['name']} parses in Prometheus" + (f": {err}" if err else ""))
            for m in sorted(set(METRIC.findall(q))):
                if m in PENDING:
                    continue
                st, res, _ = prom.query(f"count(last_over_time({{__name__=\"{m}\"}}[10m]))")
                check(bool(res), f"rule {rule['name']}: {m} has data")
    r = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    check(r.returncode == 0, "promtool check rules deploy/prometheus/alerts.yaml\n" + r.stdout + r.stderr)

    # 6. every metric used is exported
    exported = exported_families(a_metrics) | exported_families(b_metrics)
    used = set()
    for _, e in dashboard_exprs(dash):
        used |= set(METRIC.findall(e))
    used |= set(METRIC.findall(rules_text))
    for m in sorted(used):
        f = family(m, exported | set(PENDING))
        if f in PENDING:
            if f in exported:
                check(False, f"{f} is exported now: remove it from PENDING in {__file__}")
            else:
                log(f"PENDING: {f} is not exported yet ({PENDING[f]})")
        else:
            check(f in exported, f"{m} is exported by a node")

    # 7. no patient data in any label value Prometheus stored
    names = http_json(prom.base + "/api/v1/labels")["data"]
    values = []
    for name in names:
        if name == "__name__":
            continue
        values += http_json(prom.base + f"/api/v1/label/{urllib.parse.quote(name)}/values")["data"]
    check({"site-b", "pacs", "lan", "wan"} <= set(values), "control: label values include the configured names")
    needles = [markers["patient_name"], markers["patient_id"], markers["study_uid"], markers["series_uid"]]
    needles += markers["generated_sop_uids"]
    bad = [v for v in values if any(n and n in v for n in needles) or "2.25." in v]
    check(not bad, f"no UID or patient data in {len(values)} label values" + (f": {bad}" if bad else ""))

    if args.render:
        from render_dashboard import render

        render(dash, prom, t_start - 5, t_end + 2, args.render, substitute)
        log(f"dashboard picture written to {args.render}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
