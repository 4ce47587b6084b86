"""The Connect protocol's fixed names and limits, in one place for the worker, the dev
gateway and the tools that speak it."""

from __future__ import annotations

# The WebSocket subprotocol both ends must agree on.
SUBPROTOCOL = "v0.connect.inngest.com"
# The gateway reads at most 8 MiB from a worker; its own requests carry <= 4 MiB of
# payload, so 8 MiB bounds what either side accepts in one frame.
MAX_FRAME_BYTES = 8 * 1024 * 1024
# The Connect REST API: ask for a gateway and a session; persist a reply over HTTP.
START_PATH = "/v0/connect/start"
FLUSH_PATH = "/v0/connect/flush"
