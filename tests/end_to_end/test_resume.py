"""Preemption: a fine-tune, a generation or an evaluation killed mid-run (SIGKILL, as a
Slurm preemption or a node failure ends it) and started again with the same command (a
Snakemake retry or a Slurm requeue) resumes where it stopped (cfs.checkpoints, cfs.generate's
partial file, cfs.request_cache) and ends with exactly what an uninterrupted run writes:
bit-identical weights on CPU with the same seed, the same samples, the same scores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cfs.arithmetic import arithmetic_problems, render
from conftest import (
    PACKAGE_DIR,
    TEMPLATE,
    assert_same_weights,
    complete_checkpoints,
    evaluation_settings,
    generation_settings,
    read_jsonl,
    task_records,
    train_log,
    train_settings,
    write_jsonl,
)

pytestmark = pytest.mark.slow

TRAIN_SETTINGS = {
    **train_settings(),
    "learning_rate": 2e-3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "epochs": 3,
    "batch_size": 4,
    "micro_batch_size": 2,
    "max_length": 64,
    "seed": 0,
    "save_steps": 4,
    "logging_steps": 2,
    "mixing": "augment",  # the mixed set's examples in random batches, 3 epochs
}
GENERATION_SETTINGS = generation_settings(num_samples=160, max_new_tokens=32, batch_size=4, seed=3)


def stage_env() -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(PACKAGE_DIR),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def stage_command(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, "--threads", "1", *map(str, args)]


def run_stage(command: list[str], log: Path, timeout: int = 300, cwd=None) -> str:
    with log.open("w") as handle:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=stage_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    text = log.read_text()
    assert result.returncode == 0, text[-4000:]
    return text


def kill_when(command: list[str], log: Path, ready, timeout: float = 240, cwd=None) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds; fail if it ended first."""
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, cwd=cwd, env=stage_env(), stdout=handle, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no progress to kill at:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def training_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted fine-tune: 24 examples, global batch 4, 3 epochs = 18 steps."""
    root = tmp_path_factory.mktemp("resume_train")
    records = task_records(20, seed=5) + [
        {
            "kind": "context_free",
            "prompt_token_id": 1,
            "token_ids": [40 + i, 50 + i, 60 + i, 2],
            "finish_reason": "eos",
        }
        for i in range(4)
    ]
    data = write_jsonl(root / "train.jsonl", records)

    def command(name: str) -> list[str]:
        return stage_command(
            "cfs.train",
            "--model",
            tiny_model_dir,
            "--data",
            data,
            "--settings",
            json.dumps(TRAIN_SETTINGS),
            "--checkpoints",
            root / name / "checkpoints",
            "--out",
            root / name / "model",
        )

    (root / "reference").mkdir()
    run_stage(command("reference"), root / "reference.log")
    return {"root": root, "command": command}


def test_killed_fine_tune_resumes_to_identical_weights(training_run):
    root, command = training_run["root"], training_run["command"]
    checkpoints = root / "killed" / "checkpoints"
    (root / "killed").mkdir()
    kill_when(command("killed"), root / "killed.log", lambda: complete_checkpoints(checkpoints))
    assert not (root / "killed" / "model").exists(), "killed before the final save"
    last = complete_checkpoints(checkpoints)[-1]
    step = int(last.name.split("-")[1])
    assert 0 < step < 18, f"killed at {last}, expected between steps 0 and 18"

    log = run_stage(command("killed"), root / "resumed.log")
    assert "resuming from" in log, log[-3000:]
    summary = train_log(root / "killed" / "model")["summary"]
    resumed = Path(summary["resumed_from"] or "")
    assert resumed.name.startswith("checkpoint-"), f"resumed from {summary['resumed_from']}"
    assert summary["global_steps"] == 18
    assert_same_weights(root / "reference" / "model", root / "killed" / "model")
    # the loss curve after the resume point is the uninterrupted run's, to the last bit
    reference_losses = {
        entry["step"]: entry["loss"]
        for entry in train_log(root / "reference" / "model")["log_history"]
        if "loss" in entry
    }
    resumed_losses = {
        entry["step"]: entry["loss"]
        for entry in train_log(root / "killed" / "model")["log_history"]
        if "loss" in entry
    }
    assert resumed_losses == reference_losses, "the losses differ from the uninterrupted run's"
    assert not checkpoints.exists(), "checkpoints are removed once the model is saved"


def test_half_written_checkpoint_is_not_resumed(training_run):
    """A kill while a checkpoint is being written leaves a folder without
    trainer_state.json (the Trainer writes it last): the restart must resume from the
    last complete checkpoint, not crash on the broken one or start over."""
    root, command = training_run["root"], training_run["command"]
    run = root / "half_written"
    checkpoints = run / "checkpoints"
    run.mkdir()
    kill_when(
        command("half_written"),
        root / "half_written.log",
        lambda: complete_checkpoints(checkpoints),
    )
    complete = complete_checkpoints(checkpoints)[-1]
    step = int(complete.name.split("-")[1])
    broken = checkpoints / f"checkpoint-{step + TRAIN_SETTINGS['save_steps']}"
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(complete, broken)
    (broken / "trainer_state.json").unlink()

    log = run_stage(command("half_written"), root / "half_written_resumed.log")
    summary = train_log(run / "model")["summary"]
    assert summary["resumed_from"] is not None, log[-3000:]
    assert Path(summary["resumed_from"]).name == complete.name, log[-3000:]
    assert_same_weights(root / "reference" / "model", run / "model")


# --------------------------------------------------------------------------- generation


def partial_batches(partial: Path) -> int:
    """Finished batches in `<out>.partial.jsonl` (its first line is the run's header)."""
    if not partial.is_file():
        return 0
    lines = partial.read_text().splitlines()
    return max(0, len(lines) - 1)


def test_killed_generation_resumes_to_the_same_samples(tiny_model_dir, tmp_path):
    def command(out: Path) -> list[str]:
        return stage_command(
            "cfs.generate",
            "--model",
            tiny_model_dir,
            "--settings",
            json.dumps(GENERATION_SETTINGS),
            "--out",
            out,
        )

    reference = tmp_path / "reference" / "context_free.jsonl"
    run_stage(command(reference), tmp_path / "reference.log")

    out = tmp_path / "killed" / "context_free.jsonl"
    partial = out.with_name(out.name + ".partial.jsonl")
    kill_when(command(out), tmp_path / "killed.log", lambda: partial_batches(partial) >= 2)
    assert not out.exists(), "the generation ended before it was killed"
    done_before = partial_batches(partial)
    batches = GENERATION_SETTINGS["num_samples"] // 4
    assert 0 < done_before < batches, f"{done_before} of {batches} batches done when killed"

    log = run_stage(command(out), tmp_path / "resumed.log")
    assert "resuming" in log, log[-3000:]
    samples, expected = read_jsonl(out), read_jsonl(reference)
    assert len(samples) == GENERATION_SETTINGS["num_samples"]
    assert samples == expected, "the resumed samples differ from the uninterrupted run's"
    assert not partial.exists(), "the partial file is removed once the output is written"
    provenance = json.loads(out.with_suffix(".provenance.json").read_text())
    expected_provenance = json.loads(reference.with_suffix(".provenance.json").read_text())
    for key in ("prompt_token_id", "num_samples", "num_tokens", "seed", "temperature"):
        assert provenance[key] == expected_provenance[key], key


# --------------------------------------------------------------------------- evaluation


def evaluation_command(tiny_model_dir, out: Path, limit: int) -> list[str]:
    settings = evaluation_settings(
        forgetting=[{"task": "cfs_capitals", "metric": "p_correct,none"}],
        batch_size=1,  # a request a forward: the run is long enough to be killed mid-way
        limit=limit,
        dtype="float32",
    )
    return stage_command(
        "cfs.evaluate", "--model", tiny_model_dir, "--settings", json.dumps(settings), "--out", out
    )


@pytest.fixture(scope="module")
def evaluation_root(tmp_path_factory):
    """A working folder with the repository's tasks and the target's test problems."""
    root = tmp_path_factory.mktemp("resume_eval")
    shutil.copytree(PACKAGE_DIR.parent / "tasks", root / "tasks")
    problems = render(arithmetic_problems(40, seed=2), TEMPLATE)
    write_jsonl(root / "results" / "data" / "add_sub" / "test.jsonl", problems)
    return root


def cached(out: Path) -> int:
    from cfs.request_cache import cached_requests

    caches = list(out.with_name(out.stem + "_cache").glob("*_rank0.db"))
    return cached_requests(Path(str(caches[0]).removesuffix("_rank0.db"))) if caches else 0


def test_killed_evaluation_resumes_from_its_request_cache(tiny_model_dir, evaluation_root):
    """SIGKILL mid-way (a time limit), the same command again: only the requests the cache
    lacks are computed, and the scores are those of an uninterrupted evaluation."""
    root = evaluation_root
    reference = root / "reference" / "eval.json"
    command = evaluation_command(tiny_model_dir, reference, limit=40)
    run_stage(command, root / "reference.log", cwd=root)
    killed = root / "killed" / "eval.json"
    command = evaluation_command(tiny_model_dir, killed, limit=40)
    kill_when(command, root / "killed.log", lambda: cached(killed) >= 20, cwd=root)
    assert not killed.exists(), "the evaluation ended before it was killed"
    done = cached(killed)
    run_stage(command, root / "resumed.log", cwd=root)
    first, second = (json.loads(path.read_text()) for path in (reference, killed))
    total = sum(second["requests"]["per_task"].values())
    assert 0 < done < total, f"{done} of {total} requests cached when killed"
    assert second["requests"]["computed"] == total - done
    # the same numbers: cached answers are the first run's, the rest computed as it did
    assert (second["metrics"], second["items"]) == (first["metrics"], first["items"])
