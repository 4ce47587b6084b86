"""``python -m examples.reports``: see ``connect_worker.lab.apps.reports.__main__``."""

import runpy

runpy.run_module("connect_worker.lab.apps.reports", run_name="__main__", alter_sys=True)
