"""An https SG site through mitmproxy: CONNECT, mitmproxy's CA on the client, the site's own certificate upstream.

The fake SG serves TLS with a self-signed certificate for ``localhost`` and ``127.0.0.1``; mitmdump trusts
it upstream (``ssl_verify_upstream_trusted_ca``) and serves ``sgcache_site=https://localhost:<port>``, the only
host it decrypts. The same server reached as ``127.0.0.1`` is not the site: a loopback address on a port other
than 443, so the proxy refuses to tunnel there unless ``sgcache_allow_connect`` names it; the rig names it,
and that tunnel is not decrypted.

In reverse mode (``--mode reverse:https://localhost:<port>``) clients name the proxy as their site: over
https with the studio's own certificate, which mitmproxy serves (``--set certs=*=cert-and-key.pem``; the
rig reuses the site's), or over plain http on the studio network.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .proxyharness import connect_status
from .rig import KEY, SCRIPT, Rig


@pytest.fixture(scope="module")
def tls_rig(tmp_path_factory: pytest.TempPathFactory, mode_db_url: str,
            proxy_mode: str) -> Iterator[tuple[Rig, Path]]:
    with Rig(tmp_path_factory.mktemp(f"tls-{proxy_mode}"), mode_db_url, tls=True, proxy=False,
             mode=proxy_mode, s3_uploads=True) as rig:
        assert rig.tls_cert is not None
        rig.start_proxy(["sgcache_max_lag=0", f"sgcache_allow_connect=127.0.0.1:{rig.server.port}"])
        yield rig, rig.tls_cert


def client(rig: Rig, host: str, ca_certs: Path | str) -> shotgun_api3.Shotgun:
    sg = shotgun_api3.Shotgun(f"https://{host}:{rig.server.port}", script_name=SCRIPT, api_key=KEY,
                              http_proxy=rig.proxy.address, ca_certs=str(ca_certs))
    sg.config.rpc_attempt_interval = 0  # shotgun_api3 retries TLS failures; do not sleep 3 s each time
    return sg


def oracle(rig: Rig, cert: Path) -> shotgun_api3.Shotgun:
    return shotgun_api3.Shotgun(f"https://localhost:{rig.server.port}", script_name=SCRIPT, api_key=KEY,
                                ca_certs=str(cert))


QUERY: tuple[str, list[Any], list[str]] = (
    "Shot", [["sg_status_list", "is", "ip"]], ["code", "sg_cut_in", "sg_sequence", "assets"])


def test_https_site_is_served_from_the_cache(tls_rig: tuple[Rig, Path]) -> None:
    """Through mitmproxy's CA (regular mode), or the studio certificate the reverse proxy serves."""
    rig, cert = tls_rig
    sg = rig.client()
    sg.find_one("Project", [])  # first call with these credentials goes to SG
    expected = oracle(rig, cert).find(*QUERY)
    before = rig.reads()
    for _ in range(3):
        assert sg.find(*QUERY) == expected
    assert rig.reads() == before, "not answered from the cache"
    assert sg.info()["sgcache"]["hits"] >= 3


def test_writes_through_tls_are_learned(tls_rig: tuple[Rig, Path]) -> None:
    rig, cert = tls_rig
    sg = rig.client()
    sg.find_one("Project", [])
    made = sg.create("Shot", {"code": f"tls01-{rig.mode}", "project": {"type": "Project", "id": 1}})
    before = rig.reads()
    code = f"tls01-{rig.mode}"
    assert sg.find("Shot", [["code", "is", code]], ["code"]) == [{"type": "Shot", "id": made["id"], "code": code}]
    assert rig.reads() == before


@pytest.mark.proxy_modes("reverse")
def test_plain_http_clients_of_a_reverse_proxy_to_an_https_site(tls_rig: tuple[Rig, Path]) -> None:
    """The proxy speaks https to SG, plain http to the studio network: no certificate on the client."""
    rig, cert = tls_rig
    assert rig.proxy is not None
    sg = shotgun_api3.Shotgun(f"http://127.0.0.1:{rig.proxy.port}", script_name=SCRIPT, api_key=KEY)
    sg.find_one("Project", [])
    expected = oracle(rig, cert).find(*QUERY)
    before = rig.reads()
    assert sg.find(*QUERY) == expected
    assert rig.reads() == before, "not answered from the cache"


