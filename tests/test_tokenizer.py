"""Byte tokenizer: round trip, special ids, chat template, padding; load_tokenizer dispatch."""

import pytest

from fedsea_hpc.data.tokenizer import (
    BYTE_VOCAB_SIZE, EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, TINY_VOCAB_SIZE,
    build_byte_tokenizer, load_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.mark.parametrize("text", [
    "", "hello", "What is 12 plus 7?\n12 plus 7 is 19.", "  two  spaces . , !",
    "Brasília, Bogotá, Zürich", "emoji 👋🏽 and 🇫🇷", "中文 テキスト",
    "tab\tnl\r\nend\x00",
])
def test_round_trip_is_exact_bytes(tok, text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value, no BOS
    assert tok.decode(ids) == text


def test_special_token_ids_and_sizes(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START_ID, IM_END_ID]
    assert (EOS_ID, PAD_ID, IM_START_ID, IM_END_ID) == (257, 258, 259, 260)
    assert len(tok) == BYTE_VOCAB_SIZE == 261
    assert TINY_VOCAB_SIZE >= BYTE_VOCAB_SIZE and TINY_VOCAB_SIZE % 64 == 0
    # Special tokens written in text are parsed as one token each.
    assert tok.encode("<|eos|>") == [EOS_ID]
    assert tok.decode([72, 105, EOS_ID], skip_special_tokens=True) == "Hi"


def test_pad_token_and_padding_side(tok):
    assert tok.pad_token == "<|pad|>" and tok.padding_side == "right"
    out = tok(["ab", "abcd"], padding=True)
    assert out["input_ids"][0] == [97, 98, PAD_ID, PAD_ID]
    assert out["attention_mask"][0] == [1, 1, 0, 0]


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=False)
    assert no_gen.endswith("Hi<|im_end|>\n")
    ids = tok.encode(prompt)
    assert ids[0] == IM_START_ID and ids.count(IM_END_ID) == 2


def test_load_tokenizer_tiny_and_saved_dir(tok, tmp_path):
    assert load_tokenizer("tiny").encode("abc") == [97, 98, 99]
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "round 👋 trip"
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
    assert again.pad_token_id == PAD_ID and again.padding_side == "right"
    assert again.chat_template == tok.chat_template


def test_load_tokenizer_missing_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_tokenizer(str(tmp_path / "model.gguf"))
    with pytest.raises(FileNotFoundError, match="directory"):
        load_tokenizer(str(tmp_path / "nope") + "/")


def test_load_tokenizer_falls_back_to_eos_for_pad(tok, tmp_path):
    tok2 = build_byte_tokenizer()
    tok2.pad_token = None
    tok2.padding_side = "left"
    tok2.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id == EOS_ID
    assert loaded.padding_side == "right"
