"""Two real gloo ranks over loopback exercising Channel, ByteCounter and failure handling.

One ``torch.multiprocessing.spawn`` of two ranks runs every scenario (assertions inside the
workers); each test then checks its scenario's outcome on both ranks.
"""

import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import with_free_port
from fedsea_hpc.transport.p2p import ByteCounter, Channel, PeerLostError
from fedsea_hpc.transport.wire import HEADER_BYTES, HEADER_LEN, Expect, Kind, WireError

TIMEOUT_S = 10.0
SHORT_TIMEOUT_S = 0.5
TIMED_OUT_KEY = "p2p_test_short_channel_timed_out"  # rank 1 stays silent until rank 0 sets it
STORE_WAIT_S = 60.0  # bound on that wait, so a failing rank 0 cannot leave rank 1 hanging
MAX_BYTES = 1 << 26

# (kind, shape, dtype): varied ranks, dtypes, an empty tensor and a scalar.
CASES = [
    (Kind.ACTIVATION, (2, 5, 8), torch.float32),
    (Kind.ACTIVATION, (3, 7, 16), torch.bfloat16),
    (Kind.GRADIENT, (2, 5, 8), torch.float16),
    (Kind.GRADIENT, (1, 2, 3, 4), torch.float64),
    (Kind.LENGTHS, (4,), torch.int64),
    (Kind.CONTROL, (), torch.int32),
    (Kind.CONTROL, (3,), torch.bool),
    (Kind.CONTROL, (5,), torch.uint8),
    (Kind.ACTIVATION, (0, 5, 8), torch.float32),  # empty: header only
]


def _make(i: int, shape, dtype, src: int) -> torch.Tensor:
    """Deterministic tensor both ranks can rebuild: the receiver knows what to expect."""
    g = torch.Generator().manual_seed(1000 * src + i)
    x = torch.randn(shape, generator=g) * 50
    if dtype == torch.bool:
        return x > 0
    return x.abs().to(dtype) if dtype == torch.uint8 else x.to(dtype)


def _expected_payload(cases) -> dict[str, int]:
    out = {k.name: 0 for k in Kind}
    for kind, shape, dtype in cases:
        out[kind.name] += torch.empty(shape, dtype=dtype).nbytes
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Run every scenario in order on one 2-rank group; record 'ok' or a traceback for each.

    One spawn for all scenarios because starting two interpreters that import torch costs
    seconds; the stream-breaking scenarios (timeout, dead peer) come last.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    results = {}
    for name, body in SCENARIOS.items():
        try:
            body(rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        # Written after each scenario: rank 1 leaves with os._exit in the last one.
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        if name != "dead_peer":
            dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict[str, str]]:
    out = tmp_path_factory.mktemp("p2p")
    with_free_port(lambda port: mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True))
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def _check(results, name: str, ranks=(0, 1)) -> None:
    for rank in ranks:
        outcome = results[rank].get(name, "did not run")
        if outcome != "ok":
            pytest.fail(f"rank {rank}, scenario {name}:\n{outcome}")


# ----------------------------------------------------------------------------- round trip


def _round_trip_body(rank: int) -> None:
    # Prepare
    peer = 1 - rank
    counter = ByteCounter()
    ch = Channel(peer, counter=counter, max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S)
    # Execute: rank 0 -> rank 1, then rank 1 -> rank 0 (one non-contiguous input each way),
    # then both directions at once with isend + recv.
    for src in (0, 1):
        for i, (kind, shape, dtype) in enumerate(CASES):
            if rank == src:
                t = _make(i, shape, dtype, src)
                ch.send(kind, t.transpose(0, -1) if i == 0 else t, step=i)
            else:
                got = ch.recv(kind, step=i)
                want = _make(i, shape, dtype, src)
                want = want.transpose(0, -1) if i == 0 else want
                # Assert (per message)
                assert got.dtype == want.dtype and got.shape == want.shape, (i, got.shape)
                assert torch.equal(got, want), i
    h = _make(99, (2, 3, 4), torch.bfloat16, rank)
    handle = ch.isend(Kind.ACTIVATION, h, step=99)
    got = ch.recv_activation(step=99)
    handle.wait()
    assert torch.equal(got, _make(99, (2, 3, 4), torch.bfloat16, peer))
    # Assert: payload bytes are exactly numel * itemsize, headers counted apart.
    n_msgs = len(CASES) + 1
    want = _expected_payload(CASES)
    want["activation"] += h.nbytes
    want["header"] = n_msgs * HEADER_BYTES
    totals = counter.totals()
    assert totals["sent"] == want, totals
    assert totals["recv"] == want, totals
    assert counter.sent_total() == sum(want.values())
    assert counter.recv_total(include_header=False) == sum(want.values()) - want["header"]


