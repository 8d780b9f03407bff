"""The benchmark scripts run end to end at tiny settings, and report what they measured consistently (their
numbers are read by people; speed is never asserted)."""

import importlib.util
import json
import re

import numpy as np
import pytest

from helpers import REPO_ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_interleaves_every_path_and_reports_paired_ratios_with_their_bound(tmp_path, capsys):
    report, rows_log = tmp_path / "report.json", tmp_path / "rows.jsonl"
    _script("train_throughput").main(["--arch", "modernbert", "--mix", "real", "long", "--steps", "3",
                                      "--warmup", "1", "--batch_size", "8", "--max_len", "64", "--mini_batch_size",
                                      "4", "--hidden", "64", "--layers", "2", "--heads", "2", "--intermediate", "128",
                                      "--encode_passages", "16", "--encode_batch_size", "8", "--encode_repeats", "2",
                                      "--profile", "--json", str(report), "--rows_jsonl", str(rows_log)])  # fmt: skip
    out = capsys.readouterr().out
    results = json.loads(report.read_text())["results"]
    paths = ("plain mnrl", "plain mnrl pretok", "ours mnrl", "plain cached", "ours cached", "ours cached tok",
             "plain encode", "ours encode", "plain data pipeline", "ours data pipeline")  # fmt: skip
    logged = [json.loads(line) for line in rows_log.read_text().splitlines()]
    assert [(r["arch"], r["mix"]) for r in results] == [("modernbert", "real"), ("modernbert", "long")]
    expected_log = []
    for r in results:
        expected_log += [("row", r["arch"], r["mix"], p) for p in r["rows"]] + [("ratios", r["arch"], r["mix"], None)]
    assert [(e["kind"], e["arch"], e["mix"], e.get("path")) for e in logged] == expected_log
    for result in results:
        arch, mix, rows, ratios = result["arch"], result["mix"], result["rows"], result["ratios"]
        section = out.split(f"### {arch} ({mix} mix)\n")[1].split("### ")[0]
        assert set(rows) == set(paths)
        for path in paths:
            row = rows[path]
            rate = row.get("pairs_per_s", row.get("passages_per_s"))
            assert rate > 0 and re.search(rf"^\| {path} \| {rate:.1f}", section, re.M), (arch, path)
            if "step_rates" in row:  # the median of the timed steps (3) or passes (2), with its quartiles
                assert len(row["step_rates"]) == (2 if "encode" in path else 3)
                assert row[next(k for k in row if k.endswith("_per_s"))] == pytest.approx(np.median(row["step_rates"]))
        for path in ("plain mnrl", "ours mnrl"):  # the packed path computes no padding, but the batch holds it
            assert 0 < rows[path]["padding_share"] < 1 and 0 < rows[path]["mfu"]
            assert rows[path]["bound"] == pytest.approx(1 / (1 - rows[path]["padding_share"]))
            assert set(rows[path]["profile_ms"]) >= {"data", "encoder forward", "backward", "optimizer"}
        assert rows["ours mnrl"]["packed"] and not rows["plain mnrl"]["packed"]  # the fast path was switched on
        assert "(skipped: packed)" in section and "(computed)" in section and "where a step goes" in section
        for key, ours, plain in (("train", "ours mnrl", "plain mnrl"), ("encode", "ours encode", "plain encode")):
            paired = [a / b for a, b in zip(rows[ours]["step_rates"], rows[plain]["step_rates"])]
            assert ratios[key]["median"] == pytest.approx(np.median(paired))  # same-round ratios, not mixed rounds
            assert ratios[key]["of_bound"] == pytest.approx(ratios[key]["median"] / rows[plain]["bound"])
        assert result["min_cosine"] >= 0.99999 and rows["ours encode"]["agree"]  # both encoders embed alike
        figures = " ".join(f"{name}={ratios[key]['median']:.2f}" for key, name in
                           (("train", "speedup_train"), ("model", "speedup_model"), ("cached", "speedup_cached"),
                            ("encode", "speedup_encode")))  # fmt: skip
        assert f"{arch} {mix}: {figures}" in section.splitlines()
        assert re.search(rf"^\| {arch} \| {mix} \| {rows['plain mnrl']['pairs_per_s']:.1f} \| "
                         rf"{rows['ours mnrl']['pairs_per_s']:.1f} \| {ratios['train']['median']:.2f}x \[", out, re.M)  # fmt: skip


def test_the_length_mixes_are_what_they_say():
    bench = _script("train_throughput")
    anchors, positives = bench.real_pairs()
    real, long = bench.mix_pairs("real", 200, 0), bench.mix_pairs("long", 200, 0)
    assert set(real["anchor"]) <= set(anchors) and set(real["positive"]) <= set(positives)  # the bundled pairs
    assert len(set(zip(real["anchor"], real["positive"]))) == 200  # drawn without replacement while they last
    docs = bench.corpus_docs()
    assert all(any(d.startswith(doc) for doc in docs) for d in long["positive"][:5])  # runs of corpus abstracts
    assert np.mean([len(d) for d in long["positive"]]) > 1.8 * np.mean([len(d) for d in docs])  # 1-4 of them


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
