"""Pure pieces: ULIDs, signing-key hashing, the lease store, the reply buffer."""

from __future__ import annotations

import asyncio
import time

import pytest

from connect_worker.devserver.auth import check_authorization, hash_signing_key
from connect_worker.devserver.config import DevServerConfig
from connect_worker.devserver.leases import LeaseError, LeaseStore, ReplyBuffer
from connect_worker.devserver.ulid import is_ulid, new_ulid, ulid_time
from connect_worker.protocol import pb


def test_ulid_format_monotonic_and_time() -> None:
    ids = [new_ulid() for _ in range(1000)]
    assert all(is_ulid(i) and len(i) == 26 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 1000
    at = time.time() + 120
    assert abs(ulid_time(new_ulid(at)) - at) < 0.002
    assert not is_ulid("8" + "0" * 25)  # overflows 128 bits
    assert not is_ulid("not-a-ulid") and not is_ulid("U" * 26)
    with pytest.raises(ValueError):
        ulid_time("nope")


def test_signing_key_hash_and_auth() -> None:
    key = "signkey-prod-" + "00ff" * 16
    hashed = hash_signing_key(key)
    assert hashed == hash_signing_key("00ff" * 16)
    assert check_authorization(None, None) == (True, "")
    assert check_authorization(f"Bearer {hashed}", key) == (True, hashed)
    assert check_authorization(f"Bearer {key}", key)[0]
    assert check_authorization(f"Bearer signkey-branch-{hashed}", key)[0]
    assert not check_authorization(None, key)[0]
    assert not check_authorization("Basic abc", key)[0]
    assert not check_authorization(f"Bearer {hashed[:-1]}0", key)[0]


def test_lease_store_rules() -> None:
    store = LeaseStore(duration=60)
    l0 = store.lease("r1").lease_id
    with pytest.raises(LeaseError):
        store.lease("r1")
    store.set_capacity("inst", 1)
    store.assign("r1", "inst")
    assert not store.has_capacity("inst") and store.active("inst") == 1
    # A capacity-limited extender must be the instance the request is mapped to.
    store.set_capacity("other", 3)
    assert store.extend("r1", l0, "other") is None
    l1 = store.extend("r1", l0, "inst")
    assert l1 is not None and l1 != l0
    assert store.extend("r1", l0, "inst") == l1  # previous lease: idempotent
    l2 = store.extend("r1", l1, "inst")
    assert l2 is not None
    assert store.extend("r1", l0, "inst") is None  # two back: NACK
    assert store.expire("r1") and not store.is_live("r1")
    assert store.extend("r1", l2, "inst") is not None  # expired but not re-leased
    store.release("r1")
    assert store.extend("r1", l2, "inst") is None and store.has_capacity("inst")


async def test_reply_buffer_set_if_absent_and_ttl() -> None:
    buf = ReplyBuffer(ttl=0.05)
    waiter = buf.waiter("r1")
    assert buf.save(pb.SDKResponse(request_id="r1", body=b"1"))
    assert not buf.save(pb.SDKResponse(request_id="r1", body=b"2"))
    assert (await waiter).body == b"1"
    await asyncio.sleep(0.06)  # the TTL is the subject under test
    assert buf.get("r1") is None
    assert buf.save(pb.SDKResponse(request_id="r1", body=b"3"))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        DevServerConfig(gateway_groups=())
    with pytest.raises(ValueError):
        DevServerConfig(forward_attempts=0)
    assert DevServerConfig(lease_duration=10, lease_grace=1).effective_ack_timeout == 11
    assert DevServerConfig.fast().replace(seed=3).seed == 3