@pytest.mark.multirank
def test_round_trip_both_directions_and_byte_counts(results):
    _check(results, "round_trip")


# ----------------------------------------------------------------------------- corrupt header


def _corrupt_header_body(rank: int) -> None:
    # Prepare
    counter = ByteCounter()
    ch = Channel(1 - rank, counter=counter, max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S)
    bad = torch.zeros(HEADER_LEN, dtype=torch.int64)
    bad[0] = 0xBAD
    if rank == 1:
        dist.send(bad, dst=0)  # raw tensor, no protocol
        ch.send_lengths(torch.tensor([3, 1]), step=5)  # the stream stays usable afterwards
        return
    # Execute / Assert
    with pytest.raises(WireError, match="bad header from rank 1: magic 0xbad"):
        ch.recv(Kind.ACTIVATION, step=0)
    assert torch.equal(ch.recv_lengths(step=5), torch.tensor([3, 1]))
    # the rejected header crossed the wire, so it is counted; no payload was received
    assert counter.totals()["recv"] == {**_expected_payload([]), "lengths": 16,
                                        "header": 2 * HEADER_BYTES}


@pytest.mark.multirank
def test_corrupt_header_raises_wire_error(results):
    _check(results, "corrupt_header")


# ----------------------------------------------------------------------------- pre-posted payloads


PREPOSTED_KEY = "p2p_test_preposted_send_done"


def _preposted_body(rank: int) -> None:
    """An exact expectation posts the payload receive with the header receive.

    Proof that it did: rank 1 posts its receive, then does not wait on it until rank 0 says its
    send has completed. Gloo moves a payload only into a posted receive, so rank 0's send can
    complete only if the payload buffer was posted before the header was read."""
    store = dist.distributed_c10d._get_default_store()
    ch = Channel(1 - rank, counter=ByteCounter(), max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S)
    for i, (kind, shape, dtype) in enumerate(CASES):  # a scalar and an empty tensor among them
        if rank == 0:
            store.wait([f"{PREPOSTED_KEY}_posted{i}"], timedelta(seconds=STORE_WAIT_S))
            ch.isend(kind, _make(i, shape, dtype, 0), step=i).wait()  # header and payload handed off
            store.set(f"{PREPOSTED_KEY}{i}", "1")
        else:
            expect = Expect(dtype, tuple(shape))
            assert expect.nbytes() == torch.empty(shape, dtype=dtype).nbytes
            handle = ch.irecv(kind, step=i, expect=expect)
            store.set(f"{PREPOSTED_KEY}_posted{i}", "1")
            store.wait([f"{PREPOSTED_KEY}{i}"], timedelta(seconds=STORE_WAIT_S))
            assert torch.equal(handle.wait(), _make(i, shape, dtype, 0)), i
    # A header that disagrees with the expectation is refused even though its bytes would fit
    # the pre-posted buffer (same size, other shape). The channel is out of step afterwards, as
    # after any WireError, so this runs on a group of its own.
    side = Channel(1 - rank, counter=ByteCounter(), max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S,
                   group=dist.new_group([0, 1]))
    if rank == 0:
        side.send(Kind.GRADIENT, torch.zeros(3, 2), step=7)
    else:
        with pytest.raises(WireError, match=r"bad header from rank 0: gradient: dim 0 of shape \[3, 2\] is 3, expected 2"):
            side.recv_gradient(step=7, expect=Expect(torch.float32, (2, 3)))


@pytest.mark.multirank
def test_exact_expectation_preposts_the_payload_and_still_validates_the_header(results):
    _check(results, "preposted")


# ----------------------------------------------------------------------------- fused messages


FUSED_KEY = "p2p_test_fused_send_done"


