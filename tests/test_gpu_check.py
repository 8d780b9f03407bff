"""benchmarks/gpu_check.sh, rehearsed on CPU at tiny shapes through the same script and the same output rules as the
device run (so no change breaks the one call a GPU node gives), its deadline, its refusal without a GPU, and the
closing line's account of failures. The rehearsal's figures are CPU figures and are never read as GPU ones."""

import json
import subprocess
import sys

from helpers import REPO_ROOT, subprocess_env

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def _check(tmp_path, **env):
    environment = subprocess_env() | {"PYTHON": sys.executable, "WHEELS": "none", "SCRATCH": str(tmp_path / "s")}
    environment |= env
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env=environment, timeout=900)  # fmt: skip


def _log(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]


def test_rehearsal_runs_every_step_and_returns_only_small_files(tmp_path):
    result = _check(tmp_path, GPU_CHECK_REHEARSAL="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("versions: python=") and "pyarrow=" in lines[0] and "datasets=" in lines[0]
    assert lines[-1].startswith("gpu_check (CPU rehearsal: no GPU figure): speedup_train=")
    assert lines[-1].endswith("failed: none")
    files = list((tmp_path / "out").rglob("*"))
    # what the device tool brings back: at most 8 files, small; models and runs stayed in the scratch folder
    assert len(files) <= 8 and sum(f.stat().st_size for f in files) < 2**20
    assert {f.name for f in files} == {"gpu_check.jsonl"} | {
        f"{s}.log" for s in ("mnrl", "encode", "probe", "cached", "indus", "sample")
    }
    log = _log(tmp_path)
    steps = [e for e in log if e["kind"] == "step"]
    assert [s["name"] for s in steps] == ["mnrl", "encode", "probe", "cached", "indus", "sample"]
    assert all(s["rc"] == 0 and s["rehearsal"] for s in steps)
    rows = {(e["preset"], e["arch"], e["path"]) for e in log if e["kind"] == "row"}
    for path in ("plain mnrl", "ours mnrl", "plain encode", "ours encode", "plain cached", "ours cached"):
        assert ("bert-base", "bert", path) in rows
    assert {("indus-sde", "roberta", "plain mnrl"), ("indus-sde", "roberta", "ours mnrl")} <= rows
    equal = {e["arch"]: e for e in log if e["kind"] == "equal"}
    assert set(equal) == {"bert", "roberta", "modernbert"} and all(e["ok"] for e in equal.values())
    # CUDA-only checks are skipped on CPU, never reported as passed
    assert all(e["ok"] is None and "no CUDA" in e["skipped"] for e in log if e["kind"] in ("varlen", "syncs"))
    assert any(e["kind"] == "sample_run" and e["mfu"] > 0 for e in log)
    assert list((tmp_path / "s" / "sample_run").glob("*/final/model.safetensors"))  # the run went to scratch


def test_without_a_gpu_and_without_the_rehearsal_flag_it_refuses_in_one_line(tmp_path):
    result = _check(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible to torch; run it on a GPU node, or rehearse on CPU with GPU_CHECK_REHEARSAL=1"
    ]


def test_the_deadline_skips_steps_and_the_closing_line_says_so(tmp_path):
    result = _check(tmp_path, GPU_CHECK_REHEARSAL="1", DEADLINE_SECONDS="30")
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    steps = [e for e in _log(tmp_path) if e["kind"] == "step"]
    assert len(steps) == 6 and all(s["skipped"] for s in steps)
    closing = result.stdout.strip().splitlines()[-1]
    assert "no figure measured" in closing and "skipped (deadline): step mnrl, step encode" in closing


def test_the_closing_line_names_every_failed_check_and_step(tmp_path, monkeypatch):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "out"
    out.mkdir()
    entries = [
        {"kind": "versions", "gpu": "NVIDIA H200"},
        {"kind": "row", "preset": "bert-base", "arch": "bert", "path": "plain mnrl", "pairs_per_s": 700.0},
        {"kind": "row", "preset": "bert-base", "arch": "bert", "path": "ours mnrl", "pairs_per_s": 2100.0,
         "mfu": 0.4, "model_tflops_per_device": 330.0},
        {"kind": "equal", "arch": "modernbert", "ok": False, "error": "RuntimeError: unpadded != stock"},
        {"kind": "step", "name": "cached", "rc": 124, "seconds": 120, "skipped": False},
        {"kind": "step", "name": "sample", "rc": 0, "seconds": 0, "skipped": True},
    ]  # fmt: skip
    (out / "gpu_check.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    monkeypatch.setattr(gpu_check, "REHEARSAL", False)
    assert gpu_check.summary(out, tmp_path / "scratch") == 3
    closing = _log(tmp_path)[-1]["line"]
    assert closing.startswith("gpu_check NVIDIA H200 ") and "speedup_train=3.00" in closing
    assert "mfu_spec=0.334" in closing  # 330 of H200's 989 dense bf16 TFLOP/s
    assert "failed: equal/modernbert, step cached (exit 124); skipped (deadline): step sample" in closing
