"""``python -m connect_worker.devserver``: run the local Connect gateway + executor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from .config import DevServerConfig
from .server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m connect_worker.devserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8288, help="API port")
    parser.add_argument("--gateway-port", type=int, default=8289,
                        help="first gateway port (one per gateway group)")
    parser.add_argument("--fast", action="store_true",
                        help="test timings (1 s heartbeats, 4 s leases)")
    parser.add_argument("--interval-format", choices=["go", "seconds"], default="go")
    parser.add_argument("--signing-key", default=None)
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name to answer besides loopback names and addresses")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    base = DevServerConfig.fast() if args.fast else DevServerConfig()
    config = base.replace(interval_format=args.interval_format, signing_key=args.signing_key,
                         allowed_hosts=tuple(args.allow_host))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, host=args.host, api_port=args.port,
                          gateway_port=args.gateway_port))


if __name__ == "__main__":
    main()
