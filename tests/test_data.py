"""Data pipeline: record formats -> labels, validation errors, sharding, batches."""

import json
from pathlib import Path

import pytest
import torch

from fedsea_hpc.data.dataset import (
    IGNORE_INDEX, Batch, ClientData, DataError, Example, collate, concat_batches, encode_prompt,
    encode_record, read_jsonl,
)
from fedsea_hpc.data.tokenizer import EOS_ID, IM_END_ID, PAD_ID, build_byte_tokenizer

TINY = Path(__file__).resolve().parents[1] / "fedsea_hpc" / "data" / "tiny"
FILES = [str(TINY / f"client{i}.jsonl") for i in range(3)]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def learned_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


# ------------------------------------------------------------------------------ record formats
def test_text_record_learns_everything(tok):
    ex = encode_record({"text": "Ice is cold."}, tok, 128)
    assert ex.input_ids == list(b"Ice is cold.") + [EOS_ID]
    assert ex.labels == ex.input_ids and ex.truncated_tokens == 0
    assert ex.num_loss_tokens == len(ex.input_ids) - 1


def test_prompt_response_masks_prompt_and_appends_eos(tok):
    ex = encode_record({"prompt": "What is 2 plus 2?\n", "response": "4."}, tok, 128)
    prompt = encode_prompt("What is 2 plus 2?\n", tok)
    assert ex.input_ids == prompt + list(b"4.") + [EOS_ID]
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + list(b"4.") + [EOS_ID]
    assert len(ex.labels) == len(ex.input_ids)


def test_chat_learns_only_assistant_content_and_end_marker(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye 👋"}]
    ex = encode_record({"messages": msgs}, tok, 512)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert learned_text(tok, ex) == "Hello.<|im_end|>Bye 👋<|im_end|>"
    # Each learned span starts right after the generation prompt and ends on <|im_end|>.
    gen = tok.encode(tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True))
    assert ex.labels[: len(gen)] == [IGNORE_INDEX] * len(gen)
    assert ex.labels[len(gen)] == ord("H")
    ends = [i for i, t in enumerate(ex.input_ids) if t == IM_END_ID]
    assert [ex.labels[i] for i in ends] == [IGNORE_INDEX, IGNORE_INDEX, IM_END_ID,
                                            IGNORE_INDEX, IM_END_ID]


def test_truncation_keeps_first_tokens_and_counts(tok):
    ex = encode_record({"prompt": "abc", "response": "defgh"}, tok, 4)  # 3 + 5 + eos = 9
    assert ex.input_ids == list(b"abcd") and ex.labels == [IGNORE_INDEX] * 3 + [ord("d")]
    assert ex.truncated_tokens == 5
    assert encode_record({"text": "abc"}, tok, 4).truncated_tokens == 0


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "invalid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"title": "x"}', "record needs 'text', 'prompt'+'response' or 'messages'"),
    ('{"prompt": "x"}', "record needs 'text', 'prompt'+'response' or 'messages'"),
    ('{"text": "x", "messages": []}', "only one"),
    ('{"text": ""}', "'text' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least one 'assistant'"),
    ('{"messages": [{"role": "user"}]}', "messages[0] needs string 'role' and 'content'"),
])
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(DataError) as err:
        read_jsonl(path, label="data.train_files[1]")
    text = str(err.value)
    assert text.startswith("data.train_files[1]: line 3: ") and message in text
    assert path in text and "\n" not in text


def test_read_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(write_jsonl(tmp_path / "e.jsonl", ["", "  "]))
    assert read_jsonl(FILES[0])[0].keys() == {"prompt", "response"}


def test_wrong_file_count_names_config_key(tok):
    with pytest.raises(DataError, match=r"data.train_files: got 2 files for 3 clients; give 1 .*3"):
        ClientData(FILES[:2], 0, 3, tok, 128, seed=0)


def test_empty_shard_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", ['{"text": "a b"}', '{"text": "c d"}'])
    ClientData([path], 1, 3, tok, 128, seed=0)
    with pytest.raises(DataError, match=r"data.train_files\[0\]: client 2 of 3 gets no records"):
        ClientData([path], 2, 3, tok, 128, seed=0)