def _fused_body(rank: int) -> None:
    """``fused=True`` on both ends: header and payload in one buffer, one send and one receive,
    the tensor intact, the bytes counted as before (payload under its kind, the header apart);
    the receive is posted before the send, and rank 0's send completes before rank 1 waits (as
    for a pre-posted payload). A fused header that disagrees with the expectation is refused."""
    store = dist.distributed_c10d._get_default_store()
    counter = ByteCounter()
    ch = Channel(1 - rank, counter=counter, max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S)
    for i, (kind, shape, dtype) in enumerate(CASES):
        if rank == 0:
            store.wait([f"{FUSED_KEY}_posted{i}"], timedelta(seconds=STORE_WAIT_S))
            handle = ch.isend(kind, _make(i, shape, dtype, 0), step=i, fused=True)
            assert len(handle._works) == 1  # one backend op, header and payload together
            handle.wait()
            store.set(f"{FUSED_KEY}{i}", "1")
        else:
            handle = ch.irecv(kind, step=i, expect=Expect(dtype, tuple(shape)), fused=True)
            store.set(f"{FUSED_KEY}_posted{i}", "1")
            store.wait([f"{FUSED_KEY}{i}"], timedelta(seconds=STORE_WAIT_S))
            assert torch.equal(handle.wait(), _make(i, shape, dtype, 0)), i
    direction = "sent" if rank == 0 else "recv"
    totals = counter.totals()[direction]
    assert totals == {**dict.fromkeys(totals, 0), **_expected_payload(CASES), "header": len(CASES) * HEADER_BYTES}
    with pytest.raises(ValueError, match="fused .* needs an exact expectation"):
        ch.irecv(Kind.LENGTHS, step=0, expect=Expect(torch.int64, ((1, 8),)), fused=True)
    side = Channel(1 - rank, counter=ByteCounter(), max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S,
                   group=dist.new_group([0, 1]))
    if rank == 0:
        side.send(Kind.GRADIENT, torch.zeros(3, 2), step=7, fused=True)
    else:
        with pytest.raises(WireError, match=r"bad header from rank 0: gradient: dim 0 of shape \[3, 2\] is 3, expected 2"):
            side.recv(Kind.GRADIENT, step=7, expect=Expect(torch.float32, (2, 3)), fused=True)


@pytest.mark.multirank
def test_fused_messages_take_one_operation_and_still_validate_the_header(results):
    _check(results, "fused")


# ----------------------------------------------------------------------------- peer loss


def _dead_peer_body(rank: int) -> None:
    """Rank 1 first stays silent past a short timeout, then dies without a word.

    The timeout is exercised on a separate group because gloo closes a pair after a timed-out
    op; on the default group's pair the later failure must then come from the death itself.
    Rank 1 stays alive until rank 0 has seen its timeout (a key in the rendezvous store), so
    which failure rank 0 sees does not depend on how fast either rank runs.
    """
    side_group = dist.new_group([0, 1])  # collective: both ranks, before rank 1 goes quiet
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        store.wait([TIMED_OUT_KEY], timedelta(seconds=STORE_WAIT_S))
        os._exit(0)
    # Prepare
    short = Channel(
        1, counter=ByteCounter(), max_bytes=MAX_BYTES, timeout_s=SHORT_TIMEOUT_S, group=side_group
    )
    ch = Channel(1, counter=ByteCounter(), max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S)
    # Execute / Assert: silent but alive -> the short channel gives up with a timeout
    try:
        with pytest.raises(PeerLostError) as timed_out:
            short.recv_gradient(step=2)
    finally:
        store.set(TIMED_OUT_KEY, "1")  # now rank 1 dies
    msg = str(timed_out.value)
    assert msg.startswith("rank 0: lost rank 1 while waiting for gradient header (step 2)"), msg
    assert "timed out" in msg.lower(), msg
    # Execute: dead -> connection error, not this channel's timeout
    with pytest.raises(PeerLostError) as info:
        ch.recv_activation(step=4)
    # Assert
    msg = str(info.value)
    assert msg.startswith("rank 0: lost rank 1 while waiting for activation header (step 4)"), msg
    assert "timed out" not in msg.lower(), msg
    assert info.value.rank == 0 and info.value.peer == 1
    # No destroy_process_group: the peer is gone, the group cannot be torn down collectively.


@pytest.mark.multirank
def test_silent_then_dead_peer_raises_peer_lost_error(results):
    _check(results, "dead_peer", ranks=(0,))  # rank 1 dies on purpose, before recording


SCENARIOS = {
    "round_trip": _round_trip_body,
    "corrupt_header": _corrupt_header_body,
    "preposted": _preposted_body,
    "fused": _fused_body,
    "dead_peer": _dead_peer_body,
}


def test_channel_to_self_is_refused():
    with pytest.raises(ValueError, match="itself"):
        _spawn_single_self_channel()


def _spawn_single_self_channel():
    # A channel needs an initialized group to learn its own rank; a 1-rank gloo group is cheap.
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        Channel(0, counter=ByteCounter(), max_bytes=1, timeout_s=1.0)
    finally:
        dist.destroy_process_group()
