"""``connect_worker.lab.apps.pipeline`` under the name a checkout has always used
(``connect-worker run examples.pipeline``); the code ships inside the package."""

from connect_worker.lab.apps.pipeline import *  # noqa: F403
from connect_worker.lab.apps.pipeline import client, functions

__all__ = ["client", "functions"]
