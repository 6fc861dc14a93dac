"""The operator's view end to end (one rig for the module: fake SG, ingester, mitmdump with
``sgcache_status`` and a JSON access log): exact counts on /metrics after a scripted workload, the
access log's lines, the ingester's own /metrics, the status page in headless Chromium, and
/healthz turning 503 when the ingester dies and 200 when it is back."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .paths import REPO
from .processes import ScriptProcess
from .rig import KEY, READER, READER_KEY, Rig
from .wait import wait_until

#: A short max lag: /healthz must turn 503 within it once the ingester stops.
MAX_LAG = 2
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_URL_RE = re.compile(r"status page at (http://[\d.]+:\d+/)")
_INGEST_RE = re.compile(r"ingester metrics at (http://[\d.]+:\d+/metrics)")
_SCAN_RE = re.compile(r"scanner metrics at (http://[\d.]+:\d+/metrics)")


@pytest.fixture(scope="module")
def rig(module_db_url: str, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("ops")
    options = [f"sgcache_max_lag={MAX_LAG}", "sgcache_status=127.0.0.1:0", "sgcache_access_log=json"]
    with Rig(workdir, module_db_url, ingester=True, poll_interval=0.5, proxy=options,
             ingest_args=["--metrics", "127.0.0.1:0"]) as rig:
        yield rig


@pytest.fixture(scope="module")
def status_url(rig: Rig) -> str:
    assert rig.proxy is not None
    return wait_until(lambda: _first(_URL_RE, rig.proxy.output()), 10, "the status page's address")


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = _get(url)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _access_records(rig: Rig) -> list[dict]:
    assert rig.proxy is not None
    return [json.loads(line[line.index("{"):]) for line in rig.proxy.lines_with('{"method":')]


def _settled(rig: Rig, url: str) -> tuple[dict, int]:
    """The metrics and the number of access lines once every request counted has its line (a line is
    written after its answer is sent, and reaches the test through mitmdump's output)."""
    def agree() -> tuple[dict, int] | None:
        samples, logged = _samples(url), len(_access_records(rig))
        counted = sum(v for (name, _), v in samples.items() if name == "sgcache_request_seconds_count")
        return (samples, logged) if logged == counted else None

    return wait_until(agree, 10, "every request counted to have its access line")


def test_metrics_and_access_log_count_the_workload(rig: Rig, status_url: str) -> None:
    reader = rig.reader
    assert reader is not None
    before, logged = _settled(rig, status_url + "metrics")
    for _ in range(3):
        assert len(reader.find("Shot", [], ["code"])) == 12  # hits
    for _ in range(2):
        assert reader.find("Shot", [], ["code"], filter_operator="any") == []  # pass: empty-or
    reader.schema_field_read("Shot")  # pass: method
    after, _ = _settled(rig, status_url + "metrics")

    assert _delta(after, before, "sgcache_hits_total", entity_type="Shot") == 3
    assert _delta(after, before, "sgcache_passes_total", reason="empty-or", entity_type="Shot") == 2
    assert _delta(after, before, "sgcache_passes_total", reason="method", entity_type="Shot") == 1
    hits = sum(v for (name, _), v in after.items() if name == "sgcache_hits_total") - \
        sum(v for (name, _), v in before.items() if name == "sgcache_hits_total")
    passes = sum(v for (name, _), v in after.items() if name == "sgcache_passes_total") - \
        sum(v for (name, _), v in before.items() if name == "sgcache_passes_total")
    assert (hits, passes) == (3, 3), "nothing else was counted"
    assert _delta(after, before, "sgcache_hit_service_seconds_count") == 3
    assert _delta(after, before, "sgcache_read_db_seconds_count") == 5  # the reads the database saw
    assert _delta(after, before, "sgcache_request_seconds_count", outcome="hit") == 3
    assert _delta(after, before, "sgcache_request_seconds_count", outcome="pass") == 3
    assert after[("sgcache_replica_fresh", ())] == 1
    assert after[("sgcache_primed_types", ())] >= 1

    records = _access_records(rig)[logged:]
    assert [(r["method"], r["entity_type"], r["outcome"], r["reason"], r["rows"]) for r in records] == \
        [("read", "Shot", "hit", None, 12)] * 3 + [("read", "Shot", "pass", "empty-or", 0)] * 2 + \
        [("schema_field_read", "Shot", "pass", "method", None)]
    assert all(r["client"] == "127.0.0.1" and r["who"] == READER and r["status"] == 200 and r["ms"] >= 0
               for r in records)
    assert KEY not in rig.proxy.output() and READER_KEY not in rig.proxy.output()


def test_ingester_serves_its_own_metrics(rig: Rig) -> None:
    url = wait_until(lambda: _first(_INGEST_RE, rig.ingest_log()), 10, "the ingester's metrics address")
    before = _samples(url)
    assert before[("sgcache_ingester_leader", ())] == 1
    rig.direct().update("Shot", rig.direct().find_one("Shot", [])["id"], {"description": "metrics"})
    rig.wait(lambda: _delta(_samples(url), before, "sgcache_ingester_events_applied_total") >= 1, 10,
             "the ingester to count the update's event")
    assert _delta(_samples(url), before, "sgcache_ingester_polls_total") >= 1


def test_scanner_serves_its_own_metrics(rig: Rig) -> None:
    proc = ScriptProcess("scan", ["--interval", "1", "--metrics", "127.0.0.1:0", "--quiet"], rig.env(),
                         rig.workdir / "scan-metrics.log")
    try:
        url = wait_until(lambda: _first(_SCAN_RE, proc.output()), 20, "the scanner's metrics address",
                         detail=proc.output)
        wait_until(lambda: _samples(url).get(("sgcache_scan_passes_total", (("kind", "reconcile"),)), 0) >= 1, 20,
                   "a reconcile pass counted", detail=proc.output)
        assert _samples(url)[("sgcache_scan_last_pass_timestamp_seconds", ())] > 0
    finally:
        proc.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_status_page_in_headless_chromium(rig: Rig, status_url: str, tmp_path: Path) -> None:
    assert rig.reader is not None and CHROMIUM is not None
    rig.reader.find("Shot", [], ["code"])
    shot = tmp_path / "status.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1100,820", f"--screenshot={shot}", "--dump-dom", status_url],
        capture_output=True, text=True, timeout=60)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'id="health"' in dom and "serving reads" in dom, dom[:2000]
    assert re.search(r"<td>Shot</td><td class=\"n\">\d+</td>", dom), dom  # the window's per-type row
    assert re.search(r"<td>empty-or</td><td class=\"n\">2</td>", dom), dom  # the top pass reasons
    assert re.search(r"<td>Shot</td><td class=\"n\">12</td>", dom), dom  # primed type and its rows
    assert "audit not enabled" in dom
    assert shot.stat().st_size > 1000
    if os.environ.get("SGCACHE_UPDATE_SCREENSHOT") == "1":  # keep docs/status-page.png up to date
        shutil.copy(shot, REPO / "docs" / "status-page.png")


