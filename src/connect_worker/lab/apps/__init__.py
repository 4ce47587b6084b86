"""Inngest apps the lab runs on real workers, shipped inside the package so that
``connect-worker demo``, ``simulate-deploy`` and ``soak`` work from an installed wheel.

- :mod:`.pipeline`: small multi-step reports (``report/long`` etc.), the deploy simulator's load;
- :mod:`.reports`: the three LLM report functions the demo runs on the simulated model;
- :mod:`.soak`: reports whose step lengths the soak draws at random;
- :mod:`.execution_log`: one JSON line per step-body run, so every tool can count executions.

A checkout also exposes them as ``examples.pipeline`` and ``examples.reports``.
"""
