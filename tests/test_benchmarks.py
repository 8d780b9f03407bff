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


def test_train_throughput_compares_every_path_per_architecture_and_reports_its_ratios(tmp_path, capsys):
    report, rows_log = tmp_path / "report.json", tmp_path / "rows.jsonl"
    _script("train_throughput").main(["--arch", "roberta", "modernbert", "--steps", "1", "--warmup", "1",
                                      "--batch_size", "8", "--max_len", "64", "--mini_batch_size", "4",
                                      "--encode_passages", "16", "--encode_batch_size", "8", "--json", str(report),
                                      "--rows_jsonl", str(rows_log)])  # fmt: skip
    out = capsys.readouterr().out
    archs = json.loads(report.read_text())["archs"]
    paths = ("plain mnrl", "plain mnrl pretok", "ours mnrl", "plain cached", "ours cached", "ours cached tok",
             "plain encode", "ours encode", "plain data pipeline", "ours data pipeline")  # fmt: skip
    logged = [json.loads(line) for line in rows_log.read_text().splitlines()]
    assert [(r["arch"], r["path"]) for r in logged] == [(a, p) for a in archs for p in archs[a]["rows"]]
    assert list(archs) == ["roberta", "modernbert"]
    for arch, result in archs.items():
        section = out.split(f"### {arch}\n")[1].split("### ")[0]
        rows = result["rows"]
        assert set(rows) == set(paths)
        rate = {p: rows[p].get("pairs_per_s", rows[p].get("passages_per_s")) for p in paths}
        for path in paths:
            assert rate[path] > 0 and re.search(rf"^\| {path} \| {rate[path]:.1f} ", section, re.M), (arch, path)
        for path in ("plain mnrl", "ours mnrl"):  # the packed path computes no padding, but the batch holds it
            assert 0 < rows[path]["padding_share"] < 1 and 0 < rows[path]["mfu"]
        assert rows["ours mnrl"]["packed"] and not rows["plain mnrl"]["packed"]  # the fast path was switched on
        assert "(skipped: packed)" in section and "(computed)" in section
        assert result["min_cosine"] >= 0.99999  # both encoders embed alike
        expected = (f"{arch}: speedup_train={rate['ours mnrl'] / rate['plain mnrl']:.2f} "
                    f"speedup_model={rate['ours mnrl'] / rate['plain mnrl pretok']:.2f} "
                    f"speedup_cached={rate['ours cached'] / rate['plain cached']:.2f} "
                    f"speedup_encode={rate['ours encode'] / rate['plain encode']:.2f}")  # fmt: skip
        assert expected in section.splitlines()
        summary = re.search(rf"^\| {arch} \| unpadded \| {rate['plain mnrl']:.1f} \| {rate['ours mnrl']:.1f} \| "
                            rf"{rate['ours mnrl'] / rate['plain mnrl']:.2f}x \|", out, re.M)  # fmt: skip
        assert summary, arch


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # one of the measured candidates, by design
def test_packed_attention_candidates_agree_and_ratios_match_their_times(capsys):
    _script("packed_attention").main(["--batch", "6", "--repeats", "1", "--heads", "2", "--head_dim", "8"])
    out = capsys.readouterr().out
    times = dict(re.findall(r"^(\S+)\s+([\d.]+) ms \(fwd\+bwd\)", out, re.M))
    diffs = [float(d) for d in re.findall(r"max diff vs batch-padded (\S+)", out)]
    assert {"batch-padded", "per-sequence", "bucketed", "nested"} <= set(times)
    assert len(diffs) == len(times) and max(diffs) < 1e-4  # every candidate computes the same attention
    ratios = dict(re.findall(r"(\S+)/bucketed=([\d.]+)", out))
    bucketed = float(times["bucketed"])
    for name, ms in times.items():
        ratio = float(ms) / bucketed
        # times print to 0.1 ms and ratios to 0.01: allow what that rounding can move a ratio by
        assert float(ratios[name]) == pytest.approx(ratio, abs=0.006 + 0.05 * (1 + ratio) / bucketed), name


def test_seed_summary_judges_each_run_against_the_plain_fine_tune_of_its_seed():
    def row(float_, hamming, asym):
        return {"beir:scifact": {"ndcg@10": float_, "ubinary": {"ndcg@10": hamming}, "ubinary_asym": {"ndcg@10": asym}}}

    results = {
        "runs/pairs-s1/final": row(0.70, 0.63, 0.68),
        "runs/pairs-s2/final": row(0.60, 0.54, 0.59),
        "runs/eqat-s1/final": row(0.68, 0.665, 0.69),
        "runs/eqat-s2/final": row(0.58, 0.57, 0.594),
        "models/start": row(0.50, 0.45, 0.48),
    }
    table = _script("summarize_seeds").summarize(results, "beir:scifact").splitlines()
    header = [c.strip() for c in table[2].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[4:]}
    eqat = dict(zip(header, cells["eqat"]))
    # per seed: 0.665 / 0.70 = 0.95 and 0.57 / 0.60 = 0.95; 0.69 / 0.70 and 0.594 / 0.60; -0.02 twice
    assert eqat["hamming / plain float"] == "0.9500 ± 0.0000"
    assert (
        eqat["asym / plain float"] == f"{(0.69 / 0.70 + 0.594 / 0.60) / 2:.4f} ± {abs(0.69 / 0.70 - 0.99) / 2**0.5:.4f}"
    )
    assert eqat["float - plain float"] == "-0.0200 ± 0.0000"
    start = dict(zip(header, cells["models/start (start)"]))
    assert start["hamming / plain float"] == "" and start["float"] == "0.5000"  # no seed: no plain twin


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
