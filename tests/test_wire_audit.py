"""What actually leaves a client, captured on the server side of real multi-rank runs.

The server dumps every tensor it received (``debug.dump_wire_steps``). The test knows nothing of
the clients' noise seeds (they come from OS entropy on each client): it recomputes the clean
``h_A`` itself from the public tiny model and each client's data, and audits received − clean.
``train.lr`` is tiny so that Part A is, to ~1e-12, the same at step 1 as at step 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import check_ok, run_fedsea
from fedsea_hpc.config import load_config
from fedsea_hpc.data.dataset import ClientData
from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, build_byte_tokenizer
from fedsea_hpc.model.loading import resolve_model
from fedsea_hpc.model.partition import build_part

pytestmark = pytest.mark.multirank
SIGMA, RELATIVE = 0.05, 0.5
STEPS = 2


def _run(root: Path, name: str, args: list[str]) -> Path:
    d = root / name
    check_ok(run_fedsea([f"run.output_dir={d}", f"train.steps={STEPS}", "train.lr=1e-12",
                         f"debug.dump_wire_steps={STEPS}", *args], n=3))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    return {"absolute": _run(root, "absolute", ["privacy.noise_mode=absolute", f"privacy.noise_std={SIGMA}"]),
            "relative": _run(root, "relative", ["privacy.noise_mode=relative", f"privacy.noise_std={RELATIVE}"])}


def received(out: Path, step: int) -> dict[str, torch.Tensor]:
    return {p.stem: torch.load(p) for p in (out / "wire" / f"step{step}").glob("*.pt")}


def batches(client: int) -> list:
    cfg = load_config(None, [])
    data = ClientData(cfg.data.train_files, client, cfg.topology.clients, build_byte_tokenizer(),
                      cfg.train.seq_len, cfg.run.seed)
    it = data.batches(cfg.train.micro_batch_size)
    return [next(it) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def clean() -> dict[tuple[int, int], torch.Tensor]:
    """h_A as client c computes it at step s, recomputed here from the public model, its real
    tokens only: [sum(lengths), H] (row by row, in position order; pads never cross)."""
    source = resolve_model("tiny", tiny_vocab_size=TINY_VOCAB_SIZE, seed=0)
    source.config._attn_implementation = "sdpa"
    part = build_part(source, [0], embed=True, head=False, dtype=torch.float32)  # Part A: block 0
    out = {}
    with torch.no_grad():
        for c in (0, 1):
            for s, b in enumerate(batches(c)):
                h0 = part.embed(b.input_ids)
                h = part.run_layers(h0, [0], part.context(h0, b.lengths))
                out[c, s] = h[_real(b)]
    return out


def _real(batch) -> torch.Tensor:
    """[B, T] bool: the real (unpadded) positions of a right-padded batch."""
    return torch.arange(batch.input_ids.shape[1]).unsqueeze(0) < batch.lengths.unsqueeze(1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    k = min(a.numel(), b.numel())
    a, b = a.flatten()[:k].double(), b.flatten()[:k].double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]), k


def test_only_lengths_activations_and_gradients_arrive(runs):
    # Prepare / Execute: the default topology (2 clients, 1 server), first step.
    got = received(runs["absolute"], 0)
    # Assert: per client exactly three tensors; the only integers are the per-sample lengths, and
    # the hidden states and gradients hold the real tokens only, none of the batch's padding.
    assert sorted(got) == sorted(f"client{c}_{k}" for c in (0, 1) for k in ("activation", "gradient", "lengths"))
    for c in (0, 1):
        batch = batches(c)[0]
        real = int(batch.lengths.sum())
        assert real < batch.input_ids.numel()  # the batch has padding to leave out
        assert torch.equal(got[f"client{c}_lengths"], batch.lengths)  # [B] int64, never a [B, T, T] mask
        assert got[f"client{c}_activation"].shape == (real, 64)
        assert got[f"client{c}_activation"].dtype == torch.float32
        assert got[f"client{c}_gradient"].shape == (real, 64)


def test_sent_hidden_states_are_not_embeddings_or_ids(runs, clean):
    source = resolve_model("tiny", tiny_vocab_size=TINY_VOCAB_SIZE, seed=0)
    emb = source.load_tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    for c in (0, 1):
        batch = batches(c)[0]
        sent = received(runs["absolute"], 0)[f"client{c}_activation"]
        # Part A ran at least one block: what crosses is not the embedding lookup of the ids.
        lookup = emb[batch.input_ids][_real(batch)]
        assert ((clean[c, 0] - lookup).norm() / lookup.norm()).item() > 0.1
        assert ((sent - lookup).norm() / lookup.norm()).item() > 0.1
        assert not torch.equal(sent.round(), sent)  # not integer-valued: no ids smuggled as floats


def test_received_noise_has_the_configured_statistics_without_knowing_the_seed(runs, clean):
    eps = {(c, s): (received(runs["absolute"], s)[f"client{c}_activation"] - clean[c, s]).double()
           for c in (0, 1) for s in range(STEPS)}
    for e in eps.values():
        n = e.numel()
        assert n > 10_000  # real tokens only: ~300 tokens x 64 per client and step
        assert abs(e.std().item() - SIGMA) < 0.03 * SIGMA
        assert abs(e.mean().item()) < 5 * SIGMA / n ** 0.5
        # The paper states its noise level as a mean absolute value: E|eps| = sigma * sqrt(2/pi).
        assert abs(e.abs().mean().item() - SIGMA * (2 / torch.pi) ** 0.5) < 0.03 * SIGMA
    # Fresh and independent: across steps of one client, and across clients at one step.
    for a, b in (((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 0), (1, 0)), ((0, 1), (1, 1))):
        r, k = _corr(eps[a], eps[b])
        assert abs(r) < 5 / k ** 0.5, (a, b, r)


def test_relative_noise_scales_with_each_tokens_rms(runs, clean):
    for c in (0, 1):
        for s in range(STEPS):
            h = clean[c, s].double()
            rms = h.square().mean(-1, keepdim=True).sqrt()  # [tokens, 1]
            z = (received(runs["relative"], s)[f"client{c}_activation"] - h) / (RELATIVE * rms)
            assert abs(z.std().item() - 1.0) < 0.03
            assert abs(z.mean().item()) < 5 / z.numel() ** 0.5


def test_summary_says_the_noise_came_from_os_entropy(runs):
    for mode, out in runs.items():
        s = json.loads((out / "summary.json").read_text())
        assert s["noise_seed"] == "os-entropy" and "noise_seed_test_only" not in s
        assert s["noise_mode"] == mode
