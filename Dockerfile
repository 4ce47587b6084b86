# connect_worker in a container: `docker build -t connect-worker .` at the repository root.
#
# The image runs the example pipeline (examples/) so it works out of the box against a
# local gateway. For your own functions, build FROM this image, COPY your package into
# /app and set CMD to ["run", "yourapp.workers"] (the module with `client` and
# `functions`), or edit the COPY and CMD lines below.
#
# Why it is shaped like this (tests/ops/test_container.py checks each point):
# * ENTRYPOINT and CMD are exec form (JSON arrays): connect-worker is PID 1 and gets
#   SIGTERM itself. A shell form (`CMD connect-worker run ...`) puts /bin/sh in between,
#   which does not forward SIGTERM: the worker would never drain and be SIGKILLed.
#   Python as PID 1 is fine here: the worker installs its own SIGTERM/SIGINT handlers.
# * It runs as an unprivileged user (uid 10001, matched by deploy/kubernetes).
# * The health listener (/metrics, /healthz, /readyz) listens on $PORT when the platform
#   sets it, else 9090; the image sets neither PORT nor CONNECT_WORKER_HTTP_PORT, and
#   listens on every interface (CONNECT_WORKER_HTTP_HOST=::).
# * Docker's own stop timeout is 10 s: give it the drain budget plus 5 s, e.g.
#   `docker stop -t 35` or `stop_grace_period: 35s` in compose (the worker's default
#   drain budget is 25 s; set CONNECT_WORKER_DRAIN_TIMEOUT for longer steps).

# Python 3.11: the version scripts/test runs the suite on and requirements.lock is
# resolved for (tests/ops/test_lock.py keeps the three equal).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock pyproject.toml README.md ./
COPY src/ src/
# Wheels of exactly the locked dependency versions, each checked against its hash
# (renew the lock with scripts/lock), then the project's own; the runtime stage installs
# them offline, so no compiler or build backend ends up in the final image, and no
# version the tests have not run with.
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements.lock \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# CONNECT_WORKER_HTTP_HOST: every interface even in dev mode (the worker's own default
# there is loopback): a probe or scrape reaches a container only by its address.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONNECT_WORKER_HTTP_HOST=::
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /app --no-create-home worker
COPY --from=build /wheels /wheels
# Offline: the project's dependencies can only resolve to the locked wheels in /wheels.
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/connect_worker-*.whl \
    && rm -rf /wheels
WORKDIR /app
# Local state (the LLM toolkit's default SQLite result cache) goes to /app/.connect-worker:
# the one directory the worker's user may write (Kubernetes mounts a volume there).
RUN install -d -o 10001 -g 10001 /app/.connect-worker
COPY examples/ /app/examples/
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["connect-worker"]
CMD ["run", "examples.pipeline"]