def test_upload_and_download_through_the_proxy(tls_rig: tuple[Rig, Path], tmp_path: Path) -> None:
    """An upload to the site's storage and its download. The site's requests (the upload forms, the
    attachment's redirect) cross the proxy decrypted; the storage host (``127.0.0.1``, as S3 would be)
    is tunnelled undecrypted in regular mode and reached directly in reverse mode. The tool then reads
    its upload back: SG's answer, not the replica's copy from before the upload."""
    rig, cert = tls_rig
    assert rig.proxy is not None
    if rig.proxy.reverse:
        sg = rig.client()
    else:  # the storage's own certificate comes through the tunnel: trust it beside mitmproxy's CA
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(rig.proxy.ca_cert.read_bytes() + cert.read_bytes())
        sg = rig.client(ca_certs=str(bundle))
    sg.find_one("Project", [])
    assert {k: v for k, v in sg.info().items() if k.startswith("s3_")} == rig.site.files.info_keys()
    version = sg.create("Version", {"code": f"upload-{rig.mode}", "project": {"type": "Project", "id": 1}})
    fields = ["code", "sg_uploaded_movie"]
    assert sg.find("Version", [["id", "is", version["id"]]], fields)[0]["sg_uploaded_movie"] is None
    movie = tmp_path / "take1.mov"
    movie.write_bytes(b"\x00movie\xff" * 1000)
    attachment_id = sg.upload("Version", version["id"], str(movie), field_name="sg_uploaded_movie")
    assert movie.read_bytes() in rig.site.files.bucket.values()
    got = sg.find("Version", [["id", "is", version["id"]]], fields)
    assert got == oracle(rig, cert).find("Version", [["id", "is", version["id"]]], fields)
    assert got[0]["sg_uploaded_movie"]["id"] == attachment_id
    # reverse mode: the attachment's URL names the site itself; by id the download crosses the proxy
    link = {"type": "Attachment", "id": attachment_id} if rig.proxy.reverse else got[0]["sg_uploaded_movie"]
    assert sg.download_attachment(link) == movie.read_bytes()
    # the requests the proxy decrypted ("--- METHOD URL -> status" in the capture addon's file)
    seen = [line for line in rig.proxy.answers_path.read_text().splitlines() if line.startswith("--- ")]
    assert any("POST" in line and "/upload/api_link_file" in line for line in seen)
    assert any(f"GET https://localhost:{rig.server.port}/file_serve/attachment/{attachment_id}" in line
               for line in seen)
    assert not [line for line in seen if "/storage/" in line], "the storage host was decrypted"


@pytest.mark.proxy_modes("regular")
def test_other_hosts_are_not_decrypted(tls_rig: tuple[Rig, Path]) -> None:
    rig, cert = tls_rig
    # 127.0.0.1 is not the site, but sgcache_allow_connect lets its tunnel through, undecrypted: the client
    # sees the site's own certificate, so trusting only mitmproxy's CA fails ...
    with pytest.raises((ssl.SSLError, ssl.CertificateError)):
        client(rig, "127.0.0.1", rig.proxy.ca_cert).find_one("Project", [])
    # ... and trusting the site's certificate works through the proxy, without the addon seeing anything.
    intercepted = client(rig, "localhost", rig.proxy.ca_cert)
    intercepted.find_one("Project", [])  # these credentials are accepted: the addon would answer hits
    seen = counters(intercepted)
    sg = client(rig, "127.0.0.1", cert)
    before = rig.reads()
    for _ in range(3):
        assert sg.find(*QUERY) == oracle(rig, cert).find(*QUERY)
    assert rig.reads() == before + 6, "reads of a host that is not intercepted must all reach the site"
    assert counters(intercepted) == (seen[0], seen[1] + 1), "the addon saw the tunnelled requests"


def counters(sg: shotgun_api3.Shotgun) -> tuple[int, int]:
    """(hits, passes) the addon has counted, through an intercepted ``info`` (which counts itself)."""
    extra = sg.info()["sgcache"]
    return extra["hits"], sum(extra["passes"].values())


@pytest.mark.proxy_modes("regular")
def test_tunnels_elsewhere_on_loopback_are_refused(tls_rig: tuple[Rig, Path]) -> None:
    """Without the allow glob the same server on another name:port combination is refused (403)."""
    rig, _cert = tls_rig
    assert connect_status(rig.proxy, f"localhost:{rig.server.port}")[0] == 200  # the site
    assert connect_status(rig.proxy, f"127.0.0.1:{rig.server.port}")[0] == 200  # allowed by the glob
    status, body = connect_status(rig.proxy, f"127.0.0.1:{rig.server.port + 1}")
    assert status == 403 and b"not allowed" in body
