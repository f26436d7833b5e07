"""Part A / B / C of the tiny Llama: which parameters each part owns, and that the split forward
and backward (as the client and server workers chain them) equal the unsplit HF model."""
from __future__ import annotations

import pytest
import torch

from fedsea_hpc.config import ConfigError, PeftConfig, load_config, validate
from fedsea_hpc.data.dataset import IGNORE_INDEX
from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE
from fedsea_hpc.model.loading import resolve_model
from fedsea_hpc.model.lora import apply_lora, trainable
from fedsea_hpc.model.masks import lengths_to_mask
from fedsea_hpc.model.names import layer_of, name_seed
from fedsea_hpc.model.partition import (PartModel, ServerSpans, build_part, client_layers, loss_sum, part_keys,
                                       server_layers)

L = 6
PEFT = PeftConfig(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def source():
    return resolve_model("tiny", tiny_vocab_size=TINY_VOCAB_SIZE, seed=0)


def own_params(part: PartModel) -> dict[str, torch.Tensor]:
    """Named parameters with tied ones listed once (named_parameters de-duplicates by identity)."""
    return dict(part.named_parameters())


# ------------------------------------------------------------------ ownership


def test_tiny_config_is_gqa(source):
    cfg = source.config
    assert cfg.num_hidden_layers == L
    assert cfg.num_attention_heads == 4
    assert cfg.num_key_value_heads == 2
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    part = build_part(source, [0], embed=False, head=False, dtype=torch.float32)
    attn = part.model.layers["0"].self_attn
    assert attn.q_proj.weight.shape == (4 * head_dim, cfg.hidden_size)
    assert attn.k_proj.weight.shape == (2 * head_dim, cfg.hidden_size)
    assert attn.v_proj.weight.shape == (2 * head_dim, cfg.hidden_size)


@pytest.mark.parametrize("p,q", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_client_part_owns_exactly_its_params(source, p, q):
    ids = client_layers(L, p, q)
    assert ids == list(range(p)) + list(range(L - q, L))
    part = build_part(source, ids, embed=True, head=True, dtype=torch.float32)
    names = own_params(part)
    layers = {layer_of(n) for n in names if layer_of(n) is not None}
    assert layers == set(ids)
    assert not layers & set(range(p, L - q)), "a middle block leaked into the client part"
    others = {n for n in names if layer_of(n) is None}
    assert others == {"model.embed_tokens.weight", "model.norm.weight"}  # lm_head is tied: listed once
    # The head is the embedding (same storage), not a copy.
    assert part.lm_head.weight is part.model.embed_tokens.weight
    assert part.lm_head.weight.data_ptr() == part.model.embed_tokens.weight.data_ptr()
    # Only meta-free, real tensors.
    assert not any(t.is_meta for t in part.state_dict().values())


@pytest.mark.parametrize("p,q", [(1, 1), (2, 1), (1, 3)])
def test_server_part_owns_only_middle_blocks(source, p, q):
    ids = server_layers(L, [(p, q)])
    assert ids == list(range(p, L - q))
    part = build_part(source, ids, embed=False, head=False, dtype=torch.float32)
    names = own_params(part)
    assert {layer_of(n) for n in names} == set(ids)
    assert not hasattr(part.model, "embed_tokens") and not hasattr(part.model, "norm")
    assert not hasattr(part, "lm_head")


def test_server_layers_is_union_of_spans():
    assert server_layers(L, [(1, 1), (2, 1), (1, 2)]) == [1, 2, 3, 4]
    assert server_layers(L, [(2, 2), (3, 1)]) == [2, 3, 4]


@pytest.mark.parametrize("p,q", [(1, 1), (2, 2)])
def test_parts_add_up_to_the_full_model(source, p, q):
    full = source.build_model()
    full_count = sum(t.numel() for t in full.parameters())  # tied embedding counted once
    client = build_part(source, client_layers(L, p, q), embed=True, head=True, dtype=torch.float32)
    server = build_part(source, server_layers(L, [(p, q)]), embed=False, head=False, dtype=torch.float32)
    split_count = sum(t.numel() for t in client.parameters()) + sum(t.numel() for t in server.parameters())
    assert split_count == full_count
    # And the keys a checkpoint must provide are exactly partitioned between the two.
    keys = source.keys()
    ck = set(part_keys(source.config, client_layers(L, p, q), embed=True, head=True, all_keys=keys))
    sk = set(part_keys(source.config, server_layers(L, [(p, q)]), embed=False, head=False, all_keys=keys))
    assert not ck & sk
    assert ck | sk | {"lm_head.weight"} == set(keys)
    # Same weights as the full model.
    full_sd = full.state_dict()
    for name, t in list(client.state_dict().items()) + list(server.state_dict().items()):
        if not name.startswith("model.rotary_emb"):
            assert torch.equal(t, full_sd[name]), name


# ------------------------------------------------------------------ split == unsplit


def _randomize_lora_b(model: torch.nn.Module) -> None:
    """LoRA B starts at 0 (no effect on the forward); give it the same seeded values by name on
    every side so the adapters do change the forward."""
    for name, prm in trainable(model):
        if "lora_B" in name:
            g = torch.Generator().manual_seed(name_seed(0, name))
            with torch.no_grad():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)


def _batch(vocab: int = 261):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 5, 12, 2])
    t = int(lengths.max())
    ids = torch.randint(0, vocab, (len(lengths), t), generator=g)
    mask = lengths_to_mask(lengths, t, "right")
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, 258))  # pad id of the byte tokenizer
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    return ids, labels, lengths, mask


