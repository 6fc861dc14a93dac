"""The secret scan: no script key, password or database password in any log or answer of a test run.

``find_secrets`` is the scanner; ``tests/conftest.py`` runs it once at the end of the session over
every ``*.log`` file under pytest's temporary directory (``mitmdump.log`` and ``answers.log`` of every
proxy, the ingesters' logs) and over the output of every script run by ``tests/processes.run_script``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from cache.private import secret_forms

#: Output of the scripts the tests ran (filled by tests/processes.run_script).
SCRIPT_OUTPUTS: list[tuple[str, str]] = []


def find_secrets(secrets: Mapping[str, str | None], files: Iterable[Path] = (),
                 texts: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Where each secret (as written or URL-quoted) occurs: ``"<where>:<line>: <secret name>"``."""
    forms = {name: secret_forms([value]) for name, value in secrets.items() if value}
    found: list[str] = []

    def scan(where: str, text: str) -> None:
        for lineno, line in enumerate(text.splitlines(), 1):
            for name, variants in forms.items():
                if any(v in line for v in variants):
                    found.append(f"{where}:{lineno}: {name}")

    for path in files:
        try:
            scan(str(path), path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:  # a file that vanished is not a leak; one we cannot read is a failure
            if path.exists():
                found.append(f"{path}: unreadable ({exc})")
    for where, text in texts:
        scan(where, text)
    return found


def run_files(basetemp: Path) -> list[Path]:
    """The log and answer files a test run left under its temporary directory."""
    return sorted(p for p in basetemp.rglob("*.log") if p.is_file())
