"""Long-run behaviour: preemption by SIGTERM, and a two-node torchrun rendezvous on this machine."""

import json
import signal
import socket
import subprocess
import time

import pytest

from helpers import ENTRY, PYTHON, REPO, subprocess_env


def _base(tiny_model, out, *extra):
    return [PYTHON, "-u", str(ENTRY), "--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(out),
            "--batch_size", "8", "--gradient_accumulation_steps", "1", "--wb_mode", "disabled", "--logging_steps", "1",
            "--nrows", "48", "--max_datapoints_per_src_for_eval", "0", "--eval_benchmarks", *extra]  # fmt: skip


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(tiny_model, tmp_path):
    cmd = _base(tiny_model, tmp_path, "--max_steps", "400", "--eval_and_save_steps", "1000", "--run_name", "pre")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=REPO
    )
    output = []
    deadline = time.time() + 240
    for line in proc.stdout:
        output.append(line)
        if "'loss'" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(output) + rest
    assert proc.returncode == 0, log[-3000:]
    checkpoints = sorted((tmp_path / "pre").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and (checkpoints[-1] / "trainer_state.json").exists(), log[-3000:]
    step = int(checkpoints[-1].name.split("-")[1])
    assert 0 < step < 400 and "SIGTERM: saved checkpoint" in log
    assert not (tmp_path / "pre" / "final").exists()
    resumed = subprocess.run(
        _base(tiny_model, tmp_path, "--max_steps", str(step + 2), "--resume_checkpoint_path", str(tmp_path / "pre")),
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((tmp_path / "pre" / f"checkpoint-{step + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2


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
            cwd=REPO,
        )  # fmt: skip
        for _ in range(2)
    ]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-2000:] for log in logs)
    state = json.loads((tmp_path / "nodes" / "checkpoint-5" / "trainer_state.json").read_text())
    # 3 sources x 64 pairs at batch 8 = 24 batches per epoch: 12 per node if they split it (alone: 5/24)
    assert state["epoch"] == pytest.approx(5 / 12, abs=1e-3)
