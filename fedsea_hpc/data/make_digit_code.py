"""The "digit code" task: a small instruction skill a base model cannot know, checkable exactly.

Each record asks to encode a number with a fixed secret code (one letter per digit) and answers
with the letters, space-separated::

    {"prompt": "Encode 4071 with the digit code.\\nCode:", "response": " m q v w"}

Split **non-IID** over 3 clients: client 0 sees only numbers made of the digits 0-3, client 1 of
4-6, client 2 of 7-9. Each client's eval file holds held-out numbers of its own slice, so the
union of the eval sets (the shared eval set) covers every digit, while a client training alone
never sees 6 or 7 of the 10. Deterministic from ``--seed``.

    python -m fedsea_hpc.data.make_digit_code --out DIR [--train 300] [--eval 40] [--seed 0]

writes ``DIR/client<i>_train.jsonl`` and ``DIR/client<i>_eval.jsonl`` for i = 0, 1, 2.
"""
from __future__ import annotations

import argparse
import json
import os
import random

CODE = "qwzkmprvxt"  # digit d is written CODE[d]
SLICES = ("0123", "456", "789")  # the digits each client's numbers are made of


def encode(number: str) -> str:
    return " " + " ".join(CODE[int(d)] for d in number)


def record(number: str) -> dict:
    return {"prompt": f"Encode {number} with the digit code.\nCode:", "response": encode(number)}


def numbers(digits: str, count: int, rng: random.Random, taken: set) -> list[str]:
    """``count`` distinct numbers of 3-6 digits drawn from ``digits`` (no leading zero), none in ``taken``."""
    out = []
    while len(out) < count:
        n = rng.choice(digits.replace("0", "") or digits) + "".join(rng.choice(digits) for _ in range(rng.randint(2, 5)))
        if n not in taken:
            taken.add(n)
            out.append(n)
    return out


def make(out_dir: str, train: int = 300, eval_: int = 40, seed: int = 0) -> list[str]:
    """Write the files; returns their paths (train files, then eval files)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    paths = {"train": [], "eval": []}
    for c, digits in enumerate(SLICES):
        taken: set = set()
        for part, count in (("eval", eval_), ("train", train)):  # eval first: never trained on (distinct numbers)
            path = os.path.join(out_dir, f"client{c}_{part}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(record(n)) + "\n" for n in numbers(digits, count, rng, taken))
            paths[part].append(path)
    return paths["train"] + paths["eval"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=300, help="training records per client")
    ap.add_argument("--eval", type=int, default=40, help="eval records per client")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for p in make(a.out, a.train, a.eval, a.seed):
        print(p)


if __name__ == "__main__":
    main()
