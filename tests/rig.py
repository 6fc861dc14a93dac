"""The one end-to-end rig: a fake SG site behind its HTTP(S) server, a replica, and the project's
processes around them (``scripts/scan``, ``scripts/ingest-events``, mitmdump), with real clients.

    with Rig(tmp_path, db_url) as rig:        # populate(), scan --full, mitmdump (sgcache_max_lag=0)
        rig.client().find(...)
    Rig(tmp_path, db_url, site, ingester=True, poll_interval=0.2)   # + the ingester and a reader client
    Rig(tmp_path, db_url, prime=None, proxy=False)                   # the site only: the test drives the rest

Every test and benchmark that runs the proxy or the scripts builds on this class; a test that needs
one more piece asks the rig for it (:meth:`Rig.start_proxy`, :meth:`Rig.start_ingester`) so the rig
stops it with the rest.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import shotgun_api3
import sqlalchemy as sa

from cache.replica.schema import Schema, parse_rules
from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR
from cache.replica.store import Store

from .certs import self_signed
from .fakesg import FakeSGServer, FakeSite
from .paths import ADDON, RULES
from .processes import ScriptProcess, run_script, script_env
from .proxyharness import Proxy
from .replica import SiteClient, prime
from .wait import wait_until

#: Distinctive secrets: tests/secretscan.py looks for them in every log and answer of the run.
SCRIPT, KEY = "pipeline", "sk-7f3a9c1e-NeverLogMe"
HUMAN, HUMAN_PASSWORD = "ann", "pw-4b8d2e6f-NeverLogMe"
#: Client credentials for a proxy run with mitmproxy's ``proxyauth``.
PROXY_USER, PROXY_PASSWORD = "studio", "pp-3c7a1f90-NeverLogMe"
#: A second script for the reading client of an ingester rig: the fake's request log tells its reads
#: (a proxy miss) from the ingester's polls and fetches.
READER, READER_KEY = "reader", "rk-5d1e8b2c-NeverLogMe"
#: Proxy options of a rig without an ingester: no heartbeat needed.
RIG_OPTIONS = ["sgcache_max_lag=0"]
#: The proxy modes a rig runs mitmdump in.
MODES = ("regular", "reverse")


def populate(site: FakeSite) -> None:
    """A small studio: a project, sequences, shots with links, assets."""
    project = site.create_direct("Project", {"name": "Demo"})
    proj = {"type": "Project", "id": project["id"]}
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i:02d}", "project": proj}) for i in (1, 2)]
    assets = [site.create_direct("Asset", {"code": f"asset{i}", "project": proj}) for i in range(3)]
    for i in range(12):
        seq = seqs[i % 2]
        fields: dict[str, Any] = {
            "code": f"sh{i * 10:03d}" if i != 5 else "SH050",
            "project": proj,
            "sg_sequence": {"type": "Sequence", "id": seq["id"]} if i != 7 else None,
            "sg_cut_in": 1001 + i if i != 3 else None,
            "sg_status_list": ["ip", "fin", "wtg"][i % 3],
            "assets": [{"type": "Asset", "id": a["id"]} for a in assets[: i % 4]],
        }
        site.create_direct("Shot", fields)


def populate_with_human(site: FakeSite) -> None:
    """:func:`populate`, plus the human user ``HUMAN`` (password ``HUMAN_PASSWORD``)."""
    populate(site)
    site.add_human(HUMAN, HUMAN_PASSWORD, firstname="Ann", lastname="Lee")


def site_schema_file(site: FakeSite, path: Path, rules: str | None = None, extra_rules: str = "") -> Path:
    """The cached subset of the fake site's schema, by ``rules`` (default: the project's own) plus ``extra_rules``."""
    text = (RULES.read_text() if rules is None else rules) + "\n" + extra_rules
    schema = Schema.from_schema_read(site.schema).brief().filtered(parse_rules(text))
    path.write_text(schema.to_yaml(), encoding="utf-8")
    return path


class Rig:
    """A fake SG site and its server, a replica on ``db_url``, and what the options ask for.

    ``site``: the site (default: the basic schema filled by ``populate_site``); the rig adds the script
    ``SCRIPT`` to it. ``rules``/``extra_rules``: the cached subset (default: the project's rules), written
    to ``workdir/schema.yml``; or ``schema``, a schema file used as it is.
    ``prime``: ``"scan"`` (``scripts/scan --full``), ``"direct"`` (in-process, no subprocess) or None.
    ``ingester``: start ``scripts/ingest-events`` (every ``poll_interval``; steadily unless ``idle_backoff``,
    plus ``ingest_args``) and a reader client (:attr:`reader`, its own credentials).
    ``proxy``: True for mitmdump with the default options (``RIG_OPTIONS``, or none beside an ingester:
    then the heartbeat counts), a list for those options, False for none; ``sgcache_site`` is added.
    ``tls``: serve the site over https as ``https://localhost:<port>`` with a self-signed certificate.
    ``mode``: ``"regular"`` (clients set ``http_proxy``) or ``"reverse"`` (mitmdump ``--mode reverse:<site>``,
    without ``sgcache_site``: the target is the site; clients name the proxy as their site, over https with
    the site's certificate given to mitmproxy as the studio's own, ``--set certs=*=...``).
    ``s3_uploads``: the site offers direct uploads to its storage (tests/fakesg/files.py), served by the same
    server under another host name (``127.0.0.1`` for an https site named ``localhost``, else ``localhost``).
    """

    def __init__(self, workdir: Path, db_url: str, site: FakeSite | None = None, *,
                 populate_site: Callable[[FakeSite], None] = populate, rules: str | None = None,
                 extra_rules: str = "", schema: Path | None = None, prime: str | None = "scan",
                 proxy: bool | Sequence[str] = True, proxy_db_url: str | None = None, ingester: bool = False,
                 poll_interval: float = 1.0, idle_backoff: bool = False, ingest_args: Sequence[str] = (),
                 tls: bool = False, mode: str = "regular", s3_uploads: bool = False):
        assert mode in MODES, mode
        if site is None:
            site = FakeSite.basic()
            site.add_script(SCRIPT, KEY)
            populate_site(site)
        self.workdir, self.db_url, self.site, self.mode = workdir, db_url, site, mode
        self.s3_uploads = s3_uploads
        self.rules, self.extra_rules, self.prime = rules, extra_rules, prime
        self.proxy_options, self.proxy_db_url = proxy, proxy_db_url
        self.run_ingester, self.poll_interval, self.ingest_args = ingester, poll_interval, list(ingest_args)
        if not idle_backoff and "--idle-max" not in self.ingest_args:
            self.ingest_args += ["--idle-max", str(poll_interval)]  # polls measure the pipeline, not the back-off
        self.tls_cert: Path | None = None
        tls_key: Path | None = None
        if tls:
            self.tls_cert, tls_key = self_signed(workdir)
        self.server = FakeSGServer(site, tls_cert=self.tls_cert and str(self.tls_cert),
                                   tls_key=tls_key and str(tls_key))
        self.schema_path = schema or workdir / "schema.yml"
        self._write_schema = schema is None
        self.proxy: Proxy | None = None  # the first proxy started
        self.proxies: list[Proxy] = []
        self.ingester: ScriptProcess | None = None  # the first ingester started
        self.ingesters: list[ScriptProcess] = []
        self.reader: shotgun_api3.Shotgun | None = None
        self._store: Store | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> Rig:
        """Serve the site, write the schema file, prime, then start the ingester and the proxy as asked."""
        if not self.site.has_script(SCRIPT):
            self.site.add_script(SCRIPT, KEY)
        if self.run_ingester and not self.site.has_script(READER):
            self.site.add_script(READER, READER_KEY)
        self.server.start()
        self.site.files.configure(self.url, self.storage_url, self.s3_uploads)
        if self._write_schema:
            site_schema_file(self.site, self.schema_path, self.rules, self.extra_rules)
        if self.prime == "scan":
            self.scan("--full")
        elif self.prime == "direct":
            prime(self.open_store(create=True), SiteClient(self.site))
        if self.run_ingester:
            self.start_ingester()
        if self.proxy_options is not False:
            default = [] if self.run_ingester else RIG_OPTIONS
            self.start_proxy(default if self.proxy_options is True else self.proxy_options,
                             db_url=self.proxy_db_url)
        if self.run_ingester and self.proxy is not None:
            self.reader = self.client(script_name=READER, api_key=READER_KEY)
            self.reader.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits
        return self

    def stop(self) -> None:
        """Stop every process the rig started, then the server."""
        for proxy in self.proxies:
            proxy.stop()
        for proc in self.ingesters:
            proc.stop()
        if self._store is not None:
            self._store.dispose()
        self.server.stop()

    def __enter__(self) -> Rig:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the site --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The site's URL as clients and the proxy name it."""
        return f"https://localhost:{self.server.port}" if self.tls_cert else self.server.url

    @property
    def storage_url(self) -> str:
        """The base URL of the site's storage (its S3): the same server under another host name."""
        host = "127.0.0.1" if self.tls_cert else "localhost"
        return f"{self.server.scheme}://{host}:{self.server.port}/storage"

    def reads(self) -> int:
        """How many reads the fake SG has served."""
        return self.site.count("read")

    def reader_reads(self) -> int:
        """Reads the fake SG served to the reader client (each one a proxy miss)."""
        return self.site.count_by_script("read", READER)

    # -- processes -----------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the project's scripts for this site and replica."""
        if self.tls_cert is not None:
            extra.setdefault("SHOTGUN_API_CACERTS", str(self.tls_cert))
        return script_env(self.url, self.db_url, self.schema_path, SCRIPT, KEY, **extra)

    def run(self, name: str, *args: str, **env: str) -> Any:
        """Run ``scripts/<name>`` to its end (it must succeed); the completed process."""
        return run_script(name, *args, env=self.env(**env))

    def scan(self, *args: str) -> Any:
        return self.run("scan", *(args or ("--full",)), "--quiet")

    def start_ingester(self, *args: str) -> ScriptProcess:
        """``scripts/ingest-events`` with the rig's poll options plus ``args``, logging to ``ingest[-n].log``."""
        n = len(self.ingesters)
        log = self.workdir / ("ingest.log" if n == 0 else f"ingest-{n}.log")
        proc = ScriptProcess("ingest-events", ["--poll-interval", str(self.poll_interval), *self.ingest_args, *args],
                             self.env(), log)
        self.ingesters.append(proc)
        self.ingester = self.ingester or proc
        return proc

    def ingest_log(self) -> str:
        """The output of every ingester started, oldest first."""
        return "\n".join(proc.output() for proc in self.ingesters)

    def start_proxy(self, options: Sequence[str] = RIG_OPTIONS, *, db_url: str | None = None,
                    workdir: Path | None = None, addon: Path = ADDON, capture: bool = True,
                    prefix: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Proxy:
        """mitmdump in front of the site (``sgcache_site`` added unless named) on this replica (or ``db_url``),
        running ``addon`` (default: the project's); ``capture``, ``prefix``, ``env``: see :class:`Proxy`."""
        options = list(options)
        reverse = self.mode == "reverse"
        if not reverse and not any(o.startswith("sgcache_site=") for o in options):
            options.append(f"sgcache_site={self.url}")
        if self.tls_cert is not None and not any(o.startswith("ssl_verify_upstream_trusted_ca=") for o in options):
            options.append(f"ssl_verify_upstream_trusted_ca={self.tls_cert}")
        if workdir is None:
            workdir = self.workdir if not self.proxies else self.workdir / f"proxy-{len(self.proxies)}"
        workdir.mkdir(parents=True, exist_ok=True)
        if reverse and self.tls_cert is not None:
            options.append(f"certs=*={self._studio_pem()}")
        proxy = Proxy(workdir, db_url or self.db_url, self.schema_path, options, addon=addon,
                      mode=f"reverse:{self.url}" if reverse else "regular", capture=capture,
                      prefix=prefix, env=env)
        self.proxies.append(proxy)
        proxy.start()
        self.proxy = self.proxy or proxy
        return proxy

    def _studio_pem(self) -> Path:
        """The site's certificate and key in one file: the studio certificate a reverse proxy serves."""
        pem = self.workdir / "studio-cert-and-key.pem"
        if not pem.exists():
            assert self.tls_cert is not None
            key = self.tls_cert.with_name("fakesg-key.pem")
            pem.write_bytes(self.tls_cert.read_bytes() + key.read_bytes())
        return pem

    def through(self, proxy: Proxy) -> Rig:
        """This rig seen through another of its proxies (a view: stop the rig, not the view)."""
        view = copy.copy(self)
        view.proxy = proxy
        return view

    # -- clients ---------------------------------------------------------------------------
    def proxy_url(self, proxy: Proxy | None = None) -> str:
        """The site URL a client of ``proxy`` uses: the site's own (regular mode), or the proxy's (reverse)."""
        proxy = proxy or self.proxy
        assert proxy is not None, "the rig runs no proxy"
        if not proxy.reverse:
            return self.url
        return f"https://localhost:{proxy.port}" if self.tls_cert else f"http://127.0.0.1:{proxy.port}"

    def client(self, proxy: Proxy | None = None, **kwargs: Any) -> shotgun_api3.Shotgun:
        """A real shotgun_api3 client going through the proxy: with ``http_proxy`` and trusting mitmproxy's
        CA on https (regular mode), or naming the proxy as its site and trusting the studio certificate
        (reverse mode)."""
        proxy = proxy or self.proxy
        assert proxy is not None, "the rig runs no proxy"
        kwargs.setdefault("script_name", SCRIPT)
        kwargs.setdefault("api_key", KEY)
        if proxy.reverse:
            if self.tls_cert is not None:
                kwargs.setdefault("ca_certs", str(self.tls_cert))
            return shotgun_api3.Shotgun(self.proxy_url(proxy), **kwargs)
        if self.tls_cert is not None:
            kwargs.setdefault("ca_certs", str(proxy.ca_cert))
        return shotgun_api3.Shotgun(self.url, http_proxy=proxy.address, **kwargs)

    def direct(self) -> shotgun_api3.Shotgun:
        """A client that talks to the fake SG without the proxy (the oracle)."""
        extra = {"ca_certs": str(self.tls_cert)} if self.tls_cert is not None else {}
        return shotgun_api3.Shotgun(self.url, script_name=SCRIPT, api_key=KEY, **extra)

    def wait_hit(self, query: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 10.0,
                 pause: float = 0.02, script: str = READER) -> tuple[float, int]:
        """Run ``query`` until ``check`` holds on an answer that was a cache hit: one for which SG
        served no read to ``script`` (the client ``query`` uses: the reader client by default).

        Returns (seconds from the call to the first such answer, misses on the way)."""
        start = time.monotonic()
        misses = 0
        last: list[Any] = []

        def hit_and_right() -> bool:
            nonlocal misses
            before = self.site.count_by_script("read", script)
            value = query()
            hit = self.site.count_by_script("read", script) == before
            misses += not hit
            last[:] = [value]
            return hit and check(value)

        wait_until(hit_and_right, timeout, "a cache hit with the expected answer", pause=pause,
                   detail=lambda: f"{misses} misses; last answer {last!r}\n{self.ingest_log()[-3000:]}")
        return time.monotonic() - start, misses

    # -- the replica -----------------------------------------------------------------------
    def open_store(self, create: bool = False) -> Store:
        """The replica, opened in this process (once; the rig disposes of it)."""
        if self._store is None:
            self._store = Store.open(self.db_url, Schema.load(self.schema_path), create=create)
        return self._store

    @property
    def store(self) -> Store:
        return self.open_store()

    def state(self, key: str) -> Any:
        with self.store.engine.connect() as conn:
            return self.store.get_state(conn, key)

    def caught_up(self) -> bool:
        """The ingester has every event of the site and no fetch is queued."""
        with self.store.engine.connect() as conn:
            cursor = self.store.get_state(conn, K_CURSOR)
            queued = conn.execute(sa.select(sa.func.count()).select_from(self.store.fetch_queue)).scalar()
        return cursor == self.site.last_event_id() and queued == 0

    def wait(self, condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        """:func:`wait_until` that shows the ingesters' logs on a time-out."""
        return wait_until(condition, timeout, what, detail=lambda: self.ingest_log()[-3000:])
