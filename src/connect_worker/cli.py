"""``connect-worker``: run | check | compat | dev | send | runs | workers | fault | demo |
simulate-deploy. Logging is configured here and nowhere else.

Every setting of ``config.SETTINGS`` is both an environment variable and a flag of
``run`` and ``check``; ``--help`` lists them all with their variables. An invalid
value stops the process before it connects, with one line naming the variable and
what it accepts, and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio

from . import __version__
from .config import SETTINGS, Config
from .errors import ConfigError, TargetError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .engine.runner import Listener
    from .ops.metrics import WorkerMetrics

log = logging.getLogger("connect_worker")

EXIT_USAGE = 2


def _add_settings(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "settings", "each flag overrides the environment variable shown"
    )
    for setting in SETTINGS:
        group.add_argument(
            setting.flag,
            dest=f"setting_{setting.field}",
            metavar="VALUE",
            help=f"[{setting.env}] {setting.help}",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connect-worker",
        description="Host Inngest functions over Inngest Connect, and drain safely on deploys.",
    )
    parser.add_argument("--version", action="version", version=f"connect-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="serve the functions of TARGET until SIGTERM/SIGINT",
        description="Serve TARGET's functions. SIGTERM/SIGINT drains: stop taking steps, "
        "finish in-flight ones, wait for the gateway's ACK, exit. A second signal stops "
        "at once. Exit codes: 0 drained cleanly, 2 bad configuration or fatal error, "
        "3 steps abandoned at the drain deadline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", metavar="TARGET",
                     help="module, module:attr or path/to/file.py[:attr] exposing `client` and "
                     "`functions` (or a list of (client, functions) pairs)")
    _add_settings(run)

    check = commands.add_parser(
        "check", help="validate configuration and TARGET; warn about costly Railway settings"
    )
    check.add_argument("target", metavar="TARGET", nargs="?", help="as for `run` (optional)")
    _add_settings(check)

    commands.add_parser(
        "simulate-deploy", add_help=False,
        help="rolling deploys of real workers on the local gateway, under load "
        "(see simulate-deploy --help)",
    )
    commands.add_parser("soak", add_help=False,
                        help="random overlapping faults on real workers under load, then "
                        "an audit of duplicates and lost replies (see soak --help)")
    commands.add_parser("demo", add_help=False,
                        help="a rolling deploy in the middle of three reports, narrated, with "
                        "a timeline picture (see demo --help)")
    compat = commands.add_parser(
        "compat", help="replay recorded run histories against TARGET without running any "
        "step: would this deploy drift the runs in flight? (exit 1 if so)",
        description="Replays every prefix of each recorded run against TARGET's code; a "
        "memoized step returns its stored output, the first step with no memo stops the "
        "replay. Exit codes: 0 compatible, 1 drift, 2 usage. See docs/drift.md.")
    compat.add_argument("target", metavar="TARGET", help="the new code, as for `run`")
    compat.add_argument("histories", metavar="PATH", nargs="*",
                        help="history files or directories (CONNECT_WORKER_RECORD_HISTORY, "
                        "`runs --export`)")
    compat.add_argument("--from-gateway", metavar="URL", default=None,
                        help="also replay the runs of this dev gateway, live")
    compat.add_argument("--json", action="store_true", help="JSON instead of a table")
    dev = commands.add_parser(
        "dev", help="run the local Connect gateway (for development); its page is at "
        "http://127.0.0.1:8288/")
    dev.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only)")
    dev.add_argument("--port", type=int, default=8288,
                     help="API port (start, flush, events, the page at /)")
    dev.add_argument("--gateway-port", type=int, default=8289, help="WebSocket gateway port")
    dev.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="also answer requests addressed to NAME (e.g. a Compose or "
                     "Kubernetes service name); loopback names and IP addresses always are, "
                     "other names get 403 (a web page cannot rebind its DNS name to us)")
    dev.add_argument("--fast", action="store_true",
                     help="short timings for rehearsals and tests: 1 s heartbeats and lease "
                     "extensions, 4 s leases, 3 s drain window (default: production timings)")
    from .devclient import add_commands

    add_commands(commands)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    values: dict[str, str] = {}
    for setting in SETTINGS:
        value = getattr(args, f"setting_{setting.field}", None)
        if value is not None:
            values[setting.field] = value
    return values


def _configure_logging(config: Config) -> None:
    from .ops.logs import configure_logging, register_secret

    for secret in (config.signing_key, config.signing_key_fallback):
        register_secret(secret)
    configure_logging(
        config.log_format,
        config.log_level,
        {
            "deployment_id": config.deployment_id,
            "replica_id": config.replica_id,
            "instance_id": config.instance_id,
        },
    )


def _exit_before_start(signum: int, frame: object) -> None:
    # Nothing can be in flight before the worker runs: stop at once, cleanly.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate-deploy"]:
        from .lab.simulate import main as simulate

        return simulate(argv[1:])
    if argv[:1] == ["demo"]:
        from .lab.demo import main as demo

        return demo(argv[1:])
    if argv[:1] == ["soak"]:
        from .lab.soak import main as soak

        return soak(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # Until the worker's own handlers are installed (after imports and config), a
        # SIGTERM must still end the process cleanly rather than by the default action.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit_before_start)
    if args.command == "dev":
        from .ops.logs import configure_logging

        # Text lines by default: the dev gateway's log is read in a terminal.
        try:
            configure_logging(os.environ.get("CONNECT_WORKER_LOG_FORMAT", "text"), "info", {})
        except ValueError as exc:
            print(f"connect-worker: CONNECT_WORKER_LOG_FORMAT: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _dev(args)
    if args.command == "runs" and args.export:
        return _export_runs(args)
    if args.command in ("send", "runs", "workers", "fault"):
        from .devclient import run_command

        return run_command(args)
    if args.command == "compat":
        return _compat(args)
    if args.command == "check":
        from .engine.target import load_target
        from .ops.check import run_check

        env = dict(os.environ)
        for setting in SETTINGS:
            value = getattr(args, f"setting_{setting.field}", None)
            if value is not None:
                env[setting.env] = value
        return run_check(env, args.target, out=sys.stdout, load_target=load_target)
    try:
        config = Config.from_env(os.environ, _overrides(args))
    except ConfigError as exc:
        print(f"connect-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(config)
    from .ops import tracing

    try:
        # Before the target is imported: instrumentations it sets up find our provider.
        tracing.setup(config)
    except ConfigError as exc:
        print(f"connect-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .engine.target import load_target

    try:
        apps = load_target(args.target)
    except TargetError as exc:
        print(f"connect-worker: {exc}", file=sys.stderr)
        tracing.shutdown()
        return EXIT_USAGE
    from .engine.exiting import exit_after_drain
    from .engine.runner import serve
    from .engine.userloop import loop_factory

    try:
        code: int = anyio.run(lambda: serve(config, apps, listener=_health_listener(config)),
                              backend_options={"loop_factory": loop_factory(config.event_loop)})
        return exit_after_drain(code)
    except OSError as exc:
        # Binding the health listener is the one OSError that reaches here.
        print(f"connect-worker: cannot listen on CONNECT_WORKER_HTTP_PORT/PORT="
              f"{config.http_port} (CONNECT_WORKER_HTTP_HOST={config.http_host}): "
              f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        tracing.shutdown()  # the drain's and the last steps' spans go out before exit


def _health_listener(config: Config) -> Listener:
    """The health listener on CONNECT_WORKER_HTTP_PORT (none when it is unset)."""

    def listen(registry: CollectorRegistry, ready: Callable[[], bool],
               metrics: WorkerMetrics) -> AbstractAsyncContextManager[object] | None:
        if config.http_port is None:
            return None
        return _health(config.http_host, config.http_port, registry, ready, metrics)

    return listen


@contextlib.asynccontextmanager
async def _health(host: str, port: int, registry: CollectorRegistry,
                  ready: Callable[[], bool], metrics: WorkerMetrics) -> AsyncIterator[object]:
    from .ops.health import HealthServer

    async with HealthServer(port, registry, ready, metrics=metrics, host=host) as health:
        log.info("health listener on %s port %d", host, health.port,
                 extra={"event": "health.listening",
                        "fields": {"host": host, "port": health.port}})
        yield health


def _export_runs(args: argparse.Namespace) -> int:
    """``runs --export DIR``: the dev gateway's runs as history files for ``compat`` (here,
    not in devclient: compat reads the gateway through devclient, not the other way)."""
    from .compat import export_gateway
    from .devclient import DevClientError, default_url

    url = (args.url or default_url()).rstrip("/")
    try:
        count = export_gateway(url, args.export, max(1, args.limit))
    except DevClientError as exc:
        print(f"connect-worker: {exc}", file=sys.stderr)
        return 1
    print(f"exported {count} runs to {args.export}")
    return 0


def _compat(args: argparse.Namespace) -> int:
    from . import compat
    from .devclient import DevClientError

    if not args.histories and not args.from_gateway:
        print("connect-worker: compat needs history PATHs or --from-gateway URL",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        return compat.run(args.target, histories=args.histories, gateway=args.from_gateway,
                          as_json_out=args.json)
    # (--from-gateway: devclient's error, the dev gateway unreachable or refusing)
    except (TargetError, DevClientError, OSError, ValueError, KeyError) as exc:
        print(f"connect-worker: compat: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _dev(args: argparse.Namespace) -> int:
    from .devclient import stop_on_signals
    from .devserver import DevServer, DevServerConfig
    from .devserver import serve as serve_devserver

    config = (DevServerConfig.fast() if args.fast else DevServerConfig()).replace(
        allowed_hosts=tuple(args.allow_host))
    stop_on_signals()

    def ready(dev: DevServer) -> None:
        log.info("dev gateway ready: page %s/ ; start a worker with INNGEST_DEV=%s "
                 "connect-worker run TARGET%s", dev.api_url, dev.api_url,
                 " (fast timings)" if args.fast else "")

    try:
        anyio.run(
            lambda: serve_devserver(
                config, host=args.host, api_port=args.port,
                gateway_port=args.gateway_port, ready=ready,
            )
        )
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        # Binding is the one OSError that gets here: name the port and its flag, in one line.
        print(f"connect-worker: dev gateway {_bind_error(exc, args)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _bind_error(exc: OSError, args: argparse.Namespace) -> str:
    text = str(exc.strerror or exc)
    # asyncio: "error while attempting to bind on address ('127.0.0.1', 8288): address
    # already in use".
    found = re.search(r"address \('?([^',]*)'?, (\d+)[^)]*\): (.*)", text)
    if found is None:
        return (f"cannot listen on {args.host} (--port {args.port}, --gateway-port "
                f"{args.gateway_port}): {text}")
    host, port, reason = found.groups()
    flag = "--port" if int(port) == args.port else "--gateway-port"
    return (f"cannot listen on {host}:{port} ({flag}): {reason}; stop what uses it or "
            f"pass another {flag}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
