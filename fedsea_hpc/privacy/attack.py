"""Inversion attack by a curious server: what does the noise on ``h_A`` protect?

Threat model (measured by ``benchmarks/privacy.py``). A server rank receives ``h̃ = h_A + ε``
``[B, T, H]`` and the per-sample lengths from a client. It knows the public base model (every
pretrained weight), the partition point ``p`` and the noise setting (σ and its mode; it could
estimate them from the wire anyway). It computes ``h_A`` itself on *auxiliary public text*, noises
it the same way, and trains an *inverter* mapping ``h̃`` back to the input ids at the same position
(not shifted). It then applies the inverter to a victim client's text, which it never trained on.

Two inverters, both called as ``inverter(h [B, T, H], lengths [B]) -> logits [N, V]`` where N is
the number of real (non-pad) positions in row-major order (see :func:`length_mask`):

- :class:`PositionInverter`: each position on its own. A ridge regression from the standardised
  hidden vector to the token's input embedding (closed form, :meth:`PositionInverter.fit_ridge`),
  optionally plus a residual MLP, decoded against the public embedding matrix as
  ``logits_v = τ (2 u·e_v − |e_v|²) + b_v`` (nearest embedding at init), then fine-tuned with
  cross-entropy by :func:`train_inverter`.
- :class:`DecoderInverter`: FedSEA's decoder attack: the model's own last ``p`` blocks + final
  norm + LM head (a :class:`~fedsea_hpc.model.partition.PartModel` with ``head=True``), run
  causally on ``h̃`` and fine-tuned to predict the input id at each position.

Metrics: :func:`token_accuracy` (positional, real tokens only) and :func:`rouge_l_f1` (ROUGE-L F1
of the decoded text, from the ``rouge-score`` package).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsea_hpc.model.masks import lengths_to_mask

# ------------------------------------------------------------------------------------ metrics


def length_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, T]`` bool, True on the first ``lengths[b]`` positions of row b (right padding)."""
    return lengths_to_mask(lengths, seq_len, "right").bool()


