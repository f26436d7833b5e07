"""Slurm's compressed host lists (``SLURM_JOB_NODELIST``), read without ``scontrol``.

``scontrol show hostnames`` is the reference, but containers, test rigs and some launch nodes have
no ``scontrol``. The grammar read here is Slurm's: hosts separated by commas at bracket depth 0;
a bracket holds comma-separated numbers and ``lo-hi`` ranges whose zero padding is kept
(``node[01-03]`` is ``node01 node02 node03``); several brackets in one host expand as a product,
left to right (``r[1-2]n[1-2]`` is ``r1n1 r1n2 r2n1 r2n2``). Anything else is a
:class:`NodeListError` naming the list and what is wrong with it.
"""
from __future__ import annotations

import re

from fedsea_hpc.errors import InputError

_PART = re.compile(r"\[([^\[\]]*)\]")
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")


class NodeListError(InputError):
    """A host list that cannot be read."""


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets; brackets must balance and not nest."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            if depth:
                raise NodeListError("nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise NodeListError("']' without '['")
            depth = 0
        if ch == "," and not depth:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise NodeListError("'[' without ']'")
    items.append("".join(cur))
    return items


def _numbers(body: str) -> list[str]:
    """``01-03,07`` → ``['01', '02', '03', '07']`` (each range keeps its low end's width)."""
    out = []
    for piece in body.split(","):
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise NodeListError(f"'[{body}]': {piece!r} is not a number or a range lo-hi")
        if not sep:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise NodeListError(f"'[{body}]': range {piece!r} runs backwards")
        if b - a >= 1_000_000:
            raise NodeListError(f"'[{body}]': range {piece!r} is implausibly long")
        out += [str(i).zfill(len(lo)) for i in range(a, b + 1)]
    return out


def _expand_host(item: str) -> list[str]:
    hosts = [""]
    pos = 0
    for m in _PART.finditer(item):
        prefix = item[pos:m.start()]
        hosts = [h + prefix + n for h in hosts for n in _numbers(m.group(1))]
        pos = m.end()
    hosts = [h + item[pos:] for h in hosts]
    for h in hosts:
        if not _HOST_CHARS.match(h):
            raise NodeListError(f"{item!r} is not a host name (letters, digits, '.', '_', '-')")
    return hosts


def expand(nodelist: str) -> list[str]:
    """Every host of a Slurm host list, in order (``gpu-a[1-2],gpu-b3`` → gpu-a1, gpu-a2, gpu-b3)."""
    text = nodelist.strip()
    try:
        if not text:
            raise NodeListError("it is empty")
        hosts = []
        for item in _split_top(text):
            if not item:
                raise NodeListError("an empty entry (two commas, or a comma at an end)")
            hosts += _expand_host(item)
        return hosts
    except NodeListError as e:
        raise NodeListError(f"cannot read the host list {nodelist!r}: {e}") from None


def first(nodelist: str) -> str:
    """The first host: where rank 0 runs (Slurm places task 0 on the allocation's first node)."""
    return expand(nodelist)[0]
