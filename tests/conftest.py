"""Shared pytest set-up: tests import the reference oracles as ``import oracles``."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# auto precision measures bf16 once per machine and caches it under the user's cache dir; tests (and
# the CLI subprocesses they start) use a private one instead.
if not os.environ.get("SAMADAPT_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="samadapt-test-cache-")
    os.environ["SAMADAPT_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
