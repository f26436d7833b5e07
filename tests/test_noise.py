"""Unit tests for the privacy noise functions and the PrivateSender wrapper (single process)."""

import math

import pytest
import torch

from fedsea_hpc.privacy.noise import (
    PrivateSender,
    add_noise,
    clip_per_sample,
    gaussian_noise_like,
    privatize_gradient,
)
from fedsea_hpc.config import PAPER_NOISE_SIGMA, PrivacyConfig
from fedsea_hpc.transport.wire import Kind


class FakeChannel:
    """Records what would have been sent; answers receives from a canned tensor."""

    def __init__(self):
        self.sent: list[tuple[Kind, torch.Tensor, int]] = []
        self.counter = "the channel's counter"

    def send(self, kind, tensor, step, *, fused=False):
        self.sent.append((Kind(kind), tensor.clone(), step))
        self.fused = fused

    def isend(self, kind, tensor, step):
        self.send(kind, tensor, step)
        return "handle"

    def send_lengths(self, lengths, step):
        self.send(Kind.LENGTHS, lengths, step)

    def recv_gradient(self, step):
        return torch.full((2, 3), float(step))


def test_paper_sigma_is_its_mean_abs_noise_and_the_default_is_relative():
    # The paper's default: mean |eps| = 0.02; for a Gaussian E|eps| = sigma * sqrt(2 / pi).
    assert PAPER_NOISE_SIGMA == pytest.approx(0.025066, abs=1e-6)
    # Ours (chosen from the measured attack): 0.25 x each token's RMS.
    assert (PrivacyConfig().noise_mode, PrivacyConfig().noise_std) == ("relative", 0.25)


def test_noise_has_the_requested_distribution():
    # Prepare: the paper's sigma, whose mean |eps| must come out as its 0.02
    sigma = PAPER_NOISE_SIGMA
    h = torch.zeros(8, 128, 1024)  # ~1e6 elements
    # Execute
    eps = add_noise(h, sigma, torch.Generator().manual_seed(0))
    # Assert
    assert eps.std().item() == pytest.approx(sigma, rel=0.02)
    assert abs(eps.mean().item()) < 5 * sigma / math.sqrt(eps.numel())
    assert eps.abs().mean().item() == pytest.approx(0.02, rel=0.02)


def test_noise_is_fresh_each_call_and_reproducible_per_seed():
    h = torch.zeros(4, 16)
    g = torch.Generator().manual_seed(1)
    a, b = add_noise(h, 1.0, g), add_noise(h, 1.0, g)
    assert not torch.equal(a, b)
    again = add_noise(h, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, again)


def test_noise_keeps_dtype_and_rejects_bad_input():
    h = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert gaussian_noise_like(h, 0.1, None).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        gaussian_noise_like(h, -0.1, None)
    with pytest.raises(TypeError):
        gaussian_noise_like(torch.zeros(3, dtype=torch.int64), 0.1, None)


def test_add_noise_never_touches_the_autograd_graph():
    # Prepare
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 3)
    h = x @ w  # [B, H] with a grad_fn
    # Execute
    noised = add_noise(h, 0.5, torch.Generator().manual_seed(0))
    h.sum().backward()
    # Assert: the clean h backprops the clean value, the noised copy is outside the graph.
    assert noised.grad_fn is None and not noised.requires_grad
    assert torch.allclose(w.grad, x.sum(0, keepdim=True).t().expand(3, 4))
    assert not torch.equal(noised, h.detach())
    zero = add_noise(h, 0.0, None)
    assert zero.grad_fn is None and zero.data_ptr() == h.data_ptr()  # no copy when std is 0


def test_clip_per_sample():
    # Prepare: row norms 5, 0.3, 0 (rows of [B, T, H] = [3, 1, 2])
    g = torch.tensor([[[3.0, 4.0]], [[0.3, 0.0]], [[0.0, 0.0]]])
    # Execute
    clipped = clip_per_sample(g, 1.0)
    # Assert
    norms = clipped.flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(clipped[0], g[0] / 5, atol=1e-6)  # direction kept
    assert torch.equal(clipped[1:], g[1:])  # small rows bit-identical
    assert torch.equal(clip_per_sample(g, 0.0), g)  # <= 0 means off


