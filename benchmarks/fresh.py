"""Measurements in a fresh Python process, so that the peak memory and the imports they report are their own.

A benchmark calls :func:`measure` with a JSON-able spec; its own script, started again with ``--child SPEC``,
hands the spec to its measuring function through :func:`serve` and prints the JSON result as its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


#: Where benchmarks write their files: memory when it can hold them, so that the disk does not dominate.
DEFAULT_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None


def measure(script: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh interpreter and return the result it printed."""
    out = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def serve(child: str | None, function: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """In the fresh process (``child`` is the ``--child`` argument): print ``function(spec)`` and return True."""
    if child is None:
        return False
    print(json.dumps(function(json.loads(child))))
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dir`` (where a benchmark writes its files, :data:`DEFAULT_DIR` by default) and the hidden ``--child``."""
    parser.add_argument("--dir", default=DEFAULT_DIR)
    parser.add_argument("--child", help=argparse.SUPPRESS)


def workdir(parent: str | None) -> Path:
    """A new directory for a benchmark's files, below ``parent`` (see :func:`add_arguments`)."""
    return Path(tempfile.mkdtemp(prefix="flatnorm-bench-", dir=parent))
