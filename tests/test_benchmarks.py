"""The benchmark scripts run end to end (tiny settings; their numbers are read by people, not asserted here)."""

import re
import subprocess

from helpers import PYTHON, REPO, subprocess_env


def _run(script, *args):
    result = subprocess.run([PYTHON, str(REPO / "benchmarks" / script), *map(str, args)], capture_output=True,
                            text=True, env=subprocess_env(), timeout=600, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_throughput_compares_every_path_and_ends_with_the_speedups():
    out = _run("train_throughput.py", "--steps", 1, "--warmup", 1, "--batch_size", 8, "--max_len", 64,
               "--mini_batch_size", 4, "--encode_passages", 16, "--encode_batch_size", 8)  # fmt: skip
    for path in ("plain mnrl", "ours mnrl", "plain cached", "ours cached", "plain encode", "ours encode",
                 "plain data pipeline", "ours data pipeline"):  # fmt: skip
        assert re.search(rf"^\| {path} \| \d+\.\d ", out, re.M), path
    assert re.search(r"min cosine 0\.99999\d|min cosine 1\.000000", out)  # both encoders embed alike
    assert re.fullmatch(r"speedup_train=\d+\.\d\d speedup_encode=\d+\.\d\d", out.strip().splitlines()[-1])


def test_packed_attention_candidates_agree():
    out = _run("packed_attention.py", "--batch", 6, "--repeats", 1, "--heads", 2, "--head_dim", 8)
    diffs = [float(d) for d in re.findall(r"max diff vs batch-padded (\S+)", out)]
    assert len(diffs) >= 3 and max(diffs) < 1e-4
    assert "bucketed/bucketed=1.00" in out
