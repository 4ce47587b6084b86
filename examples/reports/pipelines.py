"""``connect_worker.lab.apps.reports.pipelines`` under its checkout name."""

from connect_worker.lab.apps.reports.pipelines import *  # noqa: F403