def _reference(source):
    full = source.build_model()
    full.config._attn_implementation = "sdpa"
    model = apply_lora(full, PEFT, 0)
    _randomize_lora_b(model)
    model.train()
    return full, model


def _split(source, p, q):
    client = build_part(source, client_layers(L, p, q), embed=True, head=True, dtype=torch.float32)
    server = build_part(source, server_layers(L, [(p, q)]), embed=False, head=False, dtype=torch.float32)
    cm, sm = apply_lora(client, PEFT, 0), apply_lora(server, PEFT, 0)
    for m in (cm, sm):
        _randomize_lora_b(m)
        m.train()
    return client, server, cm, sm


@pytest.mark.parametrize("p,q", [(1, 1), (2, 3)])
def test_split_forward_backward_equals_hf(source, p, q):
    ids, labels, lengths, mask = _batch()
    # Prepare: the unsplit HF reference.
    _, ref = _reference(source)
    ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    ref_loss = loss_sum(ref_logits, labels)
    ref_loss.backward()
    ref_grads = {n: p_.grad.clone() for n, p_ in trainable(ref)}

    # Execute: the chain client A -> server B -> client C, with detached boundaries like the wire.
    client, server, cm, sm = _split(source, p, q)
    h0 = client.embed(ids)
    ctx = client.context(h0, lengths)
    h_a = client.run_layers(h0, range(p), ctx)
    x = h_a.detach().requires_grad_(True)
    h_b = server(x, lengths)
    y = h_b.detach().requires_grad_(True)
    out = client.run_layers(y, range(L - q, L), ctx)
    logits = client.head_logits(out)
    loss = loss_sum(logits, labels)
    loss.backward()
    h_b.backward(y.grad)
    h_a.backward(x.grad)

    # Assert: logits, loss and every adapter gradient match.
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    split_grads = {n: p_.grad for n, p_ in trainable(cm) + trainable(sm)}
    assert set(split_grads) == set(ref_grads)
    assert all(n.count("lora_") == 1 for n in split_grads)
    for n, g in ref_grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(split_grads[n], g, atol=1e-5, rtol=1e-5, msg=n)


