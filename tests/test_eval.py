"""Held-out evaluation: eval sets per client (files or a held-out fraction), the eval pass during
training in the split and centralized modes, and its rows in metrics.jsonl / summary.json."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import COMMON_ARGS, MPIEXEC, REPO, check_ok, load_metrics, load_summary, run_fedsea, subprocess_env
from fedsea_hpc.components.checkpoint import _rows
from fedsea_hpc.components.metrics import MetricsLog, eval_rows, train_rows
from fedsea_hpc.config import ConfigError, load_config
from fedsea_hpc.data.dataset import ClientData, DataError, client_datasets, encode_record, held_out_indices, read_jsonl
from fedsea_hpc.data.tokenizer import build_byte_tokenizer
from fedsea_hpc.train.evaluation import due, eval_row

TINY = Path(__file__).resolve().parents[1] / "fedsea_hpc" / "data" / "tiny"
FILES = [str(TINY / f"client{i}.jsonl") for i in range(3)]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def ids(data: ClientData) -> list[tuple[int, ...]]:
    return [tuple(e.input_ids) for e in data.examples]


# ------------------------------------------------------------------ held-out sets


def test_held_out_indices_are_deterministic_sized_and_seeded():
    a = held_out_indices(100, 0.2, seed=0, silo=1)
    assert a == held_out_indices(100, 0.2, seed=0, silo=1) and a == sorted(set(a)) and len(a) == 20
    assert a != held_out_indices(100, 0.2, seed=1, silo=1) and a != held_out_indices(100, 0.2, seed=0, silo=2)
    assert len(held_out_indices(7, 0.1, 0, 0)) == 1  # at least one record
    assert len(held_out_indices(10, 0.25, 0, 0)) == 3  # ceil


def test_eval_fraction_splits_each_shard_into_disjoint_train_and_eval(tok):
    records = read_jsonl(FILES[0])
    for c in range(3):  # one file sharded over 3 clients
        train = ClientData(FILES[:1], c, 3, tok, 128, 0, holdout=0.2)
        held = ClientData(FILES[:1], c, 3, tok, 128, 0, holdout=0.2, part="eval")
        shard = [tuple(encode_record(r, tok, 128).input_ids) for r in records[c::3]]
        assert sorted(ids(train) + ids(held)) == sorted(shard)
        assert len(held.examples) == math.ceil(0.2 * len(shard))
        assert not set(map(id, train.examples)) & set(map(id, held.examples))
        # never trained on: two epochs of the training stream contain no held-out row
        seen = set()
        stream = train.batches(8)
        for _ in range(2 * train.steps_per_epoch(8)):
            b = next(stream)
            seen |= {tuple(row[:n].tolist()) for row, n in zip(b.input_ids, b.lengths)}
        assert seen == set(ids(train)) and not seen & set(ids(held)) - set(ids(train))


def test_client_datasets_follow_the_config(tok):
    def data(**kw):
        return SimpleNamespace(**{"train_files": FILES, "eval_files": [], "eval_fraction": 0.0} | kw)

    train, held = client_datasets(data(), 1, 3, tok, 128, 0)
    assert held is None and train.num_examples == ClientData(FILES, 1, 3, tok, 128, 0).num_examples
    train, held = client_datasets(data(eval_files=FILES[2:]), 1, 3, tok, 128, 0)  # one eval file, sharded
    assert ids(held) == [tuple(encode_record(r, tok, 128).input_ids) for r in read_jsonl(FILES[2])[1::3]]
    assert ids(train) == ids(ClientData(FILES, 1, 3, tok, 128, 0))  # the training set is untouched
    train, held = client_datasets(data(eval_fraction=0.1), 1, 3, tok, 128, 0)
    assert len(held.examples) + len(train.examples) == len(read_jsonl(FILES[1]))


def test_eval_batches_are_every_example_once_in_order(tok):
    held = ClientData(FILES, 0, 3, tok, 128, 0, holdout=0.1, part="eval")
    batches = held.eval_batches(8)
    assert [len(b.lengths) for b in batches[:-1]] == [8] * (len(batches) - 1) and len(batches[-1].lengths) <= 8
    rows = [tuple(r[:n].tolist()) for b in batches for r, n in zip(b.input_ids, b.lengths)]
    assert rows == ids(held)


def test_a_fraction_that_leaves_nothing_to_train_on_names_the_key(tmp_path, tok):
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "only one"}\n')
    with pytest.raises(DataError, match=r"^data.eval_fraction: client 0 has 1 training record.*leaves none"):
        ClientData([str(path)], 0, 1, tok, 128, 0, holdout=0.5)


def test_eval_files_errors_name_their_key(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=r"^data.eval_files\[0\]: line 1:"):
        ClientData([str(path)], 0, 1, tok, 128, 0, key="data.eval_files")
    with pytest.raises(DataError, match=r"^data.eval_files: got 2 files for 3 clients"):
        ClientData(FILES[:2], 0, 3, tok, 128, 0, key="data.eval_files")


@pytest.mark.parametrize("overrides, message", [
    (["data.eval_fraction=0.6"], "data.eval_fraction: must be 0 (no eval set) or in (0, 0.5], got 0.6"),
    (["data.eval_fraction=-0.1"], "data.eval_fraction: must be 0 (no eval set) or in (0, 0.5], got -0.1"),
    ([f"data.eval_files=[{FILES[0]}]", "data.eval_fraction=0.1"], "data.eval_fraction: give data.eval_files or"),
    (["data.eval_files=[nope.jsonl]"], "data.eval_files[0]: no such file 'nope.jsonl'"),
    ([f"data.eval_files=[{FILES[0]},{FILES[1]}]"], "data.eval_files: give 1 file (sharded) or 3"),
    (["train.eval_every=-1"], "train.eval_every: must be an integer >= 0"),
])
def test_bad_eval_config_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["topology.clients=3", *overrides])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_eval_is_due_every_n_steps_and_after_the_last():
    def cfg(every, **data):
        d = SimpleNamespace(**{"eval_files": [], "eval_fraction": 0.1} | data)
        return SimpleNamespace(data=d, train=SimpleNamespace(eval_every=every, steps=10))

    assert [s for s in range(1, 11) if due(cfg(0), s)] == [10]
    assert [s for s in range(1, 11) if due(cfg(4), s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(cfg(5), s)] == [5, 10]
    assert not any(due(cfg(2, eval_fraction=0.0), s) for s in range(1, 11))


# ------------------------------------------------------------------ rows and summary


def test_eval_rows_are_token_weighted_and_kept_apart_from_step_rows(tmp_path):
    run = SimpleNamespace(output_dir=str(tmp_path), progress=False, log_every=1)
    train = SimpleNamespace(steps=2, mode="parallel")
    log = MetricsLog(run, train, enabled=True)
    import torch

    from fedsea_hpc.components.metrics import BYTE_KEYS, PHASES
    for step in range(2):
        log.step(step, torch.tensor([10.0, 5.0, 2.0] + [0.0] * len(BYTE_KEYS)), torch.zeros(1 + len(PHASES)))
        log.eval(eval_row(step + 1, [(6.0, 3.0, 1.0), (2.0, 1.0, 1.0)], 0.5, 100, False))
    summary = log.finish(1.0)
    row = eval_rows(load_rows(tmp_path))[-1]
    assert row["eval_loss"] == 2.0 and row["eval_client_loss"] == [2.0, 2.0] and row["eval_tokens"] == 4
    assert math.isclose(row["eval_ppl"], math.exp(2.0))
    assert summary["steps"] == 2 and summary["final_loss"] == 2.0  # the step rows alone
    assert summary["eval_loss"] == 2.0 and summary["eval_step"] == 2 and len(summary["evals"]) == 2
    rows = load_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 1, 2, 2] and len(train_rows(rows)) == 2
    # a checkpoint's metrics.jsonl keeps its eval rows, and resumes with them in order
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text())
    kept = _rows(str(tmp_path / "ck" / "metrics.jsonl"), 2)
    again = MetricsLog(SimpleNamespace(output_dir=str(tmp_path / "again"), progress=False, log_every=1), train,
                       enabled=True, rows=kept)
    assert again.all_rows == rows and len(again.rows) == 2 and len(again.evals) == 2


def load_rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------ the real entry point

EVAL = ["privacy.noise_std=0", "federated.avg_every=1", "train.steps=4", "train.lr=1e-3", "train.eval_every=2",
        "data.eval_fraction=0.2", "topology.clients=2", "topology.servers=2", "deepspeed.zero_stage=3"]


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory, mpiexec_path):
    root = tmp_path_factory.mktemp("eval")
    out = {}
    noised = ["privacy.noise_seed=0", "train.steps=2", "data.eval_fraction=0.2", "topology.clients=1",
              "topology.servers=1"]  # the default noise on what is sent during training
    for name, args, n in [("split", EVAL, 4), ("central", [*EVAL, "train.mode=centralized"], None),
                          ("noise_off", noised, 2), ("noise_on", [*noised, "privacy.noise_in_eval=true"], 2)]:
        check_ok(run_fedsea([*args, f"run.output_dir={root / name}"], n=n))
        out[name] = root / name
    return out


@pytest.mark.multirank
def test_split_eval_equals_centralized_eval_with_noise_off(eval_runs):
    split, central = (eval_rows(load_metrics(eval_runs[k])) for k in ("split", "central"))
    assert [r["step"] for r in split] == [r["step"] for r in central] == [2, 4]
    for s, c in zip(split, central):
        assert abs(s["eval_loss"] - c["eval_loss"]) < 1e-4, (s, c)
        assert all(abs(a - b) < 1e-4 for a, b in zip(s["eval_client_loss"], c["eval_client_loss"]))
        assert s["eval_client_tokens"] == c["eval_client_tokens"] and s["eval_noise"] is False
        assert s["eval_bytes_sent"] > 0 and c["eval_bytes_sent"] == 0
    assert split[1]["eval_loss"] < split[0]["eval_loss"]  # trained on, got better on unseen data
    summary = load_summary(eval_runs["split"])
    assert summary["eval_loss"] == split[-1]["eval_loss"] and summary["eval_step"] == 4
    assert summary["steps"] == 4 and len(summary["losses"]) == 4


@pytest.mark.multirank
def test_noise_in_eval_noises_only_the_eval_pass(eval_runs):
    off, on = (load_metrics(eval_runs[k]) for k in ("noise_off", "noise_on"))
    assert [r["loss"] for r in train_rows(off)] == [r["loss"] for r in train_rows(on)]  # same noised training
    (e_off,), (e_on,) = eval_rows(off), eval_rows(on)
    assert e_off["step"] == e_on["step"] == 2 and (e_off["eval_noise"], e_on["eval_noise"]) == (False, True)
    assert e_off["eval_tokens"] == e_on["eval_tokens"] and e_off["eval_loss"] != e_on["eval_loss"]
    assert load_summary(eval_runs["noise_on"])["eval_noise"] is True


@pytest.mark.multirank
def test_training_with_an_eval_pass_still_equals_centralized(eval_runs):
    rows = train_rows(load_metrics(eval_runs["split"]))
    central = train_rows(load_metrics(eval_runs["central"]))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(rows, central))


# ------------------------------------------------------------------ train.mode=local

LOCAL = ["train.steps=3", "train.lr=1e-3", "train.eval_every=0", "data.eval_fraction=0.2"]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    out = {}
    for name, args in [("local1", ["train.mode=local", "topology.clients=1"]),
                       ("central1", ["train.mode=centralized", "topology.clients=1"]),
                       ("local2", ["train.mode=local", "topology.clients=2"])]:
        check_ok(run_fedsea([*LOCAL, *args, f"run.output_dir={root / name}"]))
        out[name] = root / name
    return out


@pytest.mark.multirank
def test_local_with_one_client_is_centralized_with_one_client(local_runs):
    local, central = (load_metrics(local_runs[k]) for k in ("local1", "central1"))
    assert [r["loss"] for r in train_rows(local)] == pytest.approx([r["loss"] for r in train_rows(central)], abs=1e-6)
    (e_local,), (e_central,) = eval_rows(local), eval_rows(central)
    assert e_local["eval_loss"] == pytest.approx(e_central["eval_loss"], abs=1e-6)


@pytest.mark.multirank
def test_local_trains_each_silo_alone_and_scores_every_model_on_every_set(local_runs):
    out = local_runs["local2"]
    (row,) = eval_rows(load_metrics(out))
    m = row["eval_matrix"]
    assert len(m) == 2 and all(len(r) == 2 for r in m)
    assert row["eval_client_loss"] == pytest.approx([m[0][0], m[1][1]])
    assert row["eval_loss"] == pytest.approx(sum(row["eval_model_loss"]) / 2)
    tok = row["eval_client_tokens"]
    assert row["eval_model_loss"][1] == pytest.approx((m[1][0] * tok[0] + m[1][1] * tok[1]) / sum(tok))
    summary = load_summary(out)
    assert summary["mode"] == "local" and summary["bytes_sent_total"] == 0
    assert set(summary["memory"]["parts"]) == {"local0", "local1"}
    from safetensors.torch import load_file
    a, b = (load_file(str(out / "adapters" / f"local{c}" / "adapter_model.safetensors")) for c in range(2))
    assert a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)  # two silos, two models


@pytest.mark.multirank
def test_local_refuses_several_processes(tmp_path, mpiexec_path):
    proc = run_fedsea(["train.mode=local", "topology.clients=1", f"run.output_dir={tmp_path}"], n=2)
    assert proc.returncode == 2
    assert "train.mode: local runs in one process, but the launcher started 2" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ fedsea eval


def test_exact_match_normalisation_and_rouge_l():
    from fedsea_hpc.evaluate.scores import exact_match, normalize, rouge_l

    assert normalize("  The\tAnswer\n is  ４２ ") == "the answer is 42"  # NFKC, casefold, whitespace
    assert exact_match("Paris", " paris ") and not exact_match("Paris.", "Paris")  # punctuation counts
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("dog", "the cat") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)


def test_scorable_records_and_their_prompts(tok):
    from fedsea_hpc.data.dataset import encode_prompt
    from fedsea_hpc.evaluate.scores import scorable

    recs = [{"text": "no reference"}, {"prompt": "2+2=", "response": "4"}]
    (item,) = scorable(recs, tok)
    assert item.reference == "4" and item.prompt.ids == encode_prompt("2+2=", tok)  # as training encodes it


def run_eval(args: list[str], n: int, config: Path | None = None) -> subprocess.CompletedProcess:
    """``mpiexec -n n fedsea eval [--config CONFIG] COMMON_ARGS ARGS``."""
    conf = [] if config is None else ["--config", str(config)]
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, "-m", "fedsea_hpc", "eval", *conf, *COMMON_ARGS, *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.multirank
def test_fedsea_eval_of_a_runs_adapters_gives_its_final_eval_loss(eval_runs, tmp_path):
    run = eval_runs["split"]
    out = tmp_path / "eval"
    check_ok(run_eval([f"eval.adapters_dir={run / 'adapters'}", f"run.output_dir={out}", "generate.max_new_tokens=2",
                       "eval.max_records=6"], 4, config=run / "config.yaml"))
    summary = json.loads((out / "eval_summary.json").read_text())
    last = eval_rows(load_metrics(run))[-1]
    assert abs(summary["overall"]["eval_loss"] - last["eval_loss"]) < 1e-4
    assert [c["eval_tokens"] for c in summary["per_client"]] == last["eval_client_tokens"]
    for c, client in enumerate(summary["per_client"]):
        assert abs(client["eval_loss"] - last["eval_client_loss"][c]) < 1e-4
        rows = [json.loads(x) for x in (out / f"eval_predictions-client{c}.jsonl").read_text().splitlines()]
        assert len(rows) == client["scored"] == 6
        assert client["exact_match"] == pytest.approx(sum(r["exact_match"] for r in rows) / 6)
    assert summary["overall"]["scored"] == 12 and summary["noise"] is False


@pytest.mark.multirank
def test_fedsea_eval_scores_answers_against_references(eval_runs, tmp_path):
    """References made of the model's own greedy answers: every one matches exactly."""
    run, first = eval_runs["split"], tmp_path / "first"
    base = [f"eval.adapters_dir={run / 'adapters'}", "generate.max_new_tokens=3", "eval.max_records=8"]
    check_ok(run_eval([*base, f"run.output_dir={first}"], 4, config=run / "config.yaml"))
    records = []
    for c in range(2):
        for r in (json.loads(x) for x in (first / f"eval_predictions-client{c}.jsonl").read_text().splitlines()):
            if r["completion"]:  # a response must be non-empty
                records.append({"prompt": r["prompt"], "response": r["completion"]})
    assert records, "the model answered nothing"
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = tmp_path / "again"
    check_ok(run_eval([*base, "data.eval_fraction=0", f"data.eval_files=[{tmp_path / 'own.jsonl'}]",
                       f"run.output_dir={again}"], 4, config=run / "config.yaml"))
    overall = json.loads((again / "eval_summary.json").read_text())["overall"]
    assert overall["scored"] == len(records)  # <= 8 per client: every one is scored
    assert overall["exact_match"] == 1.0


