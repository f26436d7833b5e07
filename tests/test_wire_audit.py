"""What actually leaves a client, captured on the server side of a real multi-rank run.

Two 1-step runs of the real entry point differ only in ``privacy.noise_std``; the server dumps
every tensor it received (``debug.dump_wire``). Their difference is exactly the noise the
client added, so its statistics are measured on the received bytes, not on a mock.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import check_ok, run_fedsea
from fedsea_hpc.config import load_config
from fedsea_hpc.data.dataset import ClientData
from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, build_byte_tokenizer
from fedsea_hpc.model.loading import resolve_model

pytestmark = pytest.mark.multirank
SIGMA = 0.05


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    out = {}
    for name, std in (("noisy", SIGMA), ("clean", 0.0)):
        d = tmp_path_factory.mktemp(name)
        check_ok(run_fedsea([f"run.output_dir={d}", "train.steps=1", f"privacy.noise_std={std}",
                             "debug.dump_wire=true"], n=3))
        out[name] = {p.stem: torch.load(p) for p in (Path(d) / "wire").glob("*.pt")}
    return out


def _first_batch(client: int):
    cfg = load_config(None, [])
    data = ClientData(cfg.data.train_files, client, cfg.topology.clients, build_byte_tokenizer(),
                      cfg.train.seq_len, cfg.run.seed)
    return next(data.batches(cfg.train.micro_batch_size))


def test_only_lengths_activations_and_gradients_arrive(dumps):
    # Prepare / Execute: the default topology (2 clients, 1 server), first step.
    got = dumps["noisy"]
    # Assert: per client exactly three tensors; the only integers are the per-sample lengths.
    assert sorted(got) == sorted(f"client{c}_{k}" for c in (0, 1) for k in ("activation", "gradient", "lengths"))
    for c in (0, 1):
        batch = _first_batch(c)
        b, t = batch.input_ids.shape
        assert torch.equal(got[f"client{c}_lengths"], batch.lengths)  # [B] int64, never a [B, T, T] mask
        assert got[f"client{c}_activation"].shape == (b, t, 64)
        assert got[f"client{c}_activation"].dtype == torch.float32
        assert got[f"client{c}_gradient"].shape == (b, t, 64)


def test_sent_hidden_states_are_not_embeddings_or_ids(dumps):
    source = resolve_model("tiny", tiny_vocab_size=TINY_VOCAB_SIZE, seed=0)
    emb = source.load_tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    for c in (0, 1):
        batch = _first_batch(c)
        clean = dumps["clean"][f"client{c}_activation"]
        # Part A ran at least one block: what crosses is not the embedding lookup of the ids.
        lookup = emb[batch.input_ids]
        assert ((clean - lookup).norm() / lookup.norm()).item() > 0.1
        assert not torch.equal(clean.round(), clean)  # not integer-valued: no ids smuggled as floats


def test_received_noise_has_the_configured_statistics(dumps):
    for c in (0, 1):
        eps = (dumps["noisy"][f"client{c}_activation"] - dumps["clean"][f"client{c}_activation"]).double()
        n = eps.numel()
        assert n > 20_000
        assert abs(eps.std().item() - SIGMA) < 0.03 * SIGMA
        assert abs(eps.mean().item()) < 5 * SIGMA / n ** 0.5
        # The paper states its noise level as a mean absolute value: E|eps| = sigma * sqrt(2/pi).
        assert abs(eps.abs().mean().item() - SIGMA * (2 / torch.pi) ** 0.5) < 0.03 * SIGMA
    # Fresh noise per client: the two clients' noise is not the same draw.
    e0 = dumps["noisy"]["client0_activation"] - dumps["clean"]["client0_activation"]
    e1 = dumps["noisy"]["client1_activation"] - dumps["clean"]["client1_activation"]
    k = min(e0.numel(), e1.numel())
    assert not torch.allclose(e0.flatten()[:k], e1.flatten()[:k])

