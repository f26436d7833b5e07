"""A rogue peer against a receiver that knows what it expects: hostile headers and payloads.

Two gloo ranks in one spawn. Rank 1 is the rogue: it writes raw int64 headers (and payloads)
with plain ``dist.send``, bypassing the codec. Rank 0 receives through ``Channel.recv`` with an
expectation (float32 ``[1..4, 1..16, 8]``), as a server does. Every hostile message must be
rejected with a one-line ``WireError`` (or, for a silent peer, ``PeerLostError``) naming rank 1,
before any payload buffer larger than the expectation's bound is allocated, without hanging.
Each case runs on a fresh process group, so a rejected message cannot desynchronise the next.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import with_free_port
from fedsea_hpc.transport import p2p
from fedsea_hpc.transport.p2p import ByteCounter, Channel, PeerLostError
from fedsea_hpc.transport.wire import MAGIC, VERSION, Expect, Kind, WireError, check_lengths, decode_header

pytestmark = pytest.mark.multirank
EXPECT = Expect(torch.float32, ((1, 4), (1, 16), 8))
BOUND = 4 * 16 * 8 * 4  # the largest payload the expectation admits, in bytes
STEP = 3
F32, F64, I64 = 1, 4, 5  # wire dtype codes


def header(kind=Kind.ACTIVATION, step=STEP, dtype=F32, shape=(2, 4, 8), nbytes=None, magic=MAGIC,
           version=VERSION, ndim=None) -> list[int]:
    dims = list(shape) + [0] * (4 - len(shape))
    size = 4 if dtype == F32 else 8
    n = nbytes if nbytes is not None else min(max(0, size * math.prod(shape)), 1 << 62)
    return [magic, version, int(kind), step, dtype, len(shape) if ndim is None else ndim, *dims, n, 0]


# name: (header fields, payload bytes to send after it or None, what the error must say)
CASES = {
    "random_bytes": ([random.Random(0).getrandbits(63) for _ in range(12)], None, "magic"),
    "old_version": (header(version=VERSION + 1), None, "protocol version"),
    "wrong_kind": (header(kind=Kind.GRADIENT), None, "expected kind activation"),
    "wrong_step": (header(step=STEP + 1), None, "expected step 3"),
    "unknown_dtype": (header(dtype=99), None, "dtype code 99"),
    "wrong_dtype": (header(dtype=F64), None, "dtype torch.float64 is not the expected torch.float32"),
    "negative_dim": (header(shape=(2, -4, 8), nbytes=0), None, "negative dim"),
    "huge_shape": (header(shape=(1 << 20, 1 << 20, 1 << 20)), None, "exceeds max_bytes"),
    "too_many_rows": (header(shape=(5, 4, 8)), None, "dim 0 of shape [5, 4, 8] is 5, expected 1..4"),
    "too_many_tokens": (header(shape=(2, 17, 8)), None, "dim 1"),
    "wrong_hidden": (header(shape=(2, 4, 9)), None, "dim 2 of shape [2, 4, 9] is 9, expected 8"),
    "wrong_ndim": (header(shape=(2, 32)), None, "is not 3-d"),
    "nbytes_lie": (header(nbytes=16), None, "nbytes 16 !="),
    "ndim_lie": (header(ndim=7), None, "ndim 7"),
}


def _random_header(rng: random.Random) -> list[int]:
    """A header with the right magic and version and every other field drawn at random."""
    shape = [rng.choice([0, 1, 2, 4, 8, 9, 16, 17, -1, 1 << 31]) for _ in range(rng.randint(0, 4))]
    fields = header(kind=rng.choice([0, 1, 2, 3, 4, 5, -1]), step=rng.choice([STEP, STEP, 0, -1]),
                    dtype=rng.choice([F32, F32, F64, I64, 0, 9]), shape=tuple(shape), nbytes=0)
    fields[10] = rng.choice([fields[10], rng.randint(0, 1 << 40), min(4 * abs(math.prod(shape)), 1 << 62)])
    return fields


def _rogue(case_fields, payload_len) -> None:
    dist.send(torch.tensor(case_fields, dtype=torch.int64), dst=0, group=_GROUP[0])
    if payload_len:
        dist.send(torch.zeros(payload_len, dtype=torch.uint8), dst=0, group=_GROUP[0])


_GROUP = [None]
ALLOCATED: list[int] = []


def _recording_empty(real):
    def empty(*size, **kw):
        t = real(*size, **kw)
        if t.dtype == torch.uint8:  # payload buffers; headers are int64[12]
            ALLOCATED.append(t.numel())
        return t
    return empty


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    rng = random.Random(1)
    cases = {n: (f, p) for n, (f, p, _) in CASES.items()}
    cases |= {f"random{i}": (_random_header(rng), None) for i in range(40)}
    results = {}
    if rank == 0:
        p2p.torch.empty = _recording_empty(torch.empty)
    for name, (fields, payload) in cases.items():
        _GROUP[0] = dist.new_group([0, 1])
        accepted = None
        try:
            decode_header(torch.tensor(fields, dtype=torch.int64), max_bytes=1 << 20, expect_kind=Kind.ACTIVATION,
                          expect_step=STEP, expect=EXPECT)
            accepted = fields[10]
        except WireError:
            pass
        if rank == 1:
            _rogue(fields, payload if payload is not None else accepted)
        else:
            ALLOCATED.clear()
            ch = Channel(1, counter=ByteCounter(), max_bytes=1 << 20, timeout_s=10, group=_GROUP[0])
            try:
                t = ch.recv(Kind.ACTIVATION, STEP, EXPECT)
                results[name] = {"ok": list(t.shape), "allocated": list(ALLOCATED)}
            except WireError as e:
                results[name] = {"error": str(e), "allocated": list(ALLOCATED)}
            except Exception:  # noqa: BLE001
                results[name] = {"crash": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        # Lengths that do not fit the batch they describe.
        for name, lengths in (("lengths_zero", [0, 3]), ("lengths_too_long", [2, 99])):
            try:
                check_lengths(torch.tensor(lengths), 4, peer=1)
                results[name] = {"ok": lengths}
            except WireError as e:
                results[name] = {"error": str(e), "allocated": []}
    # Last: a peer that sends a valid header and then nothing. The receiver must give up, not hang.
    _GROUP[0] = dist.new_group([0, 1])
    if rank == 1:
        dist.send(torch.tensor(header(), dtype=torch.int64), dst=0, group=_GROUP[0])
        dist.barrier()
    else:
        ch = Channel(1, counter=ByteCounter(), max_bytes=1 << 20, timeout_s=2, group=_GROUP[0])
        try:
            ch.recv(Kind.ACTIVATION, STEP, EXPECT)
            results["silent_after_header"] = {"ok": "received?!"}
        except PeerLostError as e:
            results["silent_after_header"] = {"lost": str(e)}
        dist.barrier()
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"results": results}, f)
    os._exit(0)  # the silent case left a receive pending: no collective teardown


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    with_free_port(lambda port: mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True))
    return json.loads((out / "results.json").read_text())["results"]


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_header_is_rejected_before_allocating(outcome, name):
    got = outcome[name]
    assert "error" in got, got
    msg = got["error"]
    assert "\n" not in msg and "rank 1" in msg and CASES[name][2] in msg, msg
    assert got["allocated"] == [], f"allocated {got['allocated']} bytes for a rejected header"


def test_random_headers_are_rejected_or_meet_the_expectation(outcome):
    randoms = {n: r for n, r in outcome.items() if re.fullmatch(r"random\d+", n)}
    assert len(randoms) == 40
    for name, got in randoms.items():
        assert "crash" not in got, got
        assert all(n <= BOUND for n in got["allocated"]), (name, got)
        if "ok" in got:  # only a header that decodes under the expectation gets through
            assert EXPECT.problem(torch.float32, tuple(got["ok"])) is None, got
        else:
            assert "\n" not in got["error"] and "rank 1" in got["error"], got
    assert sum("error" in r for r in randoms.values()) >= 30  # mostly hostile, as drawn


def test_lengths_that_do_not_fit_their_batch_are_rejected(outcome):
    for name in ("lengths_zero", "lengths_too_long"):
        assert "error" in outcome[name] and "rank 1" in outcome[name]["error"], outcome[name]


def test_a_peer_silent_after_its_header_is_lost_not_waited_on_forever(outcome):
    msg = outcome["silent_after_header"].get("lost", "")
    assert msg.startswith("rank 0: lost rank 1 while waiting for activation"), outcome["silent_after_header"]
