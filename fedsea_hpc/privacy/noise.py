"""FedSEA's "Secure" part: Gaussian noise on what leaves a rank, never on the local graph.

The client adds fresh noise ε ~ N(0, σ²) to the hidden states h_A it sends (h̃ = h + ε) every
step; optionally it clips and noises the gradient it returns. The pure functions below do the
math; ``PrivateSender`` is a thin wrapper around a transport ``Channel`` that applies them to
outgoing activations/gradients (privacy wraps the transport, it is not woven into it).

The paper states its default noise, 0.02, as the mean absolute value of ε; for a Gaussian
E|ε| = σ·sqrt(2/π), so that default is σ = 0.02·sqrt(π/2) ≈ 0.0251 (``config.PAPER_NOISE_SIGMA``,
the default of ``privacy.noise_std``).
"""

from __future__ import annotations

import torch

from fedsea_hpc.transport.wire import Kind


def gaussian_noise_like(
    t: torch.Tensor, std: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Fresh N(0, std²) noise with the shape, dtype and device of ``t``.

    Parameters
    ----------
    t : torch.Tensor
        Floating tensor of any shape, e.g. ``[B, T, H]``.
    std : float
        σ, >= 0.
    generator : torch.Generator or None
        On ``t``'s device; a seeded one makes runs reproducible.

    Returns
    -------
    torch.Tensor
        Same shape/dtype/device as ``t``, no grad.
    """
    if std < 0:
        raise ValueError(f"noise std {std} is negative")
    if not t.is_floating_point():
        raise TypeError(f"noise needs a floating tensor, got {t.dtype}")
    eps = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    return eps.mul_(std)


def add_noise(h: torch.Tensor, std: float, generator: torch.Generator | None, *,
              relative: bool = False) -> torch.Tensor:
    """Return ``h.detach() + ε``; the caller's autograd graph is never touched.

    The client keeps backpropagating through its clean ``h``; only the copy it sends is noised.

    Parameters
    ----------
    h : torch.Tensor
        ``[B, T, H]`` (any shape), may require grad.
    std : float
        σ; 0 returns ``h.detach()`` (a view, no copy).
    relative : bool
        Scale σ per vector of the last dim (per token of ``[B, T, H]``) by that vector's RMS,
        ``sqrt(mean(h²))``: the noise-to-signal ratio is then ``std`` everywhere.

    Returns
    -------
    torch.Tensor
        Same shape as ``h``, ``grad_fn is None``.
    """
    if std == 0:
        return h.detach()
    eps = gaussian_noise_like(h, std, generator)
    if relative:
        rms = h.detach().float().square().mean(-1, keepdim=True).sqrt()  # [..., 1]
        eps = eps.mul_(rms.to(eps.dtype))
    return h.detach() + eps


def clip_per_sample(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample so its L2 norm over all non-batch dims is at most ``max_norm``.

    Parameters
    ----------
    g : torch.Tensor
        ``[B, ...]`` e.g. dL/dh ``[B, T, H]``.
    max_norm : float
        Bound per sample; ``<= 0`` disables clipping.

    Returns
    -------
    torch.Tensor
        Same shape/dtype, detached. Rows already within the bound are multiplied by exactly 1.
    """
    g = g.detach()
    if max_norm <= 0:
        return g
    if g.dim() < 1:
        raise ValueError("clip_per_sample needs a batch dim, got a scalar")
    # Norms in float32 at least: bf16 sums over T*H elements lose too much precision.
    norms = g.reshape(g.shape[0], -1).to(torch.promote_types(g.dtype, torch.float32)).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # [B]
    return g * scale.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))


def privatize_gradient(
    g: torch.Tensor, clip: float, std: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Clip per sample (``clip <= 0``: off) then add N(0, std²) noise. ``g``: ``[B, ...]``."""
    return add_noise(clip_per_sample(g, clip), std, generator)


class PrivateSender:
    """Wrap a channel so activations and gradients are noised before they are sent.

    Parameters
    ----------
    channel : Channel-like
        Anything with ``send(kind, tensor, step)`` / ``isend`` and the ``recv_*`` methods.
    noise_std : float
        σ of the activation noise (the paper's mean |ε| m is σ = m·sqrt(π/2)); with
        ``relative`` the noise-to-signal ratio per token.
    relative : bool
        ``privacy.noise_mode == "relative"`` (see :func:`add_noise`).
    grad_clip : float
        Per-sample L2 clip of sent gradients; 0 = off.
    grad_noise_std : float
        σ of the gradient noise; 0 = off.
    generator : torch.Generator
        On the device of the tensors being sent.

    Notes
    -----
    ``send``/``isend`` are overridden too, so a generic ``send(Kind.ACTIVATION, ...)`` cannot
    bypass the noise; every other attribute (``recv_*``, ``send_lengths``, ``counter`` ...)
    comes from the wrapped channel.
    """

    def __init__(
        self,
        channel,
        *,
        noise_std: float,
        grad_clip: float = 0.0,
        grad_noise_std: float = 0.0,
        generator: torch.Generator,
        relative: bool = False,
    ):
        if noise_std < 0 or grad_noise_std < 0:
            raise ValueError(f"noise std must be >= 0, got {noise_std}, {grad_noise_std}")
        self.channel = channel
        self.noise_std = noise_std
        self.grad_clip = grad_clip
        self.grad_noise_std = grad_noise_std
        self.generator = generator
        self.relative = relative

    def __getattr__(self, name: str):
        # Only called for attributes not found on the wrapper: delegate to the channel.
        if name == "channel":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.channel, name)

    def privatize(self, kind: Kind, tensor: torch.Tensor) -> torch.Tensor:
        """What would be sent for ``tensor``: noised/clipped for activations/gradients only."""
        if kind == Kind.ACTIVATION:
            return add_noise(tensor, self.noise_std, self.generator, relative=self.relative)
        if kind == Kind.GRADIENT:
            return privatize_gradient(tensor, self.grad_clip, self.grad_noise_std, self.generator)
        return tensor

    def send(self, kind: Kind, tensor: torch.Tensor, step: int, *, fused: bool = False) -> None:
        """Send through the channel after ``privatize``."""
        self.channel.send(kind, self.privatize(kind, tensor), step, fused=fused)

    def isend(self, kind: Kind, tensor: torch.Tensor, step: int):
        """Async send after ``privatize``; returns the channel's handle."""
        return self.channel.isend(kind, self.privatize(kind, tensor), step)

    def send_activation(self, h: torch.Tensor, step: int, *, fused: bool = False) -> None:
        """Send ``h + ε`` for hidden states ``[B, T, H]``; ``h``'s graph is untouched."""
        self.send(Kind.ACTIVATION, h, step, fused=fused)

    def send_gradient(self, g: torch.Tensor, step: int, *, fused: bool = False) -> None:
        """Send the clipped and noised gradient ``[B, T, H]``."""
        self.send(Kind.GRADIENT, g, step, fused=fused)
