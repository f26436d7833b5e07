"""Bad input, everywhere: one line ``fedsea: error: <key or file>: ...``, exit 2, no traceback,
and nothing of an earlier run lost (README, Errors).

One table of bad inputs through the real entry point: single-process rows (``train.mode=
centralized``: every check before the first collective runs there too) launched a few at a time,
and a multi-rank sample under ``mpiexec`` where every rank must exit 2 with its own line.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, check_ok, fedsea_command, load_summary, run_fedsea, subprocess_env

ONE = ["train.mode=centralized", "train.steps=2", "topology.clients=1", "topology.servers=1"]
LONG = "x" * 300  # one path component longer than NAME_MAX (255)

# name: (arguments (with {root} for the fixture's files), the key or file the message must start with)
SINGLE = {
    # config file and overrides
    "config_missing": (["--config", "{root}/nope.yaml"], "--config"),
    "config_is_dir": (["--config", "{root}"], "--config"),
    "config_not_mapping": (["--config", "{root}/list.yaml"], "--config"),
    "config_duplicate_key": (["--config", "{root}/dup.yaml"], "--config"),
    "config_broken_yaml": (["--config", "{root}/broken.yaml"], "--config"),
    "config_not_utf8": (["--config", "{root}/binary.yaml"], "--config"),
    "unknown_section": (["trian.steps=3"], "trian"),
    "override_without_value": (["train.steps"], "override"),
    "override_bad_key": (["train=3"], "override key"),
    "wrong_type": (["train.steps=many"], "train.steps"),
    "wrong_type_in_list": (["peft.target_modules=[1,2]"], "peft.target_modules"),
    "wrong_type_in_files": (["data.train_files=[[a]]"], "data.train_files[0]"),
    "wrong_type_in_pairs": (["split.per_client=[[2,x]]"], "split.per_client"),
    # numbers out of range
    "negative_steps": (["train.steps=-1"], "train.steps"),
    "zero_batch": (["train.micro_batch_size=0"], "train.micro_batch_size"),
    "seq_len_beyond_positions": (["train.seq_len=100000"], "train.seq_len"),
    "negative_noise": (["privacy.noise_std=-0.1"], "privacy.noise_std"),
    "zero_lr": (["train.lr=0"], "train.lr"),
    "negative_lr": (["train.lr=-1e-3"], "train.lr"),
    "nan_lr": (["train.lr=.nan"], "train.lr"),
    "zero_clients": (["topology.clients=0"], "topology.clients"),
    "eval_fraction": (["data.eval_fraction=0.7"], "data.eval_fraction"),
    # model paths, hub ids, weights, tokenizer
    "model_missing": (["model.name_or_path=/nonexistent/model"], "model.name_or_path"),
    "model_missing_non_ascii": (["model.name_or_path=/nonexistent/modèle-ü"], "model.name_or_path"),
    "model_path_too_long": ([f"model.name_or_path=/tmp/{LONG}/model"], "model.name_or_path"),
    "model_no_config": (["model.name_or_path={root}/m_noconfig"], "model.name_or_path"),
    "model_config_not_json": (["model.name_or_path={root}/m_badjson"], "model.name_or_path"),
    "model_not_llama": (["model.name_or_path={root}/m_gpt2"], "model.name_or_path"),
    "model_no_weights": (["model.name_or_path={root}/m_noweights"], "model.name_or_path"),
    "model_truncated_weights": (["model.name_or_path={root}/m_truncated"], "model.name_or_path"),
    "model_missing_tensors": (["model.name_or_path={root}/m_partial"], "model.name_or_path"),
    "model_tokenizer_mismatch": (["model.name_or_path={root}/m_smallvocab"], "model.name_or_path"),
    "model_file_not_gguf": (["model.name_or_path={root}/list.yaml"], "model.name_or_path"),
    "gguf_not_gguf": (["model.name_or_path={root}/fake.gguf", "model.cache_dir={root}/cache"], "model.name_or_path"),
    # data files and records
    "data_missing": (["data.train_files=[{root}/nope.jsonl]"], "data.train_files[0]"),
    "data_is_dir": (["data.train_files=[{root}]"], "data.train_files[0]"),
    "data_empty": (["data.train_files=[{root}/blank.jsonl]"], "data.train_files[0]"),
    "data_broken_line": (["data.train_files=[{root}/broken_line3.jsonl]"], "data.train_files[0]: line 3"),
    "data_unknown_fields": (["data.train_files=[{root}/unknown_fields.jsonl]"], "data.train_files[0]: line 1"),
    "data_chat_unknown_role": (["data.train_files=[{root}/bad_role.jsonl]"], "data.train_files[0]: line 1"),
    "data_not_utf8": (["data.train_files=[{root}/binary.yaml]"], "data.train_files[0]"),
    "data_path_non_ascii": (["data.train_files=[{root}/dätä-ñ.jsonl]"], "data.train_files[0]"),
    "eval_bad_record": (["data.eval_files=[{root}/unknown_fields.jsonl]"], "data.eval_files[0]: line 1"),
    # output dir, checkpoint dir
    "output_dir_is_file": (["run.output_dir={root}/list.yaml"], "run.output_dir"),
    "output_dir_under_file": (["run.output_dir={root}/list.yaml/run"], "run.output_dir"),
    "output_dir_not_writable": (["run.output_dir=/proc/fedsea-run"], "run.output_dir"),
    "output_dir_empty": (["run.output_dir="], "run.output_dir"),
}
# Several ranks: every one of them must print its line and exit 2; none may hang.
MULTI = {
    # the issue's own example: four ranks, a model path that does not exist
    "model_missing": (["model.name_or_path=/nonexistent/model", "topology.clients=2", "topology.servers=2"], 4,
                      "train", "model.name_or_path"),
    "tokenizer_mismatch": (["model.name_or_path={root}/m_smallvocab"], 2, "train", "model.name_or_path"),
    "output_dir_is_file": (["run.output_dir={root}/list.yaml"], 2, "train", "run.output_dir"),
    "prompts_empty_prompt": (["generate.prompts_files=[{root}/empty_prompt.jsonl]"], 2, "generate",
                             "generate.prompts_files[0]: line 1"),
    "prompts_unknown_role": (["generate.prompts_files=[{root}/bad_role.jsonl]"], 2, "generate",
                             "generate.prompts_files[0]: line 1"),
    "prompts_too_long": (["generate.prompts_files=[{root}/long_prompt.jsonl]"], 2, "generate",
                         "generate.prompts_files[0]: line 1"),
    "resume_not_a_checkpoint": (["run.resume={root}/m_ok"], 2, "train", "run.resume"),
    "eval_adapters_garbage": (["data.eval_files=[{root}/good.jsonl]", "eval.adapters_dir={root}/garbage_adapters"], 2,
                              "eval", "eval.adapters_dir"),
}


def _tiny_dir(d: Path, **over) -> None:
    from transformers import LlamaForCausalLM

    from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, build_byte_tokenizer
    from fedsea_hpc.model.loading import tiny_config

    cfg = tiny_config(over.pop("vocab_size", TINY_VOCAB_SIZE), **over)
    LlamaForCausalLM(cfg).save_pretrained(d)
    build_byte_tokenizer().save_pretrained(d)


def _prior_run(d: Path) -> dict:
    """A finished run's outputs (what a bad input must leave as it was)."""
    d.mkdir(parents=True)
    files = {"config.yaml": "run:\n  output_dir: x\n", "summary.json": '{"final_loss": 1.5}\n',
             "metrics.jsonl": '{"step": 1, "loss": 1.5}\n'}
    for name, text in files.items():
        (d / name).write_text(text)
    return files


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    r = tmp_path_factory.mktemp("bad-input")
    (r / "list.yaml").write_text("- train\n- steps\n")
    (r / "dup.yaml").write_text("train:\n  steps: 3\n  steps: 4\n")
    (r / "broken.yaml").write_text("train: [steps\n")
    (r / "binary.yaml").write_bytes(b"\xff\xfe\x00train: \x80\x81\n")
    (r / "fake.gguf").write_text("not a gguf file at all\n")
    (r / "blank.jsonl").write_text("\n\n")
    (r / "good.jsonl").write_text('{"text": "a line to learn"}\n')
    (r / "broken_line3.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n')
    (r / "unknown_fields.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
    (r / "bad_role.jsonl").write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    (r / "empty_prompt.jsonl").write_text('{"prompt": ""}\n')
    (r / "long_prompt.jsonl").write_text(json.dumps({"prompt": "ü" * 5000}) + "\n")  # beyond 512 positions
    (r / "garbage_adapters").mkdir()
    (r / "garbage_adapters" / "adapter_model.safetensors").write_text("garbage")
    torch.manual_seed(0)
    _tiny_dir(r / "m_ok")
    for name in ("m_noconfig", "m_badjson", "m_gpt2", "m_noweights", "m_truncated", "m_partial"):
        shutil.copytree(r / "m_ok", r / name)
    (r / "m_noconfig" / "config.json").unlink()
    (r / "m_badjson" / "config.json").write_text("{not json")
    cfg = json.loads((r / "m_gpt2" / "config.json").read_text())
    (r / "m_gpt2" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    (r / "m_noweights" / "model.safetensors").unlink()
    w = (r / "m_truncated" / "model.safetensors").read_bytes()
    (r / "m_truncated" / "model.safetensors").write_bytes(w[: len(w) // 2])
    sd = load_file(r / "m_partial" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".layers.5." not in k}, r / "m_partial" / "model.safetensors")
    _tiny_dir(r / "m_smallvocab", vocab_size=100)
    return r


def _launch(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    p = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return None, out, err  # a hang


def _args(args: list[str], root: Path) -> list[str]:
    return [a.replace("{root}", str(root)) for a in args]


@pytest.fixture(scope="module")
def single_runs(root):
    """Every single-process row, four at a time; each has a finished earlier run in its output dir."""
    jobs = {}
    for name, (args, _) in SINGLE.items():
        out = root / "runs" / name
        prior = _prior_run(out)
        args = _args(args, root)
        conf = args[:2] if args[:1] == ["--config"] else []
        rest = args[len(conf):]
        own_out = [a for a in rest if a.startswith("run.output_dir=")]
        cmd = [sys.executable, "-m", "fedsea_hpc", "train", *conf, "run.progress=false", *ONE, *rest,
               *([] if own_out else [f"run.output_dir={out}"])]
        jobs[name] = (cmd, out, prior)
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = {name: pool.submit(_launch, cmd, 120) for name, (cmd, _, _) in jobs.items()}
        return {name: (*f.result(), jobs[name][1], jobs[name][2]) for name, f in done.items()}


def test_the_table_is_big_enough():
    assert len(SINGLE) + len(MULTI) >= 40


def _check_line(text: str, key: str) -> str:
    lines = [line for line in text.splitlines() if "fedsea: error: " in line]
    assert len(lines) == 1, text[-3000:]
    msg = lines[0].split("fedsea: error: ", 1)[1]
    assert msg.startswith(key), msg
    assert len(msg) < 1000
    return msg


@pytest.mark.entry
@pytest.mark.parametrize("name", list(SINGLE))
def test_bad_input_is_one_line_and_exit_2(single_runs, name):
    rc, stdout, stderr, out, prior = single_runs[name]
    assert rc == 2, f"exit {rc}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    _check_line(stderr, SINGLE[name][1])
    assert "Traceback" not in stderr, stderr[-4000:]
    # nothing lost: the earlier run in the output dir is as it was, and nothing was moved aside
    assert {p.name: p.read_text() for p in out.iterdir()} == prior
    assert not list(out.parent.glob(f"{name}.*"))


@pytest.mark.entry
def test_broken_jsonl_names_file_and_line(single_runs, root):
    msg = _check_line(single_runs["data_broken_line"][2], "data.train_files[0]")
    assert "line 3" in msg and "broken_line3.jsonl" in msg


@pytest.mark.entry
def test_fedsea_debug_shows_the_traceback(root, tmp_path):
    proc = subprocess.run([*fedsea_command([*ONE, "model.name_or_path=/nonexistent/model",
                                            f"run.output_dir={tmp_path}/out"])],
                          cwd=REPO, env=subprocess_env({"FEDSEA_DEBUG": "1"}), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fedsea: error: model.name_or_path")


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(MULTI))
def test_bad_input_exits_2_on_every_rank(multi_runs, name):
    _, n, _, key = MULTI[name]
    rc, stdout, stderr = multi_runs[name]
    assert rc is not None, f"hung\n{stderr[-3000:]}"
    assert rc == 2, f"exit {rc}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    lines = [line for line in (stdout + stderr).splitlines() if "fedsea: error: " in line]
    assert sorted(line.split("]")[0] for line in lines) == [f"[rank {r}" for r in range(n)], lines
    for line in lines:
        assert line.split("fedsea: error: ", 1)[1].startswith(key), line
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def multi_runs(root, mpiexec_path):
    procs = {}
    for name, (args, n, job, _) in MULTI.items():
        args = _args(args, root)
        out = [] if any(a.startswith("run.output_dir=") for a in args) else [f"run.output_dir={root}/multi/{name}"]
        cmd = [str(mpiexec_path), "-n", str(n), sys.executable, "-m", "fedsea_hpc", job, "run.progress=false",
               "topology.clients=1", "topology.servers=1", *args, *out]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results, t0 = {}, time.monotonic()
    try:
        for name, p in procs.items():
            try:
                out, err = p.communicate(timeout=max(1.0, 150 - (time.monotonic() - t0)))
                results[name] = (p.returncode, out, err)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                results[name] = (None, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


# ------------------------------------------------------------------ a good rerun moves the old run aside


@pytest.mark.entry
def test_a_rerun_moves_the_earlier_run_aside_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    args = [*ONE, f"run.output_dir={out}"]
    check_ok(run_fedsea([*args, "run.seed=1"]))
    first = load_summary(out)
    proc = run_fedsea([*args, "run.seed=2"])
    check_ok(proc)
    assert f"moved it to {out}.1" in proc.stderr
    assert load_summary(f"{out}.1") == first  # the first run, whole, beside the new one
    assert load_summary(out)["losses"] != first["losses"]
    assert (out / "adapters" / "centralized").is_dir() and (Path(f"{out}.1") / "adapters" / "centralized").is_dir()
    second = load_summary(out)
    proc = run_fedsea([*args, "run.seed=3", "run.overwrite=true"])
    check_ok(proc)
    assert "moved it" not in proc.stderr and not Path(f"{out}.2").exists()
    assert load_summary(out)["losses"] != second["losses"]
    assert load_summary(f"{out}.1") == first


def test_eval_and_generate_outputs_move_within_the_run_dir(tmp_path):
    from fedsea_hpc.components import rundir

    d = tmp_path / "run"
    (d / "adapters" / "client0").mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "eval_summary.json", "eval_predictions-client0.jsonl",
                 "eval_config.yaml", "generations-client0.jsonl"):
        (d / name).write_text(name)
    assert rundir.make_room(str(d), "eval", overwrite=False) == str(d / "eval.1")
    assert sorted(p.name for p in (d / "eval.1").iterdir()) == ["eval_config.yaml", "eval_predictions-client0.jsonl",
                                                               "eval_summary.json"]
    # the training run it scored, and generate's outputs, stay where they were
    assert sorted(p.name for p in d.iterdir()) == ["adapters", "config.yaml", "eval.1", "generations-client0.jsonl",
                                                  "summary.json"]
    assert rundir.make_room(str(d), "eval", overwrite=False) is None  # nothing of eval's left to move
    assert rundir.make_room(str(d), "generate", overwrite=True) is None
    assert not (d / "generations-client0.jsonl").exists()
    assert rundir.make_room(str(d), "train", overwrite=False, resuming_inside=True) is None
    assert (d / "summary.json").exists()
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)  # made ready for the run (a mount point, say): nothing to lose
    assert rundir.earlier_outputs(str(fresh), "train") == []
    assert rundir.make_room(str(fresh), "train", overwrite=False) is None and (fresh / "checkpoints").is_dir()


@pytest.mark.multirank
def test_two_split_runs_in_a_row_keep_both(tmp_path, mpiexec_path):
    """What `launch/local.sh` twice in a row does: rank 0 moves the first run aside while the other
    ranks wait, then the second run writes a fresh directory."""
    out = tmp_path / "run"
    args = ["topology.clients=1", "topology.servers=1", "train.steps=2", f"run.output_dir={out}"]
    check_ok(run_fedsea(args, n=2))
    first = load_summary(out)
    proc = run_fedsea(args, n=2)
    check_ok(proc)
    assert proc.stderr.count(f"moved it to {out}.1") == 1  # rank 0 only
    assert load_summary(f"{out}.1") == first
    assert (out / "summary.json").is_file() and (out / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.1"]
