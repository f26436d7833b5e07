"""The inversion attack's pieces (fedsea_hpc.privacy.attack) on hand-made inputs and the tiny model.

The attacker trains on auxiliary text (client0 + client1 of the shipped corpus) and is scored on
another client's text (client2), as in benchmarks/privacy.py.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REPO
from fedsea_hpc.data.dataset import collate, encode_record, read_jsonl
from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, build_byte_tokenizer
from fedsea_hpc.model.loading import resolve_model
from fedsea_hpc.model.partition import build_part
from fedsea_hpc.privacy.attack import (DecoderInverter, PositionInverter, decode_rows, evaluate,
                                       hidden_states, length_mask, rouge_l_f1, token_accuracy,
                                       train_inverter)
from fedsea_hpc.privacy.noise import add_noise

DATA = REPO / "fedsea_hpc" / "data" / "tiny"
P = 1

# ------------------------------------------------------------------ metrics on hand-made inputs


def test_token_accuracy_counts_real_tokens_only():
    target = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
    pred = torch.tensor([[5, 9, 7, 0], [1, 0, 0, 0]])  # pads agree; must not count as hits
    lengths = torch.tensor([3, 1])
    assert token_accuracy(pred, target, lengths) == pytest.approx(2 / 4)
    pred_bad_pads = pred.clone()
    pred_bad_pads[0, 3] = pred_bad_pads[1, 1:] = 42  # pads disagree: same score
    assert token_accuracy(pred_bad_pads, target, lengths) == pytest.approx(2 / 4)
    assert token_accuracy(target, target, lengths) == 1.0


def test_rouge_l_f1_known_values():
    assert rouge_l_f1(["The cat sat on the mat."], ["The cat sat on the mat."]) == pytest.approx(1.0)
    # LCS of "the cat" in "the cat sat": P = 2/2, R = 2/3, F1 = 0.8; averaged with a 0-score pair.
    assert rouge_l_f1(["the cat", "dog"], ["the cat sat", "bird"]) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        rouge_l_f1(["a"], [])


def test_decode_rows_stops_at_length():
    tok = build_byte_tokenizer()
    ids = torch.tensor([list(b"hi!!"), list(b"yo!!")])
    assert decode_rows(tok, ids, torch.tensor([2, 4])) == ["hi", "yo!!"]


# ------------------------------------------------------------------ the tiny model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    source = resolve_model("tiny", tiny_vocab_size=TINY_VOCAB_SIZE, seed=0)
    source.config._attn_implementation = "sdpa"
    tok = build_byte_tokenizer()
    part = build_part(source, list(range(P)), embed=True, head=False, dtype=torch.float32)

    def data(files, n):
        ex = [encode_record(r, tok, 64) for f in files for r in read_jsonl(DATA / f)[:n]]
        batches = [collate(ex[i:i + 32], tok.pad_token_id) for i in range(0, len(ex), 32)]
        return [(hidden_states(part, b.input_ids, b.lengths, [P])[P], b.input_ids, b.lengths) for b in batches]

    aux = data(["client0.jsonl", "client1.jsonl"], 150)
    victim = data(["client2.jsonl"], 100)
    return source, tok, part, aux, victim


def aux_stream(aux, seed=0):
    """Endless random aux batches (h, ids, lengths)."""
    rng = np.random.default_rng(seed)
    while True:
        yield aux[rng.integers(len(aux))]


def flat(batches):
    h = torch.cat([h[length_mask(n, h.shape[1])] for h, _, n in batches])
    ids = torch.cat([i[length_mask(n, i.shape[1])] for _, i, n in batches])
    return h, ids


def attack_position(setup, sigma, relative, steps=10):
    source, tok, part, aux, victim = setup
    g = torch.Generator().manual_seed(1)

    def noise(h):
        return add_noise(h, sigma, g, relative=relative)

    inv = PositionInverter(part.model.embed_tokens.weight, width=32, generator=torch.Generator().manual_seed(0))
    inv.fit_ridge(*(lambda h, i: (noise(h), i))(*flat(aux)))
    train_inverter(inv, aux_stream(aux), steps=steps, lr=1e-4, noise=noise)
    noised = [(noise(h), ids, n) for h, ids, n in victim]
    return evaluate(inv, noised, tok)


def majority_baseline(setup):
    """Accuracy on the victim of always guessing the aux text's most frequent token."""
    _, _, _, aux, victim = setup
    top = Counter(flat(aux)[1].tolist()).most_common(1)[0][0]
    vids = flat(victim)[1]
    return float((vids == top).float().mean())


def test_hidden_states_are_part_a_outputs(setup):
    source, _, _, _, _ = setup
    a2 = build_part(source, [0, 1], embed=True, head=False, dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    lengths = torch.tensor([4, 2])
    hs = hidden_states(a2, ids, lengths, [2, 1])
    with torch.no_grad():
        h0 = a2.embed(ids)
        ctx = a2.context(h0, lengths)
        expect1 = a2.run_layers(h0, [0], ctx)
        expect2 = a2.run_layers(h0, [0, 1], ctx)
    torch.testing.assert_close(hs[1], expect1)
    torch.testing.assert_close(hs[2], expect2)


def test_inverters_return_logits_for_real_positions_only(setup):
    source, _, part, aux, _ = setup
    h, ids, lengths = aux[0]
    n, V = int(lengths.sum()), source.config.vocab_size
    assert PositionInverter(part.model.embed_tokens.weight)(h, lengths).shape == (n, V)
    L = source.config.num_hidden_layers
    dec = DecoderInverter(build_part(source, [L - 1], embed=False, head=True, dtype=torch.float32))
    assert dec(h, lengths).shape == (n, V)
    assert not dec.part.lm_head.weight.requires_grad


def test_clean_hidden_states_are_inverted_far_above_chance(setup):
    res = attack_position(setup, 0.0, False)
    base = majority_baseline(setup)
    assert res["token_accuracy"] > 0.9 > 3 * base, (res["token_accuracy"], base)
    assert res["rouge_l_f1"] > 0.7
    assert res["tokens"] == int(sum(n.sum() for _, _, n in setup[4]))


def test_strong_noise_drives_accuracy_down(setup):
    clean = attack_position(setup, 0.0, False)["token_accuracy"]
    noisy = attack_position(setup, 30.0, True)  # noise std = 30 x each token's RMS
    base = majority_baseline(setup)
    assert noisy["token_accuracy"] < base + 0.15, (noisy["token_accuracy"], base)
    assert noisy["token_accuracy"] < clean - 0.5
    assert noisy["rouge_l_f1"] < 0.2


def test_decoder_inverter_fine_tuning_improves_the_attack(setup):
    # The tiny model's random last block barely changes its input, so the untrained decoder
    # already inverts clean h_A; under noise (3 x RMS per token) fine-tuning must add to it.
    source, tok, _, aux, victim = setup
    L = source.config.num_hidden_layers
    dec = DecoderInverter(build_part(source, list(range(L - P, L)), embed=False, head=True, dtype=torch.float32))
    assert evaluate(dec, victim, tok)["token_accuracy"] > 0.9  # clean: inverted before training
    g = torch.Generator().manual_seed(1)

    def noise(h):
        return add_noise(h, 3.0, g, relative=True)

    noised = [(noise(h), ids, n) for h, ids, n in victim]
    before = evaluate(dec, noised, tok)["token_accuracy"]
    losses = train_inverter(dec, aux_stream(aux), steps=30, lr=3e-3, noise=noise)
    after = evaluate(dec, noised, tok)["token_accuracy"]
    assert losses[-1] < losses[0]
    assert after > before + 0.1, (before, after)