def test_privatize_gradient_clips_then_noises():
    g = torch.full((2, 4, 8), 10.0)
    out = privatize_gradient(g, 1.0, 0.0, None)
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)
    noisy = privatize_gradient(g, 1.0, 0.1, torch.Generator().manual_seed(0))
    assert 0 < (noisy - out).abs().max() < 1.0


def test_private_sender_noises_activations_with_the_requested_sigma():
    # Prepare
    fake = FakeChannel()
    sender = PrivateSender(fake, noise_std=0.3, generator=torch.Generator().manual_seed(0))
    h = torch.randn(4, 8, 16, requires_grad=True)
    # Execute: two steps, plus a generic send() that must not bypass the noise
    sender.send_activation(h, step=0)
    sender.send_activation(h, step=1)
    sender.send(Kind.ACTIVATION, h, step=2)
    # Assert
    eps = torch.cat([(t - h.detach()).flatten() for _, t, _ in fake.sent]).double()
    assert [(k, s) for k, _, s in fake.sent] == [(Kind.ACTIVATION, i) for i in range(3)]
    assert not torch.equal(fake.sent[0][1], fake.sent[1][1])  # fresh noise each step
    assert eps.mean().item() == pytest.approx(0.0, abs=0.03)
    assert eps.std(unbiased=False).item() == pytest.approx(0.3, rel=0.05)
    assert h.grad_fn is None and h.requires_grad  # caller's tensor untouched


def test_private_sender_gradients_and_delegation():
    # Prepare
    fake = FakeChannel()
    sender = PrivateSender(
        fake, noise_std=0.1, grad_clip=1.0, grad_noise_std=0.01,
        generator=torch.Generator().manual_seed(0),
    )
    g = torch.full((2, 3, 4), 5.0)
    lengths = torch.tensor([3, 2])
    # Execute
    sender.send_gradient(g, step=7, fused=True)
    assert fake.fused  # the framing choice reaches the channel
    sender.send_lengths(lengths, step=7)
    handle = sender.isend(Kind.CONTROL, torch.tensor([1, 2]), step=7)
    # Assert: gradient clipped (norm ~1) plus noise; lengths and control pass through untouched
    (k0, sent_g, _), (k1, sent_len, _), (k2, sent_ctl, _) = fake.sent
    assert k0 is Kind.GRADIENT and sent_g.flatten(1).norm(dim=1).sub(1).abs().max() < 0.1
    assert k1 is Kind.LENGTHS and torch.equal(sent_len, lengths)
    assert k2 is Kind.CONTROL and torch.equal(sent_ctl, torch.tensor([1, 2])) and handle == "handle"
    assert torch.equal(sender.recv_gradient(step=3), torch.full((2, 3), 3.0))  # delegated
    assert sender.counter == "the channel's counter"


def test_private_sender_with_zero_noise_sends_the_clean_values():
    fake = FakeChannel()
    sender = PrivateSender(fake, noise_std=0.0, generator=torch.Generator())
    h = torch.randn(2, 3, 4)
    sender.send_activation(h, step=0)
    assert torch.equal(fake.sent[0][1], h)
    with pytest.raises(ValueError):
        PrivateSender(fake, noise_std=-1.0, generator=torch.Generator())


def test_relative_noise_is_scaled_by_each_tokens_rms():
    h = torch.randn(4, 32, 256) * torch.logspace(-2, 1, 32).view(1, 32, 1)  # tokens of very different size
    out = add_noise(h, 0.1, torch.Generator().manual_seed(0), relative=True)
    rms = h.square().mean(-1, keepdim=True).sqrt()
    z = (out - h) / (0.1 * rms)
    per_token = z.std(dim=(0, 2))  # every token position, small or large, gets noise-to-signal 0.1
    assert torch.allclose(per_token, torch.ones(32), atol=0.08), per_token


