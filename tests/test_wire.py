"""Unit tests for the wire header and payload codec (single process)."""

import pytest
import torch

from fedsea_hpc.transport.wire import (
    HEADER_LEN,
    MAGIC,
    Expect,
    Kind,
    WireError,
    bytes_to_tensor,
    decode_header,
    encode_header,
    pack_tokens,
    tensor_to_bytes,
    unpack_tokens,
)

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (3,), (2, 5), (2, 0, 4), (1, 2, 3, 4)]
BIG = 1 << 30


def _sample(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 100
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.uint8:
        return x.abs().to(dtype)
    return x.to(dtype)


def test_kind_names_are_lowercase_counter_keys():
    assert [k.name for k in Kind] == ["activation", "gradient", "lengths", "control"]
    assert [int(k) for k in Kind] == [1, 2, 3, 4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_header_round_trip(dtype, shape):
    # Prepare
    t = _sample(shape, dtype)
    # Execute
    header = encode_header(Kind.GRADIENT, 7, t)
    meta = decode_header(header, max_bytes=BIG, expect_kind=Kind.GRADIENT, expect_step=7)
    # Assert
    assert header.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    assert meta.kind is Kind.GRADIENT and meta.step == 7
    assert meta.dtype == dtype and meta.shape == tuple(shape)
    assert meta.nbytes == t.numel() * t.element_size()


def _corrupt(**fields):
    """A valid header of float32 [2, 3] with some fields overwritten by index."""
    h = encode_header(Kind.ACTIVATION, 3, torch.zeros(2, 3))
    for idx, value in fields.items():
        h[int(idx[1:])] = value
    return h


@pytest.mark.parametrize(
    "header, kwargs, match",
    [
        (_corrupt(f0=12345), {}, "magic"),
        (_corrupt(f1=99), {}, "version 99"),
        (_corrupt(f2=9), {}, "kind 9 is not one of activation, gradient, lengths, control"),
        (_corrupt(f4=42), {}, "dtype code 42"),
        (_corrupt(f5=5), {}, "ndim 5"),
        (_corrupt(f5=-1), {}, "ndim -1"),
        (_corrupt(f6=-2, f10=-24), {}, "negative dim"),
        (_corrupt(f8=4), {}, "unused dims"),
        (_corrupt(f10=25), {}, "nbytes 25 != 24"),
        (_corrupt(f3=-1), {}, "step -1"),
        (encode_header(Kind.ACTIVATION, 3, torch.zeros(2, 3)), {"max_bytes": 23}, "max_bytes=23"),
        (encode_header(Kind.ACTIVATION, 3, torch.zeros(2, 3)), {"expect_kind": Kind.GRADIENT},
         "expected kind gradient, got activation"),
        (encode_header(Kind.ACTIVATION, 3, torch.zeros(2, 3)), {"expect_step": 4},
         "expected step 4, got 3"),
        (torch.zeros(HEADER_LEN, dtype=torch.int32), {}, "expected int64"),
        (torch.zeros(HEADER_LEN - 1, dtype=torch.int64), {}, "expected int64"),
    ],
)
def test_decode_rejects(header, kwargs, match):
    # Prepare
    kwargs = {"max_bytes": BIG, **kwargs}
    # Execute / Assert
    with pytest.raises(WireError, match=match) as info:
        decode_header(header, peer=3, **kwargs)
    assert str(info.value).startswith("bad header from rank 3: ")
    assert "\n" not in str(info.value)


def test_decode_validates_before_allocating_huge_shapes():
    # A 2^60-element shape with a consistent nbytes must be refused by max_bytes, not by OOM.
    header = _corrupt(f6=1 << 30, f7=1 << 30, f10=(1 << 60) * 4)
    with pytest.raises(WireError, match="exceeds max_bytes"):
        decode_header(header, max_bytes=BIG)


def test_encode_rejects_what_it_cannot_describe():
    with pytest.raises(WireError, match="ndim 5"):
        encode_header(Kind.ACTIVATION, 0, torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(WireError, match="no wire code"):
        encode_header(Kind.ACTIVATION, 0, torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(WireError, match="negative"):
        encode_header(Kind.ACTIVATION, -1, torch.zeros(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_payload_round_trip_is_bit_exact(dtype):
    # Prepare: include NaN/inf/-0.0 for float types, where value equality would lie.
    t = _sample((2, 3, 4), dtype)
    if t.is_floating_point():
        t.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    meta = decode_header(encode_header(Kind.ACTIVATION, 0, t), max_bytes=BIG)
    # Execute
    buf = tensor_to_bytes(t).clone()  # clone: simulate a fresh receive buffer
    out = bytes_to_tensor(buf, meta)
    # Assert
    assert buf.dtype == torch.uint8 and buf.numel() == meta.nbytes
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_tensor_to_bytes_is_a_view_when_contiguous_and_handles_odd_inputs():
    t = torch.randn(4, 5, requires_grad=True)
    assert tensor_to_bytes(t).data_ptr() == t.data_ptr()
    nc = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous: one copy, values in logical order
    meta = decode_header(encode_header(Kind.ACTIVATION, 0, nc), max_bytes=BIG)
    assert torch.equal(bytes_to_tensor(tensor_to_bytes(nc).clone(), meta), nc)
    empty = torch.zeros(0, 7)
    meta = decode_header(encode_header(Kind.ACTIVATION, 0, empty), max_bytes=BIG)
    assert bytes_to_tensor(tensor_to_bytes(empty), meta).shape == (0, 7)
    with pytest.raises(WireError, match="does not hold"):
        bytes_to_tensor(torch.zeros(3, dtype=torch.uint8), meta)


def test_exact_expectation_knows_its_payload_size_and_a_range_does_not():
    assert Expect(torch.float32, (3, 64)).nbytes() == 3 * 64 * 4
    assert Expect(torch.bfloat16, ()).nbytes() == 2  # a scalar
    assert Expect(torch.float32, (0, 64)).nbytes() == 0
    assert Expect(torch.int64, ((1, 8),)).nbytes() is None


def test_packing_keeps_real_tokens_only_and_unpacking_restores_them():
    # Prepare: right-padded rows of 3, 1 and 4 real tokens; pads hold junk that must not travel.
    lengths = torch.tensor([3, 1, 4])
    h = torch.randn(3, 4, 5)
    # Execute
    packed = pack_tokens(h, lengths)
    back = unpack_tokens(packed, lengths, 4)
    # Assert: row by row, in position order; pads come back as zeros; a longer T pads further.
    assert packed.shape == (8, 5)
    assert torch.equal(packed, torch.cat([h[0, :3], h[1, :1], h[2, :4]]))
    real = torch.arange(4) < lengths.unsqueeze(1)
    assert torch.equal(back[real], h[real]) and not back[~real].any()
    assert torch.equal(unpack_tokens(packed, lengths, 6)[:, :4], back)
    assert not pack_tokens(h.requires_grad_(True), lengths).requires_grad


def test_packing_refuses_shapes_the_lengths_do_not_describe():
    with pytest.raises(WireError, match="cannot pack"):
        pack_tokens(torch.zeros(2, 4, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(WireError, match="the lengths hold 3 tokens"):
        unpack_tokens(torch.zeros(4, 5), torch.tensor([1, 2]), 4)