def token_accuracy(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> float:
    """Fraction of real positions where ``pred == target``; pads never count.

    Parameters
    ----------
    pred, target : LongTensor ``[B, T]``
        Predicted and true ids, right-padded (pad values are ignored, whatever they are).
    lengths : LongTensor ``[B]``
        Real tokens per row.

    Returns
    -------
    float
        In [0, 1]; NaN when there is no real token.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} differ")
    mask = length_mask(lengths.to(pred.device), pred.shape[1])
    n = int(mask.sum())
    return float((pred == target)[mask].sum()) / n if n else float("nan")


def decode_rows(tokenizer, ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Text of each row's first ``lengths[b]`` ids of ``ids`` ``[B, T]`` (special tokens dropped)."""
    return [tokenizer.decode(ids[b, : int(n)].tolist(), skip_special_tokens=True)
            for b, n in enumerate(lengths.tolist())]


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs (``rouge_score``'s default word tokenizer, no stemming).

    1.0 for identical texts, 0.0 for texts without a common word; a pair where either side has no
    word scores 0. Returns NaN for no pairs.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # score(target, prediction): the reference comes first.
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


# ------------------------------------------------------------------------------------ h_A


@torch.no_grad()
def hidden_states(part, ids: torch.Tensor, lengths: torch.Tensor, ps: Iterable[int]) -> dict[int, torch.Tensor]:
    """Clean ``h_A`` after ``p`` blocks, for several ``p`` in one pass, as a client computes it.

    Parameters
    ----------
    part : PartModel
        With the embedding and at least blocks ``0 .. max(ps) - 1`` (e.g. Part A for the largest
        p, or the whole model).
    ids, lengths : LongTensor ``[B, T]`` (right-padded), ``[B]``

    Returns
    -------
    dict
        ``{p: h [B, T, H]}`` (float, detached); ``h`` of ``p = 0`` is the embedding output.
    """
    ps = sorted(set(ps))
    h = part.embed(ids)
    ctx = part.context(h, lengths)
    out, done = {}, 0
    for p in ps:
        h = part.run_layers(h, list(range(done, p)), ctx)
        out[p], done = h, p
    return out


# ------------------------------------------------------------------------------------ inverters


class PositionInverter(nn.Module):
    """Per-position inverter: ``h_t [H] -> logits over the vocabulary [V]``, no context.

    ``x = (h - μ) / s`` (per-dimension statistics of the attacker's noised auxiliary data),
    ``u = A x + c`` (+ ``W2 gelu(W1 x)`` when ``width > 0``), then
    ``logits_v = τ (2 u·e_v − |e_v|²) + b_v`` against the public embedding matrix ``E`` ``[V, H]``
    (equivalently ``−τ |u − e_v|²`` up to a per-position constant: nearest embedding).

    Parameters
    ----------
    embedding : Tensor ``[V, H]``
        The public model's input embedding (``model.embed_tokens.weight``).
    width : int
        Hidden width of the residual MLP; 0 gives a purely linear map from ``x`` to ``u``.
    train_embedding : bool
        Fine-tune ``E`` too (costly for large V); default frozen (a buffer).
    generator : torch.Generator, optional
        Initialises ``W1`` (``W2`` starts at zero, so the MLP starts as a no-op).
    """

    def __init__(self, embedding: torch.Tensor, *, width: int = 0, train_embedding: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        V, H = embedding.shape
        E = embedding.detach().float().clone()
        if train_embedding:
            self.E = nn.Parameter(E)
        else:
            self.register_buffer("E", E)
        self.register_buffer("mu", torch.zeros(H))
        self.register_buffer("scale", torch.ones(H))
        self.A = nn.Parameter(torch.eye(H))
        self.c = nn.Parameter(torch.zeros(H))
        self.log_tau = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(V))
        self.width = width
        if width > 0:
            self.W1 = nn.Parameter(torch.randn(width, H, generator=generator) / math.sqrt(H))
            self.W2 = nn.Parameter(torch.zeros(H, width))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` hidden vectors -> ``[N, H]`` estimates ``u`` of the input embeddings."""
        x = (h.float() - self.mu) / self.scale
        u = F.linear(x, self.A, self.c)
        if self.width > 0:
            u = u + F.linear(F.gelu(F.linear(x, self.W1)), self.W2)
        return u

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[N, V]`` unscaled scores ``2 u·e_v − |e_v|²``."""
        return 2 * F.linear(u, self.E) - self.E.square().sum(-1)

    def token_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` hidden vectors (any positions) -> ``[N, V]`` logits."""
        return self.log_tau.exp() * self.scores(self.features(h)) + self.bias

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``h`` ``[B, T, H]``, ``lengths`` ``[B]`` -> logits ``[N, V]`` of the real positions."""
        return self.token_logits(h[length_mask(lengths.to(h.device), h.shape[1])])

    @torch.no_grad()
    def fit_ridge(self, h: torch.Tensor, ids: torch.Tensor, *, ridge: float = 1e-2,
                  calibrate_tokens: int = 512) -> None:
        """Closed-form start: standardise, regress ``h`` onto ``E[ids]``, pick τ.

        Parameters
        ----------
        h : Tensor ``[N, H]``
            (Noised) hidden vectors of real auxiliary tokens.
        ids : LongTensor ``[N]``
            Their input ids.
        ridge : float
            L2 penalty relative to N (the standardised Gram matrix has diagonal ≈ N).
        calibrate_tokens : int
            τ is chosen on the first this-many tokens from a log grid (minimum cross-entropy);
            ``b`` stays 0 and the MLP stays a no-op.
        """
        h = h.float()
        self.mu.copy_(h.mean(0))
        self.scale.copy_(h.std(0).clamp_min(1e-6))
        x = (h - self.mu) / self.scale  # [N, H]
        y = self.E[ids].float()  # [N, H]
        y_mean = y.mean(0)
        n, H = x.shape
        gram = x.T @ x + ridge * n * torch.eye(H, device=x.device, dtype=x.dtype)
        W = torch.linalg.solve(gram, x.T @ (y - y_mean))  # [H, H]: u = x W + y_mean
        self.A.copy_(W.T)
        self.c.copy_(y_mean)
        s = self.scores(self.features(h[:calibrate_tokens]))  # [n, V]
        s = s - s.max(-1, keepdim=True).values  # shift: CE is invariant, exp stays finite
        target = ids[:calibrate_tokens]
        best = min(((F.cross_entropy(t * s, target).item(), t) for t in torch.logspace(-4, 2, 25).tolist()))
        self.log_tau.fill_(math.log(best[1]))


class DecoderInverter(nn.Module):
    """FedSEA's decoder attack: the last ``p`` pretrained blocks + norm + LM head on ``h̃``.

    Parameters
    ----------
    part : PartModel
        Built with ``build_part(source, list(range(L - p, L)), embed=False, head=True, ...)``.
        Its blocks run causally (the model's own mask), with positions rebuilt from ``lengths``.
    train_head : bool
        Fine-tune ``lm_head`` too; default frozen (it is ``V × H``, the costliest gradient).
    """

    def __init__(self, part, *, train_head: bool = False):
        super().__init__()
        if not part.has_head or part.has_embed:
            raise ValueError("DecoderInverter needs a part with head=True and embed=False")
        self.part = part
        part.lm_head.weight.requires_grad_(train_head)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``h`` ``[B, T, H]``, ``lengths`` ``[B]`` -> logits ``[N, V]`` of the real positions."""
        lengths = lengths.to(h.device)
        out = self.part(h.to(self.part.lm_head.weight.dtype), lengths)  # [B, T, H]
        return self.part.head_logits(out[length_mask(lengths, h.shape[1])]).float()


# ------------------------------------------------------------------------------------ training


InverterBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h [B, T, H] clean, ids [B, T], lengths [B])


def train_inverter(inverter: nn.Module, batches: Iterable[InverterBatch], *, steps: int, lr: float,
                   noise: Callable[[torch.Tensor], torch.Tensor], clip: float = 1.0,
                   log: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune ``inverter`` with cross-entropy against the input ids at the same position.

    Parameters
    ----------
    inverter : nn.Module
        ``inverter(h [B, T, H], lengths [B]) -> logits [N, V]`` (N real positions, row-major).
    batches : iterable of ``(h, ids, lengths)``
        Clean auxiliary hidden states ``[B, T, H]``, their input ids ``[B, T]`` and lengths
        ``[B]``; the first ``steps`` are used (fewer if it runs out).
    steps, lr : int, float
        Adam steps and learning rate on the parameters that require grad.
    noise : callable
        ``h -> h + ε``, applied to every batch (fresh noise each step, as on the wire).
    clip : float
        Gradient-norm clip; 0 = off.
    log : callable, optional
        Called as ``log(step, loss)`` after each step.

    Returns
    -------
    list of float
        The loss of each step.
    """
    params = [q for q in inverter.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    inverter.train()
    losses: list[float] = []
    for step, (h, ids, lengths) in zip(range(steps), batches):
        logits = inverter(noise(h), lengths)
        loss = F.cross_entropy(logits, ids[length_mask(lengths.to(ids.device), ids.shape[1])])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    inverter.eval()
    return losses


@torch.no_grad()
def predict(inverter: nn.Module, h: torch.Tensor, lengths: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Arg-max ids ``[B, T]`` for ``h`` ``[B, T, H]``; pad positions hold ``fill``."""
    mask = length_mask(lengths.to(h.device), h.shape[1])
    out = torch.full(mask.shape, fill, dtype=torch.long, device=h.device)
    out[mask] = inverter(h, lengths).argmax(-1)
    return out


def evaluate(inverter: nn.Module, batches: Iterable[InverterBatch], tokenizer, *, examples: int = 3) -> dict:
    """Attack metrics on (already noised) victim batches ``(h̃, ids, lengths)``.

    Returns ``{"token_accuracy", "rouge_l_f1", "tokens", "sequences", "examples"}``: accuracy over
    all real tokens pooled, ROUGE-L F1 averaged over sequences, and the first ``examples``
    ``{"reference", "reconstruction"}`` text pairs.
    """
    inverter.eval()
    correct = total = 0
    preds_txt: list[str] = []
    refs_txt: list[str] = []
    for h, ids, lengths in batches:
        pred = predict(inverter, h, lengths)
        mask = length_mask(lengths.to(ids.device), ids.shape[1])
        correct += int((pred.to(ids.device) == ids)[mask].sum())
        total += int(mask.sum())
        preds_txt += decode_rows(tokenizer, pred.cpu(), lengths.cpu())
        refs_txt += decode_rows(tokenizer, ids.cpu(), lengths.cpu())
    return {"token_accuracy": correct / total if total else float("nan"),
            "rouge_l_f1": rouge_l_f1(preds_txt, refs_txt), "tokens": total,
            "sequences": len(refs_txt),
            "examples": [{"reference": r, "reconstruction": p}
                         for r, p in zip(refs_txt[:examples], preds_txt[:examples])]}
