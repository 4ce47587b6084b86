"""connect_worker: host Inngest functions over Inngest Connect, and drain safely on deploys.

The public API is small: ``Worker`` and ``Config`` to embed the daemon,
``current_request()`` and ``draining()`` for function authors, ``drift_policy()`` for
changing a function while runs are in flight (docs/drift.md), ``confirm_before_run()``
for short side-effecting steps (docs/reliability.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .context import DrainSignal, RequestIdentity, current_request, draining

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Config
    from .engine.confirm import confirm_before_run
    from .engine.drift import drift_policy
    from .engine.worker import Worker

__all__ = [
    "Config",
    "DrainSignal",
    "RequestIdentity",
    "Worker",
    "__version__",
    "confirm_before_run",
    "current_request",
    "draining",
    "drift_policy",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so `import connect_worker` in user code stays cheap and never
    # pulls the engine (websockets, anyio) into a process that only wants draining().
    if name == "Worker":
        from .engine.worker import Worker

        return Worker
    if name == "drift_policy":
        from .engine.drift import drift_policy

        return drift_policy
    if name == "confirm_before_run":
        from .engine.confirm import confirm_before_run

        return confirm_before_run
    if name == "Config":
        from .config import Config

        return Config
    raise AttributeError(name)
