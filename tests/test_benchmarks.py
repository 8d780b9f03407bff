"""The benchmark scripts run end to end at tiny settings, and report what they measured consistently (their
numbers are read by people; speed is never asserted)."""

import importlib.util
import json
import re

import pytest

from helpers import REPO_ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_compares_every_path_and_reports_its_ratios(tmp_path, capsys):
    report = tmp_path / "report.json"
    _script("train_throughput").main(["--steps", "1", "--warmup", "1", "--batch_size", "8", "--max_len", "64",
                                      "--mini_batch_size", "4", "--encode_passages", "16", "--encode_batch_size", "8",
                                      "--json", str(report)])  # fmt: skip
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    paths = ("plain mnrl", "plain mnrl pretok", "ours mnrl", "plain cached", "ours cached", "ours cached tok",
             "plain encode", "ours encode", "plain data pipeline", "ours data pipeline")  # fmt: skip
    assert set(rows) == set(paths)
    rate = {p: rows[p].get("pairs_per_s", rows[p].get("passages_per_s")) for p in paths}
    for path in paths:
        assert rate[path] > 0 and re.search(rf"^\| {path} \| {rate[path]:.1f} ", out, re.M), path
    for path in ("plain mnrl", "ours mnrl"):  # the packed path computes no padding, but the batch holds it
        assert 0 < rows[path]["padding_share"] < 1 and 0 < rows[path]["mfu"]
    assert re.search(r"min cosine (0\.99999\d|1\.000000)", out)  # both encoders embed alike
    expected = (f"speedup_train={rate['ours mnrl'] / rate['plain mnrl']:.2f} "
                f"speedup_model={rate['ours mnrl'] / rate['plain mnrl pretok']:.2f} "
                f"speedup_cached={rate['ours cached'] / rate['plain cached']:.2f} "
                f"speedup_encode={rate['ours encode'] / rate['plain encode']:.2f}")  # fmt: skip
    assert out.strip().splitlines()[-1] == expected


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # one of the measured candidates, by design
def test_packed_attention_candidates_agree_and_ratios_match_their_times(capsys):
    _script("packed_attention").main(["--batch", "6", "--repeats", "1", "--heads", "2", "--head_dim", "8"])
    out = capsys.readouterr().out
    times = dict(re.findall(r"^(\S+)\s+([\d.]+) ms \(fwd\+bwd\)", out, re.M))
    diffs = [float(d) for d in re.findall(r"max diff vs batch-padded (\S+)", out)]
    assert {"batch-padded", "per-sequence", "bucketed", "nested"} <= set(times)
    assert len(diffs) == len(times) and max(diffs) < 1e-4  # every candidate computes the same attention
    ratios = dict(re.findall(r"(\S+)/bucketed=([\d.]+)", out))
    for name, ms in times.items():
        assert float(ratios[name]) == pytest.approx(float(ms) / float(times["bucketed"]), abs=0.06), name


def test_data_scale_measures_every_build_and_extrapolates_from_them(tmp_path, capsys):
    report = tmp_path / "report.json"
    _script("data_scale").main(["--rows", "1000", "2000", "--layouts", "jsonl", "--no_train", "--num_proc", "1",
                                "--work_dir", str(tmp_path), "--json", str(report)])  # fmt: skip
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    assert [(r["layout"], r["rows"]) for r in rows] == [("jsonl", 1000), ("jsonl", 2000)]
    for r in rows:
        assert r["peak_rss"] >= r["peak_private"] > 0 and r["rows_per_s"] == pytest.approx(r["rows"] / r["build_s"])
        assert r["cache_bytes"] > 0 and f"| jsonl | {r['rows']:,} | {r['rows_per_s']:,.0f} |" in out
    slope = (rows[1]["peak_private"] - rows[0]["peak_private"]) / 1000
    expected = (rows[0]["peak_private"] + slope * (64_000_000 - 1000)) / 1e9
    line = re.search(r"^\| jsonl \| 64,000,000 \(extrapolated\) \|.*$", out, re.M).group(0)
    assert line.split("|")[7].strip() == f"{expected:.2f}"  # peak private, on the line through the measured rows
    assert list(tmp_path.iterdir()) == [report]  # sources and caches are deleted


def test_data_scale_reads_the_parquet_layout_and_times_the_first_training_step(tiny_model, tmp_path, capsys):
    report = tmp_path / "report.json"
    _script("data_scale").main(["--rows", "1000", "--layouts", "parquet", "--model", str(tiny_model), "--num_proc",
                                "1", "--first_step_repeats", "1", "--work_dir", str(tmp_path), "--json", str(report)])  # fmt: skip
    (measured,) = json.loads(report.read_text())["rows"]
    assert f"| parquet | 1,000 | {measured['rows_per_s']:,.0f} |" in capsys.readouterr().out
    assert (measured["layout"], measured["rows"]) == ("parquet", 1000) and measured["cache_bytes"] > 0
    assert 0 < measured["first_step_s"] and measured["first_step_all_s"] == [measured["first_step_s"]]