def test_inactive_rows_pass_through_layers(source):
    """Clients with different spans share one server batch: a row skips the layers outside its span."""
    server = build_part(source, [1, 2, 3, 4], embed=False, head=False, dtype=torch.float32)
    apply_lora(server, PEFT, 0)
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 4, 6])
    x = torch.randn(3, 7, source.config.hidden_size, generator=g)
    # Row 0 uses all four blocks, row 1 only blocks 2-3, row 2 none of them.
    spans = [(1, 5), (2, 4), (5, 5)]
    active = {i: torch.tensor([lo <= i < hi for lo, hi in spans]) for i in [1, 2, 3, 4]}
    with torch.no_grad():
        out = server(x, lengths, active)
        for row, (lo, hi) in enumerate(spans):
            alone = x[row:row + 1]
            ctx = server.context(alone, lengths[row:row + 1])
            expect = server.run_layers(alone, range(lo, hi), ctx)
            n = int(lengths[row])
            torch.testing.assert_close(out[row, :n], expect[0, :n], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[2], x[2]), "a row outside every span must come back bit-identical"
        assert not torch.allclose(out[0, :7], x[0, :7])


def test_inactive_rows_get_no_gradient_from_skipped_layers(source):
    server = build_part(source, [1, 2], embed=False, head=False, dtype=torch.float32)
    model = apply_lora(server, PEFT, 0)
    _randomize_lora_b(model)
    x = torch.randn(2, 5, source.config.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
    lengths = torch.tensor([5, 5])
    # Only row 1 uses block 1; nobody uses block 2.
    active = {1: torch.tensor([False, True]), 2: torch.tensor([False, False])}
    out = server(x, lengths, active)
    out.sum().backward()
    assert torch.equal(x.grad[0], torch.ones_like(x.grad[0]))  # identity for row 0
    grads = {n: p_.grad for n, p_ in trainable(model)}
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".layers.2." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layers.1." in n)


def _count_rows(part: PartModel) -> list[tuple[int, int]]:
    """(block, rows) of every decoder-block call on ``part``, in call order."""
    calls = []
    for i in part.layer_ids:
        part.model.layers[str(i)].register_forward_pre_hook(
            lambda m, args, kw, i=i: calls.append((i, kw["position_ids"].shape[0])), with_kwargs=True)
    return calls


def test_server_computes_each_block_only_for_its_rows(source):
    """A mixed client-batch costs Σ_c rows_c × blocks_c on the server, not rows × union."""
    # Arrange: 3 clients with 2, 3 and 1 rows; union on the server is blocks 1..4.
    splits = [(1, 1), (2, 2), (3, 1)]  # server spans [1, 5), [2, 4), [3, 5)
    spans = ServerSpans.from_splits(L, splits)
    rows = [2, 3, 1]
    owners = [c for c, n in enumerate(rows) for _ in range(n)]
    server = build_part(source, list(spans.layer_ids), embed=False, head=False, dtype=torch.float32)
    model = apply_lora(server, PEFT, 0)
    _randomize_lora_b(model)
    calls = _count_rows(server)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([7, 5, 6, 7, 3, 4])
    x = torch.randn(6, 7, source.config.hidden_size, generator=g, requires_grad=True)
    # Act
    out = server(x, lengths, spans.active_rows(owners, x.device))
    out[:, :3].sum().backward()
    # Assert: block calls x rows is exactly each client's rows times its own blocks, in block order.
    assert [i for i, _ in calls] == [1, 2, 3, 4]
    expect = sum(n * (L - q - p) for n, (p, q) in zip(rows, splits))
    assert sum(n for _, n in calls) == expect == 2 * 4 + 3 * 2 + 1 * 2
    assert expect < len(owners) * len(spans.layer_ids)
    # ... and every row equals its client's own span run alone, value and input gradient.
    for r, c in enumerate(owners):
        lo, hi = spans.spans[c]
        alone = x[r:r + 1].detach().requires_grad_(True)
        ref = server.run_layers(alone, range(lo, hi), server.context(alone, lengths[r:r + 1]))
        n = int(lengths[r])
        torch.testing.assert_close(out[r, :n], ref[0, :n], atol=1e-5, rtol=1e-5)
        ref[:, :3].sum().backward()
        torch.testing.assert_close(x.grad[r], alone.grad[0], atol=1e-5, rtol=1e-5)


def test_a_block_with_no_rows_runs_one_dummy_row_and_changes_nothing(source):
    """ZeRO lockstep: a block no local row uses is still called (once, one row) and gets a zero gradient."""
    spans = ServerSpans.from_splits(L, [(1, 1), (3, 1)])  # blocks 1..4; client 1 uses only [3, 5)
    server = build_part(source, list(spans.layer_ids), embed=False, head=False, dtype=torch.float32)
    model = apply_lora(server, PEFT, 0)
    _randomize_lora_b(model)
    calls = _count_rows(server)
    x = torch.randn(2, 5, source.config.hidden_size, generator=torch.Generator().manual_seed(6), requires_grad=True)
    lengths = torch.tensor([5, 4])
    out = server(x, lengths, spans.active_rows([1, 1], x.device))  # this rank serves client 1 only
    out.sum().backward()
    assert calls == [(1, 1), (2, 1), (3, 2), (4, 2)]  # blocks 1, 2: the dummy row
    ref = server.run_layers(x, [3, 4], server.context(x, lengths))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    grads = {n: p_.grad for n, p_ in trainable(model)}
    for n, g in grads.items():
        if ".layers.1." in n or ".layers.2." in n:
            assert g is not None and torch.count_nonzero(g) == 0, n  # present (buckets line up) and zero
        else:
            assert g is not None and g.abs().sum() > 0, n


def test_every_row_mix_calls_the_same_modules_in_the_same_order(source):
    """ZeRO-3 traces module calls and asserts every rank made the same ones: two server ranks
    with different client mixes (one full span, one partial with dummy rows) must agree."""
    spans = ServerSpans.from_splits(L, [(1, 1), (2, 1), (1, 2)])
    server = build_part(source, list(spans.layer_ids), embed=False, head=False, dtype=torch.float32)
    order: list[str] = []
    for name, m in server.named_modules():
        if name:
            m.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
    x = torch.randn(3, 5, source.config.hidden_size, generator=torch.Generator().manual_seed(7))
    lengths = torch.tensor([5, 4, 5])
    seen = []
    for owners in ([0, 2, 0], [1, 1, 1], [2, 1, 0]):
        order.clear()
        server(x, lengths, spans.active_rows(owners, x.device))
        seen.append(list(order))
    assert seen[0] == seen[1] == seen[2]
    assert seen[0].count("model.rotary_emb") == 1


# ------------------------------------------------------------------ split-point validation


@pytest.mark.parametrize("overrides", [
    ["split.head_layers=0"],
    ["split.tail_layers=0"],
    ["split.head_layers=3", "split.tail_layers=3"],
    ["split.head_layers=5", "split.tail_layers=1"],
    ["split.head_layers=4", "split.tail_layers=4"],
])
def test_bad_split_points_name_split_keys(overrides):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=r"^split\.head_layers"):
        validate(cfg, num_layers=L)


@pytest.mark.parametrize("per_client", ["[[1,1],[0,1]]", "[[1,1],[3,3]]", "[[1,1]]", "[[1,1],[1]]"])
def test_bad_per_client_split_names_split_per_client(per_client):
    with pytest.raises(ConfigError, match=r"^split\.per_client"):
        cfg = load_config(None, [f"split.per_client={per_client}"])
        validate(cfg, num_layers=L)


def test_good_split_points_validate():
    cfg = load_config(None, ["split.head_layers=2", "split.tail_layers=3"])
    validate(cfg, num_layers=L)
    cfg = load_config(None, ["topology.clients=3", "split.per_client=[[1,1],[2,1],[1,2]]"])
    validate(cfg, num_layers=L)
    assert [cfg.split_for(c) for c in range(3)] == [(1, 1), (2, 1), (1, 2)]