def test_encoding_error_is_located(tok, tmp_path):
    tok2 = build_byte_tokenizer()
    tok2.chat_template = None
    record = {"messages": [{"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=r"data.train_files\[0\]: line 1: .*chat_template"):
        ClientData([path], 0, 1, tok2, 128, seed=0)


# ------------------------------------------------------------------------------ clients
def test_one_file_per_client_reads_its_own(tok):
    for i, fmt in enumerate(["prompt", "messages", "text"]):
        data = ClientData(FILES, i, 3, tok, 128, seed=0)
        assert data.num_examples == len(read_jsonl(FILES[i])) >= 250
        assert fmt in read_jsonl(FILES[i])[0]
        assert data.truncated_sequences == data.truncated_tokens == data.dropped_examples == 0


def test_sharding_one_file_is_a_partition(tok):
    shards = [ClientData(FILES[:1], i, 3, tok, 128, seed=0) for i in range(3)]
    records = [encode_record(r, tok, 128).input_ids for r in read_jsonl(FILES[0])]
    for i, shard in enumerate(shards):
        assert [e.input_ids for e in shard.examples] == records[i::3]
    assert sum(s.num_examples for s in shards) == len(records)


def test_truncation_counters(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"text": "x" * 20}),
                                              json.dumps({"text": "short"}),
                                              json.dumps({"prompt": "p" * 30, "response": "r"})])
    data = ClientData([path], 0, 1, tok, 10, seed=0)
    # text 21 tokens -> cut 11; prompt record cut 22 and has no loss left -> dropped.
    assert (data.truncated_sequences, data.truncated_tokens) == (2, 11 + 22)
    assert data.dropped_examples == 1 and data.num_examples == 2


# ------------------------------------------------------------------------------ batches
def take(it, n):
    return [next(it) for _ in range(n)]


def flat_rows(batches):
    return [tuple(row[: n].tolist()) for b in batches for row, n in zip(b.input_ids, b.lengths)]


def test_batches_deterministic_and_cover_each_epoch(tok):
    data = ClientData(FILES, 2, 3, tok, 128, seed=7)
    steps = data.steps_per_epoch(32)
    assert steps == -(-data.num_examples // 32)
    state = torch.get_rng_state()
    first = take(data.batches(32), 2 * steps)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    again = take(ClientData(FILES, 2, 3, tok, 128, seed=7).batches(32), 2 * steps)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again))
    everything = sorted(tuple(e.input_ids) for e in data.examples)
    epoch0, epoch1 = flat_rows(first[:steps]), flat_rows(first[steps:])
    assert sorted(epoch0) == everything == sorted(epoch1)  # each example once per epoch
    assert epoch0 != epoch1  # a fresh shuffle each epoch
    assert first[steps - 1].input_ids.shape[0] == data.num_examples - 32 * (steps - 1)
    other_seed = flat_rows(take(ClientData(FILES, 2, 3, tok, 128, seed=8).batches(32), steps))
    assert other_seed != epoch0


def test_batches_differ_across_clients_with_same_data(tok):
    a, b = (ClientData([FILES[2]] * 2, i, 2, tok, 128, seed=0) for i in range(2))
    assert a.examples == b.examples
    assert flat_rows(take(a.batches(8), 3)) != flat_rows(take(b.batches(8), 3))


def test_batch_shapes_padding_and_loss_tokens(tok):
    data = ClientData(FILES, 0, 3, tok, 128, seed=0)
    batch = next(data.batches(5))
    B, T = batch.input_ids.shape
    assert B == 5 and batch.labels.shape == (B, T) and batch.lengths.shape == (B,)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.lengths.dtype == torch.long
    assert T == int(batch.lengths.max())
    for row in range(B):
        n = int(batch.lengths[row])
        assert (batch.input_ids[row, n:] == PAD_ID).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert batch.input_ids[row, n - 1] == EOS_ID == batch.labels[row, n - 1]
    assert batch.num_loss_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def test_collate_and_concat_batches():
    ex = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4], [4])]
    a = collate(ex, pad_id=0)
    assert a.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert a.labels.tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    # Row 1's label at t=0 is never predicted (the loss shifts), so it does not count.
    assert a.lengths.tolist() == [3, 1] and a.num_loss_tokens == 2
    b = collate([Example([5, 6, 7, 8, 9], [5, 6, 7, 8, 9])], pad_id=0)
    both = concat_batches([a, b], pad_id=0)
    assert isinstance(both, Batch) and both.input_ids.shape == (3, 5)
    assert both.input_ids.tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert both.labels[0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert both.lengths.tolist() == [3, 1, 5] and both.num_loss_tokens == 2 + 4
    assert both.num_loss_tokens == int((both.labels[:, 1:] != IGNORE_INDEX).sum())
    with pytest.raises(ValueError):
        concat_batches([], pad_id=0)


def test_shipped_corpus_is_small_and_short(tok):
    for path in FILES:
        assert Path(path).stat().st_size < 60_000
        data = ClientData([path], 0, 1, tok, 128, seed=0)
        assert 250 <= data.num_examples <= 400 and data.truncated_sequences == 0
