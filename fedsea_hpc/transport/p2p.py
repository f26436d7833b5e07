"""Point-to-point channel between two ranks: framed, validated, byte-counted.

A ``Channel`` is one link to one peer rank (Megatron ``P2PCommunicator`` style: the peer is fixed
once, and every public method goes through one private send routine and one private receive
routine). Each message is a header (``wire.encode_header``) then the raw payload bytes, both sent
with ``dist.isend`` / received with ``dist.irecv`` and waited with a timeout, so a dead peer turns
into a ``PeerLostError`` instead of a hang.

Ordering contract: messages on one channel are delivered in the order they were posted, no tags
are used (NCCL ignores them, and a mismatched kind is then caught by header validation instead of
deadlocking on gloo). At most one receive may be outstanding per channel.

One round trip per message, not two: gloo (and NCCL) only move a payload once its receive is
posted, so a receiver that posts the payload only after reading the header pays a header ->
"ready" -> payload exchange on every hop (~5 ms per send on an oversubscribed CPU). Where the
receiver knows the exact shape already (an ``Expect`` with every dim exact: a reply has its
request's shape, packed activations have ``sum(lengths)`` rows), ``irecv`` posts the payload
buffer together with the header, so both flow as soon as the sender posts them. The header is
still validated before the payload is used; a header that disagrees with the expectation is a
``WireError`` and the pre-posted buffer (sized by the receiver, never by the peer) is dropped
with the channel.

One backend operation per side, not two: with ``fused=True`` on both ends (the receiver's
expectation exact) header and payload travel as one buffer. Posting a gloo send costs about a
millisecond on an oversubscribed CPU, so the training hops (every activation and gradient,
whose shapes both sides know) go fused; the header is still decoded and checked first.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from fedsea_hpc.trace import TRACE
from fedsea_hpc.transport.wire import (
    HEADER_BYTES,
    HEADER_LEN,
    Expect,
    Kind,
    bytes_to_tensor,
    decode_header,
    encode_header,
    tensor_to_bytes,
)

DIRECTIONS = ("sent", "recv")
HEADER_KEY = "header"


class ByteCounter:
    """Bytes sent and received on this rank, per message kind.

    Header bytes are kept under their own key ``'header'`` (``HEADER_BYTES`` per message) so
    payload counters can be compared exactly with a theoretical minimum (``numel * itemsize``),
    while the totals still report what really crossed the wire.
    """

    def __init__(self) -> None:
        self._keys = tuple(k.name for k in Kind) + (HEADER_KEY,)
        self._bytes: dict[str, dict[str, int]] = {}
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self._bytes = {d: dict.fromkeys(self._keys, 0) for d in DIRECTIONS}

    def add(self, direction: str, kind: Kind | str, nbytes: int) -> None:
        """Count ``nbytes`` under ``direction`` ('sent' or 'recv') and ``kind`` (or 'header')."""
        key = kind.name if isinstance(kind, Kind) else str(kind)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
        if key not in self._keys:
            raise ValueError(f"counter key {key!r} is not one of {self._keys}")
        if nbytes < 0:
            raise ValueError(f"nbytes {nbytes} is negative")
        self._bytes[direction][key] += int(nbytes)

    def totals(self) -> dict[str, dict[str, int]]:
        """A copy: ``{"sent": {"activation": n, ..., "header": n}, "recv": {...}}``."""
        return {d: dict(c) for d, c in self._bytes.items()}

    def sent_total(self, *, include_header: bool = True) -> int:
        """All bytes sent (payload plus, by default, headers)."""
        return self._total("sent", include_header)

    def recv_total(self, *, include_header: bool = True) -> int:
        """All bytes received (payload plus, by default, headers)."""
        return self._total("recv", include_header)

    def _total(self, direction: str, include_header: bool) -> int:
        c = self._bytes[direction]
        return sum(v for k, v in c.items() if include_header or k != HEADER_KEY)


class PeerLostError(RuntimeError):
    """The peer died, closed its connection or did not answer within the timeout.

    The channel (and in practice the process group) is unusable afterwards: a timed-out
    operation may still be pending inside the backend.
    """

    def __init__(self, message: str, *, rank: int | None = None, peer: int | None = None):
        super().__init__(message)
        self.rank = rank
        self.peer = peer


class SendHandle:
    """An in-flight send; keeps its buffers alive until ``wait`` returns."""

    def __init__(self, channel: Channel, kind: Kind, step: int, works, buffers, nbytes: int, seq: int | None):
        self._channel, self._kind, self._step = channel, kind, step
        self._works, self._buffers, self._nbytes = works, buffers, nbytes
        self._seq = seq  # its number on the trace (run.trace), None when not tracing
        self._done = False

    def wait(self) -> None:
        """Block until header and payload are handed off; counts bytes once they are."""
        if self._done:
            return
        what = f"{self._kind.name} send to complete"
        with TRACE.wait("send", self._kind.name, self._channel.peer, self._seq):
            for work in self._works:
                self._channel._wait(work, what, self._step)
        self._channel.counter.add("sent", HEADER_KEY, HEADER_BYTES)
        self._channel.counter.add("sent", self._kind, self._nbytes)
        self._buffers = None  # the backend is done with them
        self._done = True


class RecvHandle:
    """A posted header receive (and, for an exact expectation, the payload receive with it);
    ``wait`` validates the header, completes the payload and returns it."""

    def __init__(self, channel: Channel, kind: Kind, step: int, header: torch.Tensor, work,
                 expect: Expect | None = None, payload: tuple[torch.Tensor, object] | None = None,
                 seq: int | None = None, fused: torch.Tensor | None = None):
        self._channel, self._kind, self._step, self._expect = channel, kind, step, expect
        self._header, self._work = header, work
        self._payload = payload  # (buffer, work) posted with the header, or None
        self._seq = seq  # its number on the trace (run.trace), None when not tracing
        self._fused = fused  # header + payload in one buffer (a fused receive), or None
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        """Return the received tensor (shape/dtype from the header, on the channel's device)."""
        if self._result is None:
            with TRACE.wait("recv", self._kind.name, self._channel.peer, self._seq) as ev:
                self._result = self._channel._finish_recv(self)
                if ev is not None:
                    ev["bytes"] = self._result.numel() * self._result.element_size()
        return self._result


class Channel:
    """One point-to-point link to ``peer``.

    Parameters
    ----------
    peer : int
        Global rank of the other end (even when ``group`` is a subgroup).
    counter : ByteCounter
        Shared per-rank counter; one counter for all channels of a rank gives per-rank totals.
    max_bytes : int
        Largest payload accepted from the peer; checked before allocation.
    timeout_s : float
        Seconds to wait for any single header or payload operation.
    group : ProcessGroup, optional
        None = default group.
    device : torch.device or str, optional
        Where receive buffers live and where sends are staged: 'cpu' for gloo (default), the
        local CUDA device for NCCL.
    """

    def __init__(
        self,
        peer: int,
        *,
        counter: ByteCounter,
        max_bytes: int,
        timeout_s: float,
        group=None,
        device: torch.device | str | None = None,
    ):
        self.rank = dist.get_rank()
        if peer == self.rank:
            raise ValueError(f"rank {self.rank}: a channel to itself is not allowed")
        if max_bytes < 0 or timeout_s <= 0:
            raise ValueError(f"need max_bytes >= 0 and timeout_s > 0, got {max_bytes}, {timeout_s}")
        self.peer = peer
        self.counter = counter
        self.max_bytes = max_bytes
        self.timeout = timedelta(seconds=timeout_s)
        self.group = group
        self.device = torch.device("cpu" if device is None else device)
        self._recv_pending = False

    def __repr__(self) -> str:
        return f"Channel(rank={self.rank} <-> peer={self.peer}, device={self.device})"

    # ------------------------------------------------------------------ the two private routines

    def isend(self, kind: Kind, tensor: torch.Tensor, step: int, *, fused: bool = False) -> SendHandle:
        """Post header and payload of ``tensor`` (``ndim <= 4``); return a handle to wait on.

        ``fused``: header and payload go as one buffer, one backend send (the receiver must post
        the matching fused receive, :meth:`irecv`)."""
        kind = Kind(kind)
        header = encode_header(kind, step, tensor).to(self.device)
        payload = tensor_to_bytes(tensor.to(self.device))
        what = f"{kind.name} send to be posted"
        with TRACE.post("send", kind.name, self.peer, payload.numel()) as ev:
            if fused:
                header = torch.cat([header.view(torch.uint8), payload])
                works = [self._post(dist.isend, header, what, step)]
            else:
                works = [self._post(dist.isend, header, what, step)]
                if payload.numel():  # empty tensors are header-only: a 0-byte op is pointless
                    works.append(self._post(dist.isend, payload, what, step))
        return SendHandle(self, kind, step, works, (header, payload), payload.numel(),
                          None if ev is None else ev["seq"])

    def irecv(self, kind: Kind, step: int, expect: Expect | None = None, *, fused: bool = False) -> RecvHandle:
        """Post the receive for the next message, expected to be ``kind`` at ``step`` (and to
        meet ``expect``, checked on the header before the payload is used).

        With an exact ``expect`` (every dim an int) the payload buffer is allocated by this side
        and posted at once, so the message takes one round trip; otherwise it is allocated after
        the header is validated. ``fused`` (needs an exact ``expect``; the sender sends fused):
        one buffer for header and payload, one backend receive."""
        kind = Kind(kind)
        if self._recv_pending:
            # A second header irecv would be matched with the first message's payload bytes.
            raise RuntimeError(f"{self!r}: wait on the pending receive before posting another")
        nbytes = expect.nbytes() if expect is not None else None
        if fused and (nbytes is None or nbytes > self.max_bytes):
            raise ValueError(f"{self!r}: a fused {kind.name} receive needs an exact expectation within max_bytes")
        exact = nbytes is not None and (0 < nbytes <= self.max_bytes or fused)
        with TRACE.post("recv", kind.name, self.peer, nbytes if exact else None, exact) as ev:
            payload = whole = None
            if fused:  # header then payload in one buffer, sized by this side
                whole = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=self.device)
                header = whole[:HEADER_BYTES].view(torch.int64)
                work = self._post(dist.irecv, whole, kind.name, step)
            else:
                header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                work = self._post(dist.irecv, header, f"{kind.name} header", step)
                if exact:
                    buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                    payload = (buf, self._post(dist.irecv, buf, kind.name, step))
        self._recv_pending = True
        return RecvHandle(self, kind, step, header, work, expect, payload, None if ev is None else ev["seq"],
                          fused=whole)

    def _finish_recv(self, h: RecvHandle) -> torch.Tensor:
        try:
            self._wait(h._work, f"{h._kind.name} header", h._step)
            # Counted before validation: a rejected header still crossed the wire.
            self.counter.add("recv", HEADER_KEY, HEADER_BYTES)
            meta = decode_header(
                h._header,
                max_bytes=self.max_bytes,
                expect_kind=h._kind,
                expect_step=h._step,
                expect=h._expect,
                peer=self.peer,
            )
            if h._fused is not None:  # arrived with the header, in the same buffer
                buf = h._fused[HEADER_BYTES:]
            elif h._payload is not None:  # posted with the header; the expectation fixed its size
                buf, work = h._payload
                self._wait(work, h._kind.name, h._step)
            else:
                buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=self.device)
                if meta.nbytes:
                    work = self._post(dist.irecv, buf, h._kind.name, h._step)
                    self._wait(work, h._kind.name, h._step)
        finally:
            self._recv_pending = False
        self.counter.add("recv", meta.kind, meta.nbytes)
        return bytes_to_tensor(buf, meta)

    def _post(self, op, tensor: torch.Tensor, what: str, step: int):
        try:
            return op(tensor, self.peer, group=self.group)
        except Exception as e:  # backend errors have no common base class across versions
            raise self._lost(what, step, e) from e

    def _wait(self, work, what: str, step: int) -> None:
        try:
            ok = work.wait(timeout=self.timeout)
        except Exception as e:
            raise self._lost(what, step, e) from e
        if ok is False:  # some backends report a timeout by returning False
            raise self._lost(what, step, f"timed out after {self.timeout.total_seconds()} s")

    def _lost(self, what: str, step: int, cause) -> PeerLostError:
        msg = f"rank {self.rank}: lost rank {self.peer} while waiting for {what} (step {step})"
        return PeerLostError(f"{msg}: {cause}", rank=self.rank, peer=self.peer)

    # ------------------------------------------------------------------ blocking API

    def send(self, kind: Kind, tensor: torch.Tensor, step: int, *, fused: bool = False) -> None:
        """Send ``tensor`` and wait until the backend has taken it."""
        self.isend(kind, tensor, step, fused=fused).wait()

    def recv(self, kind: Kind, step: int, expect: Expect | None = None, *, fused: bool = False) -> torch.Tensor:
        """Receive the next message, which must be ``kind`` at ``step`` (and meet ``expect``).

        Raises ``WireError`` for an invalid header (nothing allocated; if the peer did send a
        payload after it, the stream is out of step and the channel should be dropped) and
        ``PeerLostError`` when the peer dies or the timeout expires.
        """
        return self.irecv(kind, step, expect, fused=fused).wait()

    def send_activation(self, h: torch.Tensor, step: int, *, fused: bool = False) -> None:
        """Send hidden states ``[B, T, H]``."""
        self.send(Kind.ACTIVATION, h, step, fused=fused)

    def recv_activation(self, step: int, expect: Expect | None = None) -> torch.Tensor:
        """Receive hidden states ``[B, T, H]``."""
        return self.recv(Kind.ACTIVATION, step, expect)

    def send_gradient(self, g: torch.Tensor, step: int, *, fused: bool = False) -> None:
        """Send dL/dh ``[B, T, H]``."""
        self.send(Kind.GRADIENT, g, step, fused=fused)

    def recv_gradient(self, step: int, expect: Expect | None = None) -> torch.Tensor:
        """Receive dL/dh ``[B, T, H]``."""
        return self.recv(Kind.GRADIENT, step, expect)

    def send_lengths(self, lengths: torch.Tensor, step: int) -> None:
        """Send per-sample lengths ``[B]`` int64 (the compressed attention mask)."""
        self.send(Kind.LENGTHS, lengths.to(torch.int64), step)

    def recv_lengths(self, step: int, expect: Expect | None = None) -> torch.Tensor:
        """Receive per-sample lengths ``[B]`` int64."""
        return self.recv(Kind.LENGTHS, step, expect)

    def send_control(self, values: torch.Tensor, step: int) -> None:
        """Send a small control vector (e.g. token counts)."""
        self.send(Kind.CONTROL, values, step)

    def recv_control(self, step: int, expect: Expect | None = None) -> torch.Tensor:
        """Receive a small control vector."""
        return self.recv(Kind.CONTROL, step, expect)
