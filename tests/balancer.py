"""A tiny TCP balancer reading HAProxy's configuration (``bind :PORT``, ``server NAME HOST:PORT`` lines, least
connections first): the stand-in for HAProxy where it is not installed (``scripts/topology``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import threading
from pathlib import Path

log = logging.getLogger("sgcache.balancer")


def parse_haproxy(path: Path) -> tuple[int, list[tuple[str, str, int]]]:
    """The frontend's port and the backend servers (name, host, port) of a (simple) haproxy.cfg."""
    text = path.read_text(encoding="utf-8")
    bind = re.search(r"^\s*bind\s+\S*:(\d+)", text, re.M)
    servers = [(m[1], m[2], int(m[3])) for m in re.finditer(r"^\s*server\s+(\S+)\s+([^\s:]+):(\d+)", text, re.M)]
    if bind is None or not servers:
        raise ValueError(f"{path}: no 'bind :PORT' or no 'server NAME HOST:PORT' line")
    return int(bind[1]), servers


class Balancer:
    """Forward each TCP connection to the backend with the fewest open connections (ties in turn)."""

    def __init__(self, backends: dict[str, tuple[str, int]], host: str = "127.0.0.1", port: int = 0):
        self.backends = backends
        self.host, self.port = host, port
        self.active = dict.fromkeys(backends, 0)
        self.served = dict.fromkeys(backends, 0)
        self._turn = itertools.cycle(list(backends))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def _pick(self) -> str:
        least = min(self.active.values())
        return next(name for name in self._turn if self.active[name] == least)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.write_eof() if writer.can_write_eof() else writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        name = self._pick()
        self.active[name] += 1
        self.served[name] += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.backends[name])
        except OSError as exc:
            log.warning("backend %s unreachable: %s", name, exc)
            self.active[name] -= 1
            client_w.close()
            return
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        except asyncio.CancelledError:
            pass  # the balancer stops
        finally:
            self.active[name] -= 1
            for w in (client_w, server_w):
                w.close()

    def start(self) -> Balancer:
        """Serve on a background thread; returns once listening (:attr:`port` is then the real port)."""
        self._thread = threading.Thread(target=self._run, name="balancer", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close the listener and every forwarded connection, then the loop."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
