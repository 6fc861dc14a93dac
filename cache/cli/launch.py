"""Run a command from a checkout (``scripts/scan``, ...) with an interpreter that has sgcache's
dependencies.

``scripts/*`` start with ``/usr/bin/env python3``, which in a fresh shell is the system's
interpreter, not the virtual environment the README's install made. When the dependencies are
missing there (or the interpreter is older than 3.11), the command is run again with the
checkout's ``.venv`` (or the active ``$VIRTUAL_ENV``); with neither, one line says what to do.

Keep this module importable by any Python 3.6+: no imports from the rest of sgcache, no newer syntax.
"""

import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIN_PYTHON = (3, 11)
#: Set in the environment of a re-run, so that a broken venv cannot loop.
RELAUNCHED = "SGCACHE_RELAUNCHED"


def launch(module, prog, function="main"):
    """Import ``module`` and exit with its ``function()``, or re-run the script with a venv's Python."""
    problem = None
    if sys.version_info < MIN_PYTHON:
        problem = f"sgcache needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later, this is {sys.version.split()[0]}"
    else:
        try:
            main = getattr(importlib.import_module(module), function)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] == "cache":
                raise
            problem = f"{sys.executable} cannot import {exc.name} (sgcache's dependencies are not installed for it)"
    if problem is None:
        sys.exit(main())
    _relaunch_or_exit(prog, problem)


def venv_pythons():
    """Interpreters to try: the checkout's ``.venv``, then the active virtual environment's."""
    found = []
    for root in (os.path.join(REPO, ".venv"), os.environ.get("VIRTUAL_ENV")):
        if root:
            python = os.path.join(root, "bin", "python")
            if os.path.isfile(python) and os.access(python, os.X_OK):
                found.append(python)
    return found


def _relaunch_or_exit(prog, problem):
    if not os.environ.get(RELAUNCHED):
        for python in venv_pythons():
            if os.path.abspath(python) != os.path.abspath(sys.executable):
                env = dict(os.environ)
                env[RELAUNCHED] = "1"
                os.execve(python, [python, os.path.abspath(sys.argv[0])] + sys.argv[1:], env)
    sys.stderr.write(
        f"{prog}: error: {problem}; install sgcache into a virtual environment (cd {REPO} && python3 -m venv "
        f".venv && .venv/bin/pip install -e .) and run {prog} from it (.venv/bin/{prog})\n")
    sys.exit(2)