@pytest.mark.multirank
@pytest.mark.parametrize("args, key", [
    (["data.eval_fraction=0"], "data.eval_files: `fedsea eval` needs an eval set"),
    (["data.eval_fraction=0.2", "eval.adapters_dir=/nonexistent"], "eval.adapters_dir: no such directory"),
    (["data.eval_fraction=0.2", "model.tiny_hidden_size=32", "model.tiny_intermediate_size=64", "{adapters}"],
     "eval.adapters_dir: "),
])
def test_fedsea_eval_bad_input_is_exit_2_on_every_rank(eval_runs, tmp_path, args, key):
    adapters = f"eval.adapters_dir={eval_runs['split'] / 'adapters'}"
    args = [adapters if a == "{adapters}" else a for a in args]
    proc = run_eval(["topology.clients=2", "topology.servers=2", *args, f"run.output_dir={tmp_path / 'o'}"], 4)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "fedsea: error:" in ln]
    assert len(lines) == 4 and all(ln.split("fedsea: error: ", 1)[1].startswith(key) for ln in lines), lines
    assert "Traceback" not in proc.stderr


@pytest.mark.multirank
def test_fedsea_eval_of_a_local_model_gives_its_shared_set_loss(local_runs, tmp_path):
    """A whole-model adapter (adapters/local1/) goes onto every part: the silo's model, split."""
    run, out = local_runs["local2"], tmp_path / "eval"
    check_ok(run_eval([f"eval.adapters_dir={run / 'adapters' / 'local1'}", "eval.generate=false",
                       f"run.output_dir={out}"], 3, config=run / "config.yaml"))
    summary = json.loads((out / "eval_summary.json").read_text())
    (row,) = eval_rows(load_metrics(run))
    assert abs(summary["overall"]["eval_loss"] - row["eval_model_loss"][1]) < 1e-4
    assert [c["eval_loss"] for c in summary["per_client"]] == pytest.approx(row["eval_matrix"][1], abs=1e-4)
    assert summary["overall"]["scored"] == 0 and summary["generation"] is None


def test_digit_code_task_is_non_iid_deterministic_and_held_out(tmp_path):
    from fedsea_hpc.data.make_digit_code import CODE, SLICES, encode, make

    paths = make(str(tmp_path / "a"), train=50, eval_=10, seed=3)
    assert make(str(tmp_path / "b"), train=50, eval_=10, seed=3) and all(
        Path(p).read_text() == (tmp_path / "b" / Path(p).name).read_text() for p in paths)
    assert encode("4071") == " m q v w" and len(set(CODE)) == 10
    for c, digits in enumerate(SLICES):
        train, held = (read_jsonl(str(tmp_path / "a" / f"client{c}_{part}.jsonl")) for part in ("train", "eval"))
        nums = [r["prompt"].split()[1] for r in train + held]
        assert len(train) == 50 and len(held) == 10 and len(set(nums)) == 60  # eval never in training
        assert all(set(n) <= set(digits) for n in nums) and all(r["response"] == encode(r["prompt"].split()[1])
                                                                 for r in train + held)
