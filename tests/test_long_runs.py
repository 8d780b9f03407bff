"""Long-run behaviour: preemption by SIGTERM, and a two-node torchrun rendezvous on this machine."""

import json
import queue
import signal
import socket
import subprocess
import threading
import time

import pytest

from helpers import ENTRY, PYTHON, REPO_ROOT, subprocess_env
from model_exploration.lr_schedule import custom_lr


def _base(tiny_model, out, *extra):
    return [PYTHON, "-u", str(ENTRY), "--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(out),
            "--batch_size", "8", "--gradient_accumulation_steps", "1", "--wb_mode", "disabled", "--logging_steps", "1",
            "--nrows", "48", "--max_datapoints_per_src_for_eval", "0", "--eval_benchmarks", *extra]  # fmt: skip


def _losses_and_lrs(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: (h["loss"], h["learning_rate"]) for h in state["log_history"] if "loss" in h}


SCHEDULE = ("--lr", "1e-3", "--cosine_cycle_steps_custom", "4")  # a ripple every 4 steps: resumed LRs are checkable


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tiny_model, tmp_path):
    """SIGTERM mid-run -> checkpoint at the current step, exit 0; resuming from the run folder continues with the
    same batches, losses and learning rates as an uninterrupted run, and the LRs are the custom schedule's."""
    steps = "30"
    cmd = _base(
        tiny_model, tmp_path, "--max_steps", steps, "--eval_and_save_steps", "1000", "--run_name", "pre", *SCHEDULE
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=REPO_ROOT
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output = []
    while not any("'loss'" in line for line in output):  # training has started: a step was logged
        try:
            output.append(lines.get(timeout=240))
        except queue.Empty:
            proc.kill()
            pytest.fail("no training step logged within 240 s:\n" + "".join(output)[-3000:])
    proc.send_signal(signal.SIGTERM)  # what SLURM sends before it kills a job
    proc.wait(timeout=120)
    time.sleep(0.5)  # the reader thread drains what the process wrote last
    while not lines.empty():
        output.append(lines.get())
    log = "".join(output)
    assert proc.returncode == 0, log[-3000:]
    checkpoints = sorted((tmp_path / "pre").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists(), log[-3000:]
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 0 < stopped < int(steps) and "SIGTERM: saved checkpoint" in log
    assert not (tmp_path / "pre" / "final").exists()

    resumed = subprocess.run(
        _base(tiny_model, tmp_path, "--max_steps", steps, "--resume_checkpoint_path", str(tmp_path / "pre"), *SCHEDULE),
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = subprocess.run(
        _base(tiny_model, tmp_path, "--max_steps", steps, "--eval_and_save_steps", "1000", "--run_name", "full", *SCHEDULE),
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    after = _losses_and_lrs(tmp_path / "pre" / f"checkpoint-{steps}")
    reference = _losses_and_lrs(tmp_path / "full" / f"checkpoint-{steps}")
    # warmup: ceil(0.1 x 30) = 3 steps; HF logs at step s the LR its optimizer step s used: the schedule at s - 1
    schedule = dict(lr_max=1e-3, lr_min=5e-6, warmup_steps=3, total_steps=30, cycle_steps=4, magnitude_fraction=0.1)
    for step in range(stopped + 1, int(steps) + 1):
        assert after[step][1] == pytest.approx(reference[step][1], rel=1e-6), step  # same LR
        assert after[step][1] == pytest.approx(custom_lr(step - 1, **schedule), rel=1e-3), step
        assert after[step][0] == pytest.approx(reference[step][0], abs=1e-4), step  # same batches and weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_rendezvous_on_loopback(tiny_model, tmp_path):
    port = _free_port()
    launcher = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "twonodes"]  # fmt: skip
    args = _base(tiny_model, tmp_path, "--nrows", "64", "--max_steps", "5", "--eval_and_save_steps", "5",
                 "--run_name", "nodes")[1:]  # fmt: skip
    nodes = [
        subprocess.Popen(
            launcher + args[1:],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
            cwd=REPO_ROOT,
        )  # fmt: skip
        for _ in range(2)
    ]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-2000:] for log in logs)
    state = json.loads((tmp_path / "nodes" / "checkpoint-5" / "trainer_state.json").read_text())
    # 3 sources x 64 pairs at batch 8 = 24 batches per epoch: 12 per node if they split it (alone: 5/24)
    assert state["epoch"] == pytest.approx(5 / 12, abs=1e-3)


def _write_mixture(tmp_path, sources):
    lines = ["sources:"]
    for name, rows, weight in sources:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n" for r in rows))
        lines.append(
            f"  - {{name: {name}, fetch: jsonl, data_files: {path.name}, anchor: q, positive: p, weight: {weight}}}"
        )
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("\n".join(lines) + "\n")
    return mixture


def _torchrun(tiny_model, tmp_path, mixture, *extra, timeout=600):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ENTRY),
           "--mixture", str(mixture), "--model_name", str(tiny_model), "--output_base", str(tmp_path / "runs"),
           "--batch_size", "8", "--gradient_accumulation_steps", "1", "--wb_mode", "disabled",
           "--max_datapoints_per_src_for_eval", "0", "--eval_benchmarks", "--run_name", "r", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=timeout)


