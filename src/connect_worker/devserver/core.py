"""State shared by the gateway, the HTTP API and the executor: sessions, leases,
the reply buffer and the router."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..protocol import pb
from .config import DevServerConfig
from .leases import LeaseStore, ReplyBuffer
from .router import Router
from .state import DevState, ReplyRecord, StartCall
from .ulid import new_ulid

# Fixed dev-server tenant IDs (the real dev server uses constant UUIDs too).
ACCOUNT_ID = "00000000-0000-4000-a000-000000000000"
ENV_ID = "00000000-0000-4000-b000-000000000000"
_NAMESPACE = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")


def app_uuid(app_name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"app:{app_name}"))


def function_uuid(slug: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"fn:{slug}"))


@dataclass
class Session:
    token: str
    env: str
    sync_token: str
    gateway_group: str
    expires_at: float
    start_call: StartCall


class Core:
    def __init__(self, config: DevServerConfig) -> None:
        self.config = config
        self.state = DevState(config)
        self.leases = LeaseStore(config.lease_duration)
        self.buffer = ReplyBuffer(config.reply_ttl)
        self.router = Router(self.state, self.leases, config.seed)
        self.sessions: dict[str, Session] = {}

    # -- sessions (stand-in for the 5-minute JWT) ------------------------------

    def issue_session(self, env: str, sync_token: str, group: str, call: StartCall) -> Session:
        token = f"devsession-{new_ulid()}"
        session = Session(
            token, env, sync_token, group, time.monotonic() + self.config.session_token_ttl, call
        )
        self.sessions[token] = session
        return session

    def verify_session(self, token: str) -> Session | None:
        session = self.sessions.get(token)
        if session is None or session.expires_at <= time.monotonic():
            return None
        return session

    # -- replies (gateway WORKER_REPLY and HTTP flush share this path) ---------

    def persist_reply(self, response: pb.SDKResponse, via: str, conn_id: str | None) -> ReplyRecord:
        stored = self.buffer.save(response)
        record = ReplyRecord(time.time(), via, conn_id, response.request_id, response, stored)
        (self.replies_list(via)).append(record)
        if stored:
            for d in reversed(self.state.dispatches):
                if d.request_id == response.request_id and d.reply_via is None:
                    d.replied_at = record.ts
                    d.reply_via = via
                    break
        self.state.notify()
        return record

    def replies_list(self, via: str) -> list[ReplyRecord]:
        return self.state.flushes if via == "flush" else self.state.replies
