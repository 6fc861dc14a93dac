"""An https SG site through mitmproxy: CONNECT, mitmproxy's CA on the client, the site's own certificate upstream.

The fake SG serves TLS with a self-signed certificate for ``localhost`` and ``127.0.0.1``; mitmdump trusts
it upstream (``ssl_verify_upstream_trusted_ca``) and serves ``sgcache_site=https://localhost:<port>``, the only
host it decrypts. The same server reached as ``127.0.0.1`` is not the site: a loopback address on a port other
than 443, so the proxy refuses to tunnel there unless ``sgcache_allow_connect`` names it; the rig names it,
and that tunnel is not decrypted.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .e2e import KEY, SCRIPT, Rig, populate, script_env, site_schema_file
from .fakesg import FakeSGServer, FakeSite
from .proxyharness import Proxy, connect_status


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate (and key) for localhost and 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake SG")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fakesg-cert.pem", directory / "fakesg-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[tuple[Rig, Path]]:
    tmp_path = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp_path)
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    with FakeSGServer(site, host="127.0.0.1", tls_cert=str(cert), tls_key=str(key)) as server:
        schema_path = site_schema_file(site, tmp_path / "schema.yml")
        rig = Rig(site, server, None, schema_path, module_db_url)  # type: ignore[arg-type]
        from .e2e import run_script

        site_url = f"https://localhost:{server.port}"
        env = dict(script_env(server, module_db_url, schema_path), SHOTGUN_API_CACERTS=str(cert), SGCACHE_SITE=site_url)
        run_script("scan", "--full", "--quiet", env=env)
        options = ["sgcache_max_lag=0", f"sgcache_site={site_url}", f"ssl_verify_upstream_trusted_ca={cert}",
                   f"sgcache_allow_connect=127.0.0.1:{server.port}"]
        with Proxy(tmp_path, module_db_url, schema_path, options) as proxy:
            rig.proxy = proxy
            yield rig, cert


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


def test_https_site_is_served_from_the_cache_with_mitmproxys_ca(tls_rig: tuple[Rig, Path]) -> None:
    rig, cert = tls_rig
    sg = client(rig, "localhost", rig.proxy.ca_cert)
    sg.find_one("Project", [])  # first call with these credentials goes to SG
    expected = oracle(rig, cert).find(*QUERY)
    before = rig.reads()
    for _ in range(3):
        assert sg.find(*QUERY) == expected
    assert rig.reads() == before, "not answered from the cache"
    assert sg.info()["sgcache"]["hits"] >= 3


def test_writes_through_tls_are_learned(tls_rig: tuple[Rig, Path]) -> None:
    rig, cert = tls_rig
    sg = client(rig, "localhost", rig.proxy.ca_cert)
    sg.find_one("Project", [])
    made = sg.create("Shot", {"code": "tls01", "project": {"type": "Project", "id": 1}})
    before = rig.reads()
    assert sg.find("Shot", [["code", "is", "tls01"]], ["code"]) == [{"type": "Shot", "id": made["id"], "code": "tls01"}]
    assert rig.reads() == before


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


def test_tunnels_elsewhere_on_loopback_are_refused(tls_rig: tuple[Rig, Path]) -> None:
    """Without the allow glob the same server on another name:port combination is refused (403)."""
    rig, _cert = tls_rig
    assert connect_status(rig.proxy, f"localhost:{rig.server.port}")[0] == 200  # the site
    assert connect_status(rig.proxy, f"127.0.0.1:{rig.server.port}")[0] == 200  # allowed by the glob
    status, body = connect_status(rig.proxy, f"127.0.0.1:{rig.server.port + 1}")
    assert status == 403 and b"not allowed" in body