def test_an_error_on_one_rank_ends_every_rank_quickly(tiny_model, tmp_path):
    mixture = _write_mixture(tmp_path, [("broken", ['{"q": "a", "p": "b"}', '{"q": "unterminated'], 1)])
    # a hang (rank 1 waiting for rank 0's cache until --ddp_timeout_minutes) would run into the subprocess timeout
    result = _torchrun(tiny_model, tmp_path, mixture, "--max_steps", "5", timeout=300)
    assert result.returncode != 0
    assert "malformed JSON at" in result.stderr and "broken.jsonl:2" in result.stderr


def test_resume_from_a_run_folder_skips_unfinished_checkpoints(tmp_path, caplog):
    import argparse

    from model_exploration.st_trainer_ddp_hf import resolve_output_dir
    from model_exploration.training import CHECKPOINT_MARKER

    run = tmp_path / "run"
    for step, files in ((2, ["trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"]),
                        (4, ["trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"]),
                        (6, ["model.safetensors"])):  # fmt: skip
        (run / f"checkpoint-{step}").mkdir(parents=True)
        for name in files:
            (run / f"checkpoint-{step}" / name).write_bytes(b"x")
    (run / "checkpoint-2" / CHECKPOINT_MARKER).write_text(
        json.dumps({"files": ["trainer_state.json", "rng_state_1.pth"]})
    )
    # 4: every rank wrote, but rank 1's file went missing; 6: killed before the ranks finished (no marker)
    (run / "checkpoint-4" / CHECKPOINT_MARKER).write_text(json.dumps({"files": ["rng_state_1.pth", "extra.pth"]}))
    output_dir, checkpoint = resolve_output_dir(argparse.Namespace(resume_checkpoint_path=str(run)))
    assert output_dir == run and checkpoint == str(run / "checkpoint-2")
    assert "checkpoint-6 is incomplete (missing _COMPLETE.json)" in caplog.text
    assert "checkpoint-4 is incomplete (missing extra.pth)" in caplog.text


def test_an_explicit_checkpoint_without_our_marker_resumes_with_a_warning(tmp_path, caplog):
    """A checkpoint of plain HF Trainer (or an older version of this tool) named explicitly: resumed if it holds
    the trainer and RNG state, refused if it does not."""
    import argparse

    from model_exploration.errors import UserError
    from model_exploration.st_trainer_ddp_hf import resolve_output_dir

    checkpoint = tmp_path / "run" / "checkpoint-8"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="checkpoint-8 is incomplete"):
        resolve_output_dir(argparse.Namespace(resume_checkpoint_path=str(checkpoint)))
    for name in ("trainer_state.json", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"x")
    assert resolve_output_dir(argparse.Namespace(resume_checkpoint_path=str(checkpoint))) == (
        checkpoint.parent,
        str(checkpoint),
    )
    assert "has no _COMPLETE.json" in caplog.text


def test_the_marker_lists_every_rank_rng_file_even_before_the_filesystem_shows_it(tmp_path, monkeypatch):
    import types

    from model_exploration import distributed
    from model_exploration.training import CheckpointCompleteCallback, missing_from_checkpoint

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for name in ("trainer_state.json", "rng_state_0.pth"):
        (folder / name).write_bytes(b"x")
    args, state = types.SimpleNamespace(output_dir=str(tmp_path)), types.SimpleNamespace(global_step=4)
    CheckpointCompleteCallback().on_save(args, state, None)
    assert missing_from_checkpoint(folder) == ["rng_state_1.pth", "rng_state_2.pth"]
