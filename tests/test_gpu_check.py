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


STEPS = ["probe", "mnrl", "encode", "cached", "indus", "sample"]


def test_rehearsal_runs_every_step_and_returns_only_small_files(tmp_path):
    result = _check(tmp_path, GPU_CHECK_REHEARSAL="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("versions: python=") and "pyarrow=" in lines[0] and "datasets=" in lines[0]
    assert lines[-1].startswith("gpu_check (CPU rehearsal: no GPU figure): speedup_train_real=")
    assert lines[-1].endswith("failed: none")
    files = list((tmp_path / "out").rglob("*"))
    # what the device tool brings back: at most 8 files, small; models and runs stayed in the scratch folder
    assert len(files) <= 8 and sum(f.stat().st_size for f in files) < 2**20
    assert {f.name for f in files} == {"gpu_check.jsonl"} | {f"{s}.log" for s in STEPS}
    log = _log(tmp_path)
    steps = [e for e in log if e["kind"] == "step"]
    assert [s["name"] for s in steps] == STEPS  # the value checks before any timing
    assert all(s["rc"] == 0 and s["rehearsal"] for s in steps)
    rows = {(e["preset"], e["arch"], e["mix"], e["path"]) for e in log if e["kind"] == "row"}
    for mix in ("real", "synthetic"):
        for path in ("plain mnrl", "plain mnrl pretok", "ours mnrl", "plain encode", "ours encode"):
            assert ("bert-base", "bert", mix, path) in rows
    assert {("bert-base", "bert", "real", "plain cached"), ("bert-base", "bert", "real", "ours cached")} <= rows
    assert {("indus-sde", "roberta", "long", "plain mnrl"), ("indus-sde", "roberta", "long", "ours mnrl")} <= rows
    ratios = [e for e in log if e["kind"] == "ratios"]
    assert all(e["encode_agree"] for e in ratios if "encode" in e["ratios"])
    attention = next(e for e in log if e["kind"] == "attention")
    assert attention["ok"] and set(attention["errors"]) == {"bucketed window=None", "bucketed window=64"}
    equal = {e["arch"]: e for e in log if e["kind"] == "equal"}
    assert set(equal) == {"bert", "roberta", "modernbert", "mpnet"} and all(e["ok"] for e in equal.values())
    assert all(e["unpadded"]["states"] <= 4 * e["stock"]["states"] or e["unpadded"]["states"] <= 1e-4
               for e in equal.values())  # fmt: skip
    # CUDA-only checks are skipped on CPU, never reported as passed
    syncs = [e for e in log if e["kind"] == "syncs"]
    assert len(syncs) == 5 and all(e["ok"] is None and "no CUDA" in e["skipped"] for e in syncs)
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
    assert "no figure measured" in closing and "skipped (deadline): step probe, step mnrl" in closing


def _gpu_check_module():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_the_closing_line_names_every_failure_and_never_reports_an_invalid_speedup(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    out = tmp_path / "out"
    out.mkdir()
    ratio = {"median": 3.0, "p25": 2.9, "p75": 3.1, "bound": 2.0, "of_bound": 1.5}
    entries = [
        {"kind": "versions", "gpu": "NVIDIA H200"},
        {"kind": "row", "preset": "bert-base", "arch": "bert", "mix": "real", "path": "plain mnrl", "pairs_per_s": 700.0},
        {"kind": "row", "preset": "bert-base", "arch": "bert", "mix": "real", "path": "ours mnrl", "pairs_per_s": 2100.0,
         "mfu": 0.4, "model_tflops_per_device": 330.0},
        {"kind": "equal", "arch": "bert", "ok": True},
        {"kind": "equal", "arch": "modernbert", "ok": False, "error": "RuntimeError: unpadded != stock"},
        {"kind": "ratios", "preset": "bert-base", "arch": "bert", "mix": "real", "encode_agree": False,
         "min_cosine": 0.93, "ratios": {"train": ratio, "encode": ratio}},
        {"kind": "ratios", "preset": "indus-sde", "arch": "roberta", "mix": "long", "ratios": {"train": ratio}},
        {"kind": "syncs", "arch": "bert", "cached": False, "ok": True, "syncs_per_step": 1.0},
        {"kind": "step", "name": "cached", "rc": 124, "seconds": 120, "skipped": False},
        {"kind": "step", "name": "sample", "rc": 0, "seconds": 0, "skipped": True},
    ]  # fmt: skip
    (out / "gpu_check.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    monkeypatch.setattr(gpu_check, "REHEARSAL", False)
    assert gpu_check.summary(out, tmp_path / "scratch") == 3
    closing = _log(tmp_path)[-1]["line"]
    assert closing.startswith("gpu_check NVIDIA H200 ") and "speedup_train_real=3.00" in closing
    assert "speedup_encode_real=invalid(encode disagrees: min cosine 0.93)" in closing  # wrong embeddings: no ratio
    assert "indus_speedup_train_long=invalid(equal/roberta did not pass)" in closing  # its equality never ran
    assert "mfu_spec=0.334" in closing  # 330 of H200's 989 dense bf16 TFLOP/s
    assert "syncs_per_step=bert:1.0" in closing
    assert "failed: equal/modernbert, step cached (exit 124); skipped (deadline): step sample" in closing


def test_the_spec_peak_knows_each_gpu_by_its_full_name():
    peak = _gpu_check_module().spec_peak_tflops
    assert peak("NVIDIA H200") == 989 and peak("NVIDIA H200 NVL") == 835
    assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756 and peak("NVIDIA H100 NVL") == 835
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312 and peak("NVIDIA L40S") == 362
    assert peak("NVIDIA GeForce RTX 4090") is None  # unknown: no spec MFU, never a guess


def _wheel(folder, name: str, version: str, files: dict[str, str]):
    """A minimal pure-Python wheel (what pip download brings), its modules given as path -> source."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = files | {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                     f"{dist}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}  # fmt: skip
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_wheels_install_without_pip(tmp_path):
    """An image venv made without pip: the pure-Python wheels are unpacked, data folders where pip puts them."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "alpha", "1.0", {"alpha/__init__.py": "VALUE = 1\n"})
    _wheel(wheels, "beta", "2.0", {"beta-2.0.data/purelib/beta.py": "VALUE = 2\n"})
    site = tmp_path / "site"
    assert _gpu_check_module().install(wheels, site, unpack=True) == "unpacked"
    probe = subprocess.run([sys.executable, "-c", "import alpha, beta; print(alpha.VALUE + beta.VALUE)"],
                           env=subprocess_env() | {"PYTHONPATH": str(site)}, capture_output=True, text=True)  # fmt: skip
    assert probe.stdout.strip() == "3" and not list(site.glob("*.data"))


def test_it_stops_in_one_line_when_sentence_transformers_is_too_old(tmp_path):
    """Wheels that leave an old sentence-transformers first on the path: one line and exit 2 before any step,
    rather than every step dying on an ImportError."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "sentence_transformers", "6.0.1",
           {"sentence_transformers/__init__.py": "__version__ = '6.0.1'\n"})  # fmt: skip
    result = _check(tmp_path, GPU_CHECK_REHEARSAL="1", WHEELS=str(wheels))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpu_check: datasets and sentence-transformers >= 6.2 do not import with ")
    assert not (tmp_path / "out" / "probe.log").exists()
