"""Secure aggregation of client updates: pairwise masks that cancel in the sum.

After Bonawitz et al. (CCS 2017), without dropout recovery (a lost client ends the job anyway):
every pair of clients (i, j) agrees on a key by X25519 over the client group and derives a
ChaCha20 keystream from it; client i adds the pair's stream when i < j and subtracts it when
i > j. What a client puts into the all-reduce is its update plus a sum of streams no single peer
can compute, uniform modulo M, so any part of it a peer sees in transit (a ring all-reduce hands
chunks and partial sums around) says nothing about the update; in the full sum the streams cancel.

The arithmetic is exact: updates are fixed-point integers (``FRACTION_BITS`` fractional bits,
resolution 2.3e-10) modulo M = 2^bits, with bits chosen so that the all-reduce of n values below
M cannot overflow int64. Only the decoded sum is rounded, once. Crypto comes from the
``cryptography`` package; nothing here is a home-made primitive.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 32


def modulus_bits(n_clients: int) -> int:
    """log2 M: the sum of ``n_clients`` values below M must stay below 2^63."""
    return 62 - math.ceil(math.log2(max(n_clients, 2)))


def agree_keys(index: int, n_clients: int, group, device: torch.device) -> dict[int, bytes]:
    """One X25519 exchange per pair, over ``group`` (all clients call it together).

    Returns ``{peer: 32-byte key}``; the private key never leaves this function. Public keys
    travel over the client group itself, which the server ranks are not part of.
    """
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    mine = torch.frombuffer(bytearray(public), dtype=torch.int64).to(device)  # [4]
    everyone = [torch.zeros_like(mine) for _ in range(n_clients)]
    dist.all_gather(everyone, mine, group=group)
    keys = {}
    for peer, pub in enumerate(everyone):
        if peer == index:
            continue
        shared = private.exchange(X25519PublicKey.from_public_bytes(pub.cpu().numpy().tobytes()))
        lo, hi = sorted((index, peer))
        keys[peer] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                          info=f"fedsea secure aggregation {lo}-{hi}".encode()).derive(shared)
    return keys


def keystream(key: bytes, counter: int, numel: int, bits: int) -> torch.Tensor:
    """[numel] int64 uniform in [0, 2^bits): ChaCha20 of ``key`` with nonce ``counter``."""
    nonce = counter.to_bytes(16, "little")  # cryptography's ChaCha20 nonce: counter + nonce, 16 bytes
    raw = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * numel))
    return torch.frombuffer(bytearray(raw), dtype=torch.int64) & ((1 << bits) - 1)


class SecureSum:
    """In-place masked sum of one flat float vector over the client group, exact in fixed point.

    Parameters
    ----------
    index, n_clients : int
        This client and the group size.
    group : ProcessGroup or None
        The client group.
    keys : dict
        ``{peer: key}`` from :func:`agree_keys`.
    record : bool
        Keep the last call's integers (``raw``, ``masked``, ``total``) for audits and tests.
    """

    def __init__(self, index: int, n_clients: int, group, keys: dict[int, bytes], *, record: bool = False):
        self.index, self.n, self.group, self.keys = index, n_clients, group, keys
        self.bits = modulus_bits(n_clients)
        self.modulus = 1 << self.bits
        self.calls = 0  # the same on every client: calls are collective, in lockstep
        self.record = record
        self.last: dict[str, torch.Tensor] = {}

    def mask(self, numel: int) -> torch.Tensor:
        """This client's share of the pairwise masks for the next call: [numel] int64 in [0, M)."""
        out = torch.zeros(numel, dtype=torch.int64)
        for peer, key in sorted(self.keys.items()):
            stream = keystream(key, self.calls, numel, self.bits)
            out = torch.remainder(out + stream if self.index < peer else out - stream, self.modulus)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float [N] -> int64 [N] in [0, M): round(x · 2^F) mod M."""
        return torch.remainder(torch.round(x.detach().double().cpu() * 2.0**FRACTION_BITS).to(torch.int64),
                               self.modulus)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """int64 [N] in [0, M) -> float64 [N], reading values above M/2 as negative."""
        signed = torch.where(q >= self.modulus // 2, q - self.modulus, q)
        return signed.double() / 2.0**FRACTION_BITS

    def __call__(self, flat: torch.Tensor) -> None:
        """Replace ``flat`` [N] (same length on every client) by its sum over the clients."""
        # The fixed-point range must hold the sum; the verdict is agreed (a flag, not a value).
        limit = self.modulus / 2 / 2.0**FRACTION_BITS / self.n
        too_big = torch.tensor([float(not bool((flat.detach().abs() < limit).all()))], device=flat.device)
        dist.all_reduce(too_big, op=dist.ReduceOp.MAX, group=self.group)
        if too_big.item():
            raise ValueError(f"secure aggregation: a client update exceeds the fixed-point range ±{limit:.3g}; "
                             "lower train.lr or turn federated.secure_aggregation off")
        raw = self.encode(flat)
        masked = torch.remainder(raw + self.mask(raw.numel()), self.modulus)
        self.calls += 1
        total = masked.to(flat.device, copy=True)  # all_reduce works in place; keep masked as sent
        dist.all_reduce(total, group=self.group)  # n values below M: no int64 overflow
        total = torch.remainder(total.cpu(), self.modulus)
        if self.record:
            self.last = {"raw": raw, "masked": masked, "total": total.clone()}
        with torch.no_grad():
            flat.copy_(self.decode(total).to(flat.dtype))
