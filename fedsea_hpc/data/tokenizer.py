"""Tokenizers: a built-in byte-level tokenizer for the tiny model, and loading of real ones.

The byte tokenizer is a genuine HF fast tokenizer (built with the `tokenizers` library in code,
so nothing is downloaded and tests run offline). Token id ``b`` (0-255) is byte ``b``; the special
tokens follow at 256-260. It never adds BOS/EOS by itself: ``encode(s)`` is exactly the UTF-8
bytes of ``s``, so ``decode(encode(s)) == s`` for any string. The data pipeline appends EOS where
a sequence should end (see `fedsea_hpc.data.dataset`).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

#: Special tokens in id order: they get ids 256, 257, ... after the 256 byte tokens.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(256, 256 + len(SPECIAL_TOKENS))

#: Number of ids the byte tokenizer can emit (256 bytes + 5 specials = 261).
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
#: Embedding rows of the tiny model: BYTE_VOCAB_SIZE rounded up to a multiple of 64 so matmuls
#: stay aligned; rows >= BYTE_VOCAB_SIZE are never produced by the tokenizer.
TINY_VOCAB_SIZE = -(-BYTE_VOCAB_SIZE // 64) * 64

#: ChatML. Each turn is ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt is
#: the opening of an assistant turn, so the model's answer ends with ``<|im_end|>``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the alphabet ByteLevel uses).

    Returns
    -------
    dict[int, str]
        256 entries, byte value -> one unicode character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer used by the tiny model (no files, no network).

    Returns
    -------
    PreTrainedTokenizerFast
        ``len(tok) == BYTE_VOCAB_SIZE``; ids 0-255 are raw bytes, then ``<|bos|>`` (256),
        ``<|eos|>`` (257), ``<|pad|>`` (258), ``<|im_start|>`` (259), ``<|im_end|>`` (260).
        ``padding_side='right'``; ``chat_template`` is ChatML. Encoding adds no BOS/EOS.
    """
    # BPE with an empty merge list over the 256-character ByteLevel alphabet = one token per
    # byte. Ordering the vocab by byte value makes token id == byte value, handy when debugging.
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed when every byte is its own token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        padding_side="right",
        add_bos_token=False,
        add_eos_token=False,
        # The default clean-up rewrites " ." to "." on decode, which would break round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tok.chat_template = CHATML_TEMPLATE
    assert len(tok) == BYTE_VOCAB_SIZE and tok.convert_tokens_to_ids(IM_END_TOKEN) == IM_END_ID
    return tok


def load_tokenizer(name_or_path: str, *, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer by name, directory, GGUF file or hub id, ready for training.

    Parameters
    ----------
    name_or_path : str
        ``'tiny'`` -> `build_byte_tokenizer`; an existing directory -> ``from_pretrained(dir)``;
        a ``*.gguf`` file -> ``from_pretrained(parent_dir, gguf_file=file_name)``; anything else
        is treated as a hub id (needs a cache or network).
    cache_dir : str, optional
        Passed to ``from_pretrained`` (hub cache location).

    Returns
    -------
    PreTrainedTokenizerBase
        With a pad token (falls back to EOS when the tokenizer has none) and
        ``padding_side='right'``, which the data pipeline and the length-based mask codec assume.

    Raises
    ------
    FileNotFoundError
        If ``name_or_path`` looks like a local path (``.gguf`` or containing a path separator)
        but does not exist; the hub error for such a string would be confusing.
    ValueError
        If the tokenizer has neither a pad nor an EOS token.
    """
    if name_or_path == "tiny":
        return build_byte_tokenizer()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), cache_dir=cache_dir)
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: GGUF file not found: {name_or_path}")
        tok = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, cache_dir=cache_dir
        )
    elif os.sep in name_or_path and (name_or_path.startswith((".", os.sep, "~"))):
        raise FileNotFoundError(f"tokenizer: directory not found: {name_or_path}")
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token")
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
