"""The protocol layer is I/O-free: importing it must not pull in the network or the SDK.

Runs in a fresh interpreter because this test process has long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("anyio", "websockets", "httpx", "inngest")

# Imports the package and every module in it, then reports what got loaded.
_PROBE = """
import json, pkgutil, sys, importlib
import connect_worker.protocol as protocol
for info in pkgutil.walk_packages(protocol.__path__, protocol.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps({"file": protocol.__file__, "modules": sorted(sys.modules)}))
"""


def test_protocol_imports_no_io_libraries_and_no_sdk() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    loaded = set(report["modules"])
    # The probe really imported the protocol modules (not an empty namespace package).
    assert {
        "connect_worker.protocol.codec",
        "connect_worker.protocol.connection",
        "connect_worker.protocol.state",
        "connect_worker.protocol.durations",
        "connect_worker.protocol.pb",
    } <= loaded
    leaked = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert leaked == [], f"connect_worker.protocol imported {leaked}"
