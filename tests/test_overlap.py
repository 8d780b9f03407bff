"""No benchmark query or judged (query, document) pair is trained on (model_exploration/overlap.py,
data_prep/check_overlap.py): on the bundled real data, on the fixture mirror's Stage-2 mixture (which reads every
split of squad_v2, cnn_dailymail and the NASA SDE corpus, and every Stage-1 source through the replay), and a
planted leak is found."""

import json
import re

from helpers import REPO_ROOT
from test_hub import FIXTURE, load_script

check_overlap = load_script(REPO_ROOT / "data_prep" / "check_overlap.py")


def test_bundled_training_pairs_hold_no_scifact_test_query_or_judged_pair(tmp_path, capsys):
    """The sample stage trains on SciFact train pairs and is evaluated on SciFact test, one corpus for both (as in
    BEIR): documents are shared by design, queries and judged pairs must not be. SciFact lists two claims in both
    splits; data_prep/build_sample_data.py leaves them out."""
    assert check_overlap.main(["--stage", "sample", "--output_base", str(tmp_path), "--num_proc", "1"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\| beir:scifact \| 0 of 300 \| 0 of 339 \| (\d+) of 5183 \(scifact_train \1\) \|$", out, re.M)
    assert row and int(row.group(1)) > 0, out
    assert "no benchmark query or judged pair is trained on" in out


def test_fixture_stage2_with_every_split_trains_on_no_benchmark_query(tmp_path, capsys):
    argv = ["--stage", "2", "--stage1_replay_triplets", "--hub_dir", str(FIXTURE), "--output_base", str(tmp_path),
            "--num_proc", "1", "--eval_benchmarks", "nanobeir", "nasa_smd", "nasa_sde"]  # fmt: skip
    assert check_overlap.main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (nanobeir/\w+|nasa_smd|nasa_sde/\w+) \| 0 of \d+ \| 0 of \d+ \|", out, re.M)
    assert len(rows) == 16, out  # 13 NanoBEIR datasets, NASA SMD, NASA SDE's two qrels files


def test_a_planted_benchmark_query_is_found_in_any_column_and_order(small_beir, tmp_path, capsys):
    query = json.loads((small_beir / "queries.jsonl").read_text().splitlines()[0])
    judged = [line.split("\t") for line in (small_beir / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    doc_id = next(d for q, d, _ in judged if q == query["_id"])
    doc = next(json.loads(line) for line in (small_beir / "corpus.jsonl").read_text().splitlines()
               if json.loads(line)["_id"] == doc_id)  # fmt: skip
    doc_text = (doc["title"] + " " + doc["text"]).strip()
    rows = [
        {"a": "an unrelated question", "p": "an unrelated passage"},
        {"a": doc_text, "p": "  " + query["text"].upper() + " "},
    ]  # reversed, other case and spacing: still it
    (tmp_path / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.yaml").write_text(
        "sources:\n  - {name: planted, fetch: jsonl, data_files: planted.jsonl, anchor: a, positive: p}\n"
    )
    argv = ["--mixture", str(tmp_path / "m.yaml"), "--eval_benchmarks", f"beir:{small_beir}", "--output_base",
            str(tmp_path / "o"), "--max_datapoints_per_src_for_eval", "0", "--num_proc", "1"]  # fmt: skip
    assert check_overlap.main(argv) == 1
    out = capsys.readouterr().out
    assert re.search(
        r"^\| beir:scifact_small \| 1 of 40 \(planted 1\) \| 1 of \d+ \(planted 1\) \| 1 of 340 \(planted 1\) \|$",
        out,
        re.M,
    )
    assert out.strip().endswith("queries or judged pairs trained on: beir:scifact_small")
