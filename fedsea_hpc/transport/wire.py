"""Wire format of one point-to-point message.

Every message is a fixed-size int64 header followed by the raw payload bytes::

    [MAGIC, VERSION, kind, step, dtype_code, ndim, d0, d1, d2, d3, nbytes, reserved]

The header has a fixed length so the receiver can always post its first ``irecv`` without knowing
anything; it then validates the header *before* allocating the payload buffer, so a corrupt or
hostile peer cannot make it allocate an absurd amount of memory or misinterpret bytes.

The attention mask never crosses the wire: only per-sample lengths (``[B]`` int64, kind
``LENGTHS``) do; each side rebuilds masks and positions with :mod:`fedsea_hpc.model.masks`.

This module is pure (no ``torch.distributed``) so it is unit-testable in one process.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

MAGIC = 0x46534541  # "FSEA": rejects stray messages from code that is not speaking this protocol
VERSION = 1
HEADER_LEN = 12
HEADER_BYTES = HEADER_LEN * 8  # int64 elements
MAX_NDIM = 4

# Header field offsets; named so encode and decode cannot drift apart.
_F_MAGIC, _F_VERSION, _F_KIND, _F_STEP, _F_DTYPE, _F_NDIM = 0, 1, 2, 3, 4, 5
_F_DIMS = 6  # d0..d3 occupy 6..9
_F_NBYTES, _F_RESERVED = 10, 11

# Codes are part of the protocol: never renumber, only append.
_DTYPE_BY_CODE: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.int64,
    6: torch.int32,
    7: torch.uint8,
    8: torch.bool,
}
_CODE_BY_DTYPE: dict[torch.dtype, int] = {d: c for c, d in _DTYPE_BY_CODE.items()}


class WireError(ValueError):
    """A message or header that violates the wire protocol."""


class Kind(enum.IntEnum):
    """What a message carries; its lowercase ``name`` is the byte-counter key."""

    ACTIVATION = 1  # hidden states [B, T, H], client -> server or server -> client
    GRADIENT = 2  # dL/dh [B, T, H], either direction
    LENGTHS = 3  # int64 per-sample lengths [B]
    CONTROL = 4  # small int64/float vectors (token counts, flags)

    @property
    def name(self) -> str:  # type: ignore[override]
        # Lowercase so counters, logs and JSON keys read naturally ("activation").
        return self._name_.lower()


def _kind_names() -> str:
    return ", ".join(k.name for k in Kind)


@dataclass(frozen=True)
class Header:
    """A validated header: payload ``kind``, ``step`` (>= 0), ``dtype``, ``shape`` (at most
    ``MAX_NDIM`` dims, ``()`` = scalar) and ``nbytes`` (= ``prod(shape) * itemsize``)."""

    kind: Kind
    step: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


Dim = int | tuple[int, int]  # an exact size, or an inclusive range (lo, hi)


@dataclass(frozen=True)
class Expect:
    """What a receiver accepts next, beyond the protocol's own rules: the dtype, and per dim an
    exact size or an inclusive range. Checked on the header, before anything is allocated, so the
    largest buffer a peer can make a receiver allocate is bounded by the expectation.

    ``Expect(torch.float32, ((1, 8), (1, 128), 64))``: [1..8, 1..128, 64] float32.
    """

    dtype: torch.dtype
    dims: tuple[Dim, ...]

    def problem(self, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
        """Why ``dtype``/``shape`` do not meet the expectation, or None."""
        if dtype != self.dtype:
            return f"dtype {dtype} is not the expected {self.dtype}"
        if len(shape) != len(self.dims):
            return f"shape {list(shape)} is not {len(self.dims)}-d like the expected {self}"
        for i, (d, want) in enumerate(zip(shape, self.dims)):
            lo, hi = (want, want) if isinstance(want, int) else want
            if not lo <= d <= hi:
                return f"dim {i} of shape {list(shape)} is {d}, expected {lo if lo == hi else f'{lo}..{hi}'}"
        return None

    def nbytes(self) -> int | None:
        """Payload size when every dim is exact (the receiver can post its buffer before the
        header arrives), else None."""
        if not all(isinstance(d, int) for d in self.dims):
            return None
        return math.prod(self.dims) * self.dtype.itemsize

    def __str__(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else f"{d[0]}..{d[1]}" for d in self.dims)
        return f"{str(self.dtype).removeprefix('torch.')}[{dims}]"


def encode_header(kind: Kind, step: int, tensor: torch.Tensor) -> torch.Tensor:
    """Build the ``[HEADER_LEN]`` int64 CPU header describing ``tensor`` (kind, ``step >= 0``).

    Raises ``WireError`` if ``tensor`` has more than ``MAX_NDIM`` dims or a dtype without a code.
    """
    kind = Kind(kind)
    if step < 0:
        raise WireError(f"cannot encode {kind.name}: step {step} is negative")
    if tensor.dim() > MAX_NDIM:
        raise WireError(f"cannot encode {kind.name}: ndim {tensor.dim()} > {MAX_NDIM}")
    code = _CODE_BY_DTYPE.get(tensor.dtype)
    if code is None:
        raise WireError(f"cannot encode {kind.name}: dtype {tensor.dtype} has no wire code")
    dims = list(tensor.shape) + [0] * (MAX_NDIM - tensor.dim())
    nbytes = tensor.numel() * tensor.element_size()
    fields = [MAGIC, VERSION, int(kind), step, code, tensor.dim(), *dims, nbytes, 0]
    return torch.tensor(fields, dtype=torch.int64)


def decode_header(
    header: torch.Tensor,
    *,
    max_bytes: int,
    expect_kind: Kind | None = None,
    expect_step: int | None = None,
    expect: Expect | None = None,
    peer: int | None = None,
) -> Header:
    """Validate a received ``[HEADER_LEN]`` int64 header (any device) before anything is allocated.

    Parameters
    ----------
    max_bytes : int
        Largest payload this receiver accepts.
    expect_kind, expect_step : optional
        If given, the header must carry exactly this kind / step.
    expect : Expect, optional
        If given, dtype and shape must meet it.
    peer : int, optional
        Sender rank, used only in error messages.

    Raises
    ------
    WireError
        One line naming the first violation. ``reserved`` is ignored (``VERSION`` gates changes).
    """
    where = "bad header" if peer is None else f"bad header from rank {peer}"

    def fail(why: str) -> WireError:
        return WireError(f"{where}: {why}")

    if header.dtype != torch.int64 or tuple(header.shape) != (HEADER_LEN,):
        raise fail(f"expected int64[{HEADER_LEN}], got {header.dtype}{list(header.shape)}")
    f = header.detach().cpu().tolist()
    if f[_F_MAGIC] != MAGIC:
        raise fail(f"magic {f[_F_MAGIC]:#x} is not {MAGIC:#x} (not a fedsea message)")
    if f[_F_VERSION] != VERSION:
        raise fail(f"protocol version {f[_F_VERSION]} is not {VERSION}")
    if f[_F_KIND] not in Kind._value2member_map_:
        raise fail(f"kind {f[_F_KIND]} is not one of {_kind_names()}")
    kind = Kind(f[_F_KIND])
    step = f[_F_STEP]
    if step < 0:
        raise fail(f"step {step} is negative")
    dtype = _DTYPE_BY_CODE.get(f[_F_DTYPE])
    if dtype is None:
        raise fail(f"dtype code {f[_F_DTYPE]} is unknown (known: {sorted(_DTYPE_BY_CODE)})")
    ndim = f[_F_NDIM]
    if not 0 <= ndim <= MAX_NDIM:
        raise fail(f"ndim {ndim} is outside 0..{MAX_NDIM}")
    dims = f[_F_DIMS : _F_DIMS + MAX_NDIM]
    shape = tuple(dims[:ndim])
    if any(d < 0 for d in shape):
        raise fail(f"shape {list(shape)} has a negative dim")
    if any(d != 0 for d in dims[ndim:]):
        raise fail(f"unused dims {dims[ndim:]} of a {ndim}-d shape are not 0")
    # Python ints: the product cannot overflow, so a huge shape is caught by max_bytes below.
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    nbytes = f[_F_NBYTES]
    if nbytes != expected:
        raise fail(f"nbytes {nbytes} != {expected} for {dtype} {list(shape)}")
    if nbytes > max_bytes:
        raise fail(f"payload of {nbytes} bytes exceeds max_bytes={max_bytes}")
    if expect_kind is not None and kind != expect_kind:
        raise fail(f"expected kind {Kind(expect_kind).name}, got {kind.name}")
    if expect_step is not None and step != expect_step:
        raise fail(f"expected step {expect_step}, got {step} ({kind.name})")
    if expect is not None and (why := expect.problem(dtype, shape)):
        raise fail(f"{kind.name}: {why}")
    return Header(kind=kind, step=step, dtype=dtype, shape=shape, nbytes=nbytes)


def tensor_to_bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of ``t`` (any shape) as ``[t.numel() * t.element_size()]`` uint8, same device.

    A view when ``t`` is contiguous, else one contiguous copy; keep it alive until the send
    completes. Detached because a dtype-changing view is refused on tensors that require grad.
    """
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bytes_to_tensor(buf: torch.Tensor, header: Header) -> torch.Tensor:
    """View ``buf`` (``[header.nbytes]`` uint8) as ``header.shape`` of ``header.dtype``, no copy."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != header.nbytes:
        raise WireError(
            f"payload buffer {buf.dtype}{list(buf.shape)} does not hold {header.nbytes} bytes"
        )
    return buf.view(header.dtype).view(header.shape)


def check_lengths(lengths: torch.Tensor, seq_len: int, peer: int) -> None:
    """Received per-sample lengths ``[B]`` must each lie in ``1..seq_len`` (T of the batch they
    describe); raises ``WireError`` naming ``peer``."""
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > seq_len):
        raise WireError(f"bad lengths from rank {peer}: {lengths.tolist()[:8]} not all within 1..{seq_len}")


def _real(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, seq_len]`` bool: True on the real tokens of right-padded rows of ``lengths``."""
    return torch.arange(seq_len, device=lengths.device).unsqueeze(0) < lengths.to(torch.int64).unsqueeze(1)


def pack_tokens(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[B, T, H]`` of right-padded rows -> ``[sum(lengths), H]``, the real tokens
    only (row by row, in position order): what crosses the wire, so padding never does.

    Detached; the receiver restores the batch shape with :func:`unpack_tokens` and the lengths
    it received before."""
    if h.dim() != 3 or lengths.shape != (h.shape[0],):
        raise WireError(f"cannot pack {list(h.shape)} by lengths of shape {list(lengths.shape)}")
    return h.detach()[_real(lengths.to(h.device), h.shape[1])]


def unpack_tokens(packed: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of :func:`pack_tokens`: ``[sum(lengths), H]`` -> ``[B, seq_len, H]`` with zeros on
    the pads (masked out of attention and loss, so their value never reaches a real token)."""
    n = int(lengths.sum())
    if packed.dim() != 2 or packed.shape[0] != n:
        raise WireError(f"cannot unpack {list(packed.shape)}: the lengths hold {n} tokens")
    out = packed.new_zeros(len(lengths), seq_len, packed.shape[1])
    out[_real(lengths.to(packed.device), seq_len)] = packed
    return out