def test_healthz_follows_the_ingester(rig: Rig, status_url: str) -> None:
    assert _get(status_url + "healthz") == (200, "ok: serving reads\n")
    assert rig.ingester is not None
    rig.ingester.stop()
    # stale once the heartbeat is MAX_LAG old; a second of status cache on top
    status, body = wait_until(lambda: (r := _get(status_url + "healthz"))[0] == 503 and r, MAX_LAG + 8,
                              "/healthz to turn 503")
    assert "stale: ingester heartbeat" in body
    assert _samples(status_url + "metrics")[("sgcache_replica_fresh", ())] == 0
    rig.start_ingester()
    wait_until(lambda: _get(status_url + "healthz")[0] == 200, 20, "/healthz to be 200 again")


def test_log_lines_reach_a_pipe_as_they_are_logged(rig: Rig) -> None:
    """Under systemd (the journal), a log shipper or ``| tee``, mitmdump's stdout is a pipe, which
    Python fills in 8 kB blocks: the proxy's warnings and access lines would show up late, or not at
    all when it is killed. Here nothing sets PYTHONUNBUFFERED and the output is a pipe read as it
    comes: the proxy's start (the harness waits for its "listening" line) and a read's access line
    must arrive while it runs."""
    proxy = rig.start_proxy([f"sgcache_max_lag={MAX_LAG}", "sgcache_access_log=json"], capture=True,
                            env={"PYTHONUNBUFFERED": ""})
    try:
        assert len(rig.client(proxy).find("Shot", [], ["code"])) == 12
        wait_until(lambda: '"method":"read","entity_type":"Shot"' in proxy.output(), 10, "the read's access line")
    finally:
        proxy.stop()
