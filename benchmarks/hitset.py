"""The proxy benchmarks' shared parts: the site, the query set of issue 11, CPU from /proc, client
threads run for a while (throughput), SIGTERM under load.

Used by benchmarks/bench_hit.py, bench_processes.py, bench_writes.py and bench_memory.py.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fakesg import FakeSite

STATUSES = ["wtg", "ip", "fin", "hld"]


def build_site(site: FakeSite) -> None:
    """About 2,000 rows: 1 project, 4 steps, 20 assets, 10 sequences, 200 shots, 1,000 tasks, 600 versions."""
    proj = {"type": "Project", "id": site.create_direct("Project", {"name": "Bench"})["id"]}
    steps = [site.create_direct("Step", {"code": c, "short_name": c[:3]}) for c in ("Layout", "Anim", "Light", "Comp")]
    assets = [site.create_direct("Asset", {"code": f"asset{i:02d}", "project": proj, "sg_asset_type": "Prop"})
              for i in range(20)]
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i:02d}", "project": proj}) for i in range(10)]
    for i in range(200):
        shot = site.create_direct("Shot", {
            "code": f"sh{i:04d}", "project": proj, "sg_sequence": {"type": "Sequence", "id": seqs[i % 10]["id"]},
            "sg_status_list": STATUSES[i % 4], "sg_cut_in": 1001 + i % 7, "sg_cut_out": 1100 + i % 13,
            "description": f"shot {i}", "assets": [{"type": "Asset", "id": a["id"]} for a in assets[i % 5: i % 5 + i % 3]],
        }, events=False)
        link = {"type": "Shot", "id": shot["id"]}
        for t in range(5):
            task = site.create_direct("Task", {
                "content": f"task{t}", "project": proj, "entity": link, "step": {"type": "Step", "id": steps[t % 4]["id"]},
                "sg_status_list": STATUSES[(i + t) % 4]}, events=False)
            if t < 3:
                site.create_direct("Version", {
                    "code": f"sh{i:04d}_t{t}_v001", "project": proj, "entity": link,
                    "sg_task": {"type": "Task", "id": task["id"]}, "sg_status_list": STATUSES[t]}, events=False)

def queries(direct: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """The query set of issue 11: (label, call on a client)."""
    shot = direct.find_one("Shot", [["code", "is", "sh0042"]])
    asset = direct.find_one("Asset", [["code", "is", "asset03"]])
    tfields = ["content", "sg_status_list", "entity", "step", "project"]
    return [
        ("one Shot by id", lambda sg: sg.find_one("Shot", [["id", "is", shot["id"]]], ["code", "sg_status_list"])),
        ("Tasks with status in [...]", lambda sg: sg.find(
            "Task", [["sg_status_list", "in", ["ip", "wtg"]]], tfields, limit=200)),
        ("Tasks of an entity", lambda sg: sg.find("Task", [["entity", "is", shot]], tfields)),
        ("two-hop deep filter", lambda sg: sg.find(
            "Version", [["entity.Shot.sg_sequence.Sequence.code", "is", "SQ03"]], ["code", "entity", "sg_task"])),
        ("multi-key order", lambda sg: sg.find(
            "Task", [["sg_status_list", "is_not", "hld"]], tfields, limit=200,
            order=[{"field_name": "sg_status_list", "direction": "asc"}, {"field_name": "content", "direction": "desc"},
                   {"field_name": "id", "direction": "asc"}])),
        ("multi_entity `in`", lambda sg: sg.find("Shot", [["assets", "in", [asset]]], ["code", "assets"])),
        ("all Versions", lambda sg: sg.find("Version", [], ["code", "entity", "sg_task", "sg_status_list"])),
    ]

def nodelay(sg: Any) -> Any:
    """Turn Nagle off on the client's open connections (call after a first request)."""
    for conn in sg._connection.connections.values():
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sg

def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

def run_threads(work: Callable[[int], None], threads: int, seconds: float, stop: threading.Event) -> float:
    """Run ``work(n)`` in ``threads`` threads for ``seconds`` (they stop when ``stop`` is set);
    the seconds they ran."""
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def throughput(make_client: Callable[[], Any], calls: list[Callable[[Any], Any]], threads: int,
               seconds: float) -> float:
    """Calls per second from ``threads`` clients each cycling through ``calls`` for ``seconds``."""
    clients = [make_client() for _ in range(threads)]
    for sg in clients:
        calls[0](sg)
        nodelay(sg)
    done = [0] * threads
    stop = threading.Event()

    def work(n: int) -> None:
        i = n
        while not stop.is_set():
            calls[i % len(calls)](clients[n])
            i += 1
            done[n] += 1

    elapsed = run_threads(work, threads, seconds, stop)  # before counting what was done
    return sum(done) / elapsed


def nodelay_after(sg: Any) -> Any:
    """A first request (the connection opens), then Nagle off."""
    sg.find_one("Project", [])
    return nodelay(sg)


def sigterm_under_load(rig: Any, proxy: Any, calls: list[Callable[[Any], Any]], threads: int) -> str:
    """Send SIGTERM to mitmdump while ``threads`` clients read; how long it took to exit, how many
    calls that had started before it failed (cut off), and how many started after it failed."""
    clients = [rig.client(proxy) for _ in range(threads)]
    for sg in clients:
        calls[0](sg)
    failed: list[float] = []  # when each failed call started
    signalled = [float("inf")]
    stop = threading.Event()

    def work(n: int) -> None:
        i = n
        while not stop.is_set():
            started = time.perf_counter()
            try:
                calls[i % len(calls)](clients[n])
            except Exception:  # noqa: BLE001 - the proxy is going away: count how calls end
                failed.append(started)
                return
            i += 1

    workers = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    t0 = signalled[0] = time.perf_counter()
    proxy.proc.send_signal(signal.SIGTERM)
    code = proxy.proc.wait(30)
    took = time.perf_counter() - t0
    stop.set()
    for w in workers:
        w.join(10)
    cut = sum(1 for started in failed if started < signalled[0])
    return (f"exited {took:.2f} s after SIGTERM with status {code}; calls in flight at SIGTERM cut off: {cut}; "
            f"calls started after it that failed: {len(failed) - cut}")
