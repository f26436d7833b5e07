"""Masks and positions rebuilt from lengths: the one convention, held against Hugging Face's own."""
import pytest
import torch

from fedsea_hpc.data.tokenizer import build_byte_tokenizer
from fedsea_hpc.model.masks import MaskError, lengths_to_mask, position_ids

LENGTHS = torch.tensor([0, 5, 2, 1, 4])


@pytest.mark.parametrize("side", ["right", "left"])
def test_mask_is_what_the_tokenizer_pads(side):
    # Prepare: a real tokenizer pads a batch of texts of known lengths on `side`.
    tok = build_byte_tokenizer()
    tok.padding_side = side
    texts = ["abc", "a", "abcdef", "ab"]
    enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    lengths = torch.tensor([len(t) for t in texts])
    # Execute
    mask = lengths_to_mask(lengths, enc["attention_mask"].shape[1], side)
    # Assert: the rebuilt mask is the tokenizer's, element for element.
    assert mask.dtype == torch.int64
    assert torch.equal(mask, enc["attention_mask"].to(torch.int64))


def test_right_padding_positions_are_what_an_hf_forward_uses():
    # A Hugging Face forward without position_ids numbers every position 0..T-1.
    assert position_ids(LENGTHS, 5, "right").tolist() == [list(range(5))] * 5


def test_left_padding_positions_are_what_hf_generate_uses():
    # transformers' generate: position_ids = cumsum(mask) - 1, pads filled with 1.
    mask = lengths_to_mask(LENGTHS, 5, "left")
    hf = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    assert torch.equal(position_ids(LENGTHS, 5, "left"), hf)


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_tokens_count_from_zero_on_either_side(side):
    mask = lengths_to_mask(LENGTHS, 5, side).bool()
    pos = position_ids(LENGTHS, 5, side)
    for i, n in enumerate(LENGTHS.tolist()):
        assert pos[i][mask[i]].tolist() == list(range(n))


def test_bad_lengths_and_sides_are_refused():
    with pytest.raises(MaskError, match="outside"):
        lengths_to_mask(torch.tensor([6]), 5, "right")
    with pytest.raises(MaskError, match="padding_side"):
        position_ids(torch.tensor([1]), 5, "middle")
    with pytest.raises(MaskError, match="1-d"):
        lengths_to_mask(torch.tensor([[1]]), 5, "left")
