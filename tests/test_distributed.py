"""Numbers that hold at several ranks (2 gloo ranks on CPU): gathered negatives with uneven batches, checkpoints
complete on every rank (evaluation equal to one process's: test_training.py's torchrun run)."""

import json
import shutil
import subprocess

import pytest

from helpers import ENTRY, PYTHON, REPO_ROOT, subprocess_env

TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def worker_report(tiny_model_no_dropout, tmp_path_factory) -> dict:
    """tests/distributed_worker.py, once under torchrun for both tests below."""
    out = tmp_path_factory.mktemp("distributed") / "report.json"
    result = subprocess.run([*TORCHRUN, str(REPO_ROOT / "tests" / "distributed_worker.py"), str(tiny_model_no_dropout),
                             str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_gathered_losses_equal_one_process_on_the_concatenated_batch(worker_report):
    """MNRL, GradCache (by texts and by tokens) and the binary-aware loss, with equal and with unequal halves
    (9 + 3 rows): loss and gradients equal one process's loss on all 12 rows."""
    report = worker_report["losses"]
    for split in ("equal", "unequal"):
        for kind in ("mnrl", "cached", "cached_tokens", "binary"):
            row = report[f"{split}/{kind}"]
            assert row["loss"] == pytest.approx(row["reference_loss"], abs=1e-5), (split, kind)
            assert row["max_grad_diff"] < 1e-5 * max(1.0, row["max_grad"]), (split, kind)
            assert row["grads_compared"] > 10
        # without the gather, each rank's pool is its own part of the batch: another (smaller-pool) loss
        assert abs(report[f"{split}/local_mnrl"] - report[f"{split}/mnrl"]["reference_loss"]) > 1e-3


def test_an_epoch_of_uneven_batches_gathers_exactly(worker_report):
    """Our trainer for one epoch of a 20-row source, a duplicate-heavy source and an oversampled source (batch 8):
    every step's loss equals one process's MNRL on both ranks' batches concatenated, with MNRL and GradCache,
    with and without same-source global batches. sentence-transformers' own gather aborts on gloo at the first
    uneven step (and hangs on NCCL)."""
    report = worker_report["epochs"]
    assert set(report) == {f"{loss}/same_source={s}" for loss in ("mnrl", "cached") for s in (False, True)}
    for variant, row in report.items():
        assert row["steps"] == row["global_steps"] == [6, 6], variant  # round((20 + 36 + 3 x 13) / 8) = 12 batches
        assert row["uneven_steps"] >= 3, variant
        assert row["max_loss_diff"] < 1e-5, variant


def _run(tiny_model, out, *extra, launcher=TORCHRUN):
    cmd = [*launcher, str(ENTRY), "--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(out),
           "--batch_size", "8", "--gradient_accumulation_steps", "1", "--wb_mode", "disabled", "--logging_steps", "1",
           "--nrows", "48", "--max_datapoints_per_src_for_eval", "0", "--num_proc", "1", *extra]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _history(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: (h["loss"], h["learning_rate"]) for h in state["log_history"] if "loss" in h}


def test_a_checkpoint_missing_a_ranks_file_is_skipped_and_the_resume_matches(tiny_model, tmp_path):
    """2 ranks: the newest checkpoint of a finished run lacks rank 1's RNG state; resuming from the run folder
    falls back to the previous complete checkpoint, warns, and matches the uninterrupted run step for step."""
    _run(
        tiny_model,
        tmp_path,
        "--max_steps",
        "6",
        "--eval_and_save_steps",
        "3",
        "--eval_benchmarks",
        "--run_name",
        "full",
    )
    run = tmp_path / "full"
    marker = json.loads((run / "checkpoint-6" / "_COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(
        marker["files"]
    )
    reference = _history(run / "checkpoint-6")
    shutil.copytree(run / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    shutil.copytree(run / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    (tmp_path / "resumed" / "checkpoint-6" / "rng_state_1.pth").unlink()
    result = _run(tiny_model, tmp_path, "--max_steps", "6", "--eval_and_save_steps", "3", "--eval_benchmarks",
                  "--resume_checkpoint_path", str(tmp_path / "resumed"))  # fmt: skip
    assert "checkpoint-6 is incomplete (missing rng_state_1.pth); falling back" in result.stderr
    continued = _history(tmp_path / "resumed" / "checkpoint-6")
    for step in (4, 5, 6):
        assert continued[step][1] == pytest.approx(reference[step][1], rel=1e-6), step  # same LR
        assert continued[step][0] == pytest.approx(reference[step][0], abs=1e-4), step  # same batches, weights, RNG