def test_noise_generator_is_private_unless_a_test_seed_is_given():
    from fedsea_hpc.components.links import noise_generator, noise_report
    from fedsea_hpc.config import PrivacyConfig

    draw = lambda g: torch.randn(1000, generator=g)  # noqa: E731
    # OS entropy: two generators for the same client and config never agree.
    assert not torch.equal(draw(noise_generator(-1, 0, torch.device("cpu"))),
                           draw(noise_generator(-1, 0, torch.device("cpu"))))
    # A test seed: reproducible per client, different across clients.
    a, b = noise_generator(5, 0, torch.device("cpu")), noise_generator(5, 0, torch.device("cpu"))
    assert torch.equal(draw(a), draw(b))
    assert not torch.equal(draw(noise_generator(5, 0, torch.device("cpu"))),
                           draw(noise_generator(5, 1, torch.device("cpu"))))
    assert noise_report(PrivacyConfig()) == {"noise_mode": "relative", "noise_std": PrivacyConfig().noise_std,
                                             "noise_seed": "os-entropy"}
    assert noise_report(PrivacyConfig(noise_seed=3))["noise_seed_test_only"] == 3


@pytest.mark.parametrize("override, key", [("privacy.noise_mode=loud", "privacy.noise_mode"),
                                           ("privacy.noise_seed=-2", "privacy.noise_seed"),
                                           ("privacy.noise_seed=1.5", "privacy.noise_seed"),
                                           ("debug.dump_wire_steps=-1", "debug.dump_wire_steps"),
                                           ("federated.secure_aggregation=sometimes", "federated.secure_aggregation"),
                                           ("debug.dump_aggregation_steps=-3", "debug.dump_aggregation_steps"),
                                           ("split.min_head_layers=0", "split.min_head_layers"),
                                           ("split.min_head_layers=true", "split.min_head_layers")])
def test_bad_privacy_settings_name_their_key(override, key):
    from fedsea_hpc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_min_head_layers_bounds_every_clients_split_point():
    from fedsea_hpc.config import ConfigError, load_config

    ok = load_config(None, ["split.min_head_layers=2", "split.head_layers=2"])
    assert ok.split.min_head_layers == 2
    with pytest.raises(ConfigError, match=r"split\.head_layers: p=1 is below split\.min_head_layers=2"):
        load_config(None, ["split.min_head_layers=2", "split.head_layers=1"])
    # Per-client split points: the one client below the bound is named.
    with pytest.raises(ConfigError, match=r"split\.per_client\[1\]: p=1 is below"):
        load_config(None, ["split.min_head_layers=2", "topology.clients=2", "split.per_client=[[2, 1], [1, 1]]"])


def test_min_tail_layers_floors_and_the_moved_key():
    from fedsea_hpc.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"split\.tail_layers: q=1 is below split\.min_tail_layers=2"):
        load_config(None, ["split.min_tail_layers=2"])
    with pytest.raises(ConfigError, match=r"split\.per_client\[0\]: q=2 is below split\.min_tail_layers=3"):
        load_config(None, ["split.min_tail_layers=3", "topology.clients=2", "split.per_client=[[1, 2], [1, 3]]"])
    with pytest.raises(ConfigError, match=r"split\.min_tail_layers: must be an integer >= 1, got 0"):
        load_config(None, ["split.min_tail_layers=0"])
    # Floors that leave the server nothing, once the model's depth is known.
    cfg = load_config(None, ["split.min_head_layers=3", "split.min_tail_layers=3", "split.head_layers=3",
                             "split.tail_layers=3"])
    with pytest.raises(ConfigError, match=r"split\.min_head_layers \+ split\.min_tail_layers: 6 leaves no block "
                                          r"for the server; must be < 6"):
        validate(cfg, num_layers=6)
    with pytest.raises(ConfigError, match=r"privacy\.min_head_layers: moved to split\.min_head_layers"):
        load_config(None, ["privacy.min_head_layers=2"])
