import dataclasses
import gzip
import json
import subprocess

import pytest
from datasets import Dataset

from helpers import PYTHON, subprocess_env
from model_exploration import data, fetch
from model_exploration.errors import UserError
from model_exploration.fetch import Mirror
from model_exploration.sampler import make_source_batch_sampler
from model_exploration.sources import SourceSpec


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(path, **kw):
    return SourceSpec(name=kw.pop("name", "local"), fetch="jsonl", data_files=str(path), **kw)


def _raw(spec, tmp_path, nrows=None, offline=True):
    return data.load_raw(spec, Mirror(tmp_path / "mirror", offline=offline), nrows, tmp_path / "work")


def test_column_paths_lists_and_nested_fields():
    row = {"texts": ["a", "b"], "positives": {"docs": ["d0", "d1"]}, "title": "t"}
    assert data.resolve_path(row, "texts[1]") == "b"
    assert data.resolve_path(row, "positives.docs[0]") == "d0"
    with pytest.raises(KeyError):
        data.resolve_path(row, "texts[5]")


def test_pairs_strip_clean_and_count_empty_rows(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [
        {"q": " What? ", "p": "<i>Mitochondria</i>   in\n cells &amp; more"},
        {"q": "", "p": "no query"},
        {"q": "list", "p": ["joined", "sentences"]},
    ])  # fmt: skip
    spec = _spec(path, anchor="q", positive="p", clean="strip_xml")
    pairs, dropped = data.to_pairs(spec, _raw(spec, tmp_path), seed=0)
    assert dropped == 1
    assert pairs["anchor"] == ["What?", "list"]
    assert pairs["positive"] == ["Mitochondria in cells & more", "joined sentences"]


def test_pair_from_list_is_seeded_distinct_and_pairs_a_single_member_with_itself(caplog):
    caplog.set_level("INFO", logger="model_exploration.data")
    raw = Dataset.from_dict({"set": [["a", "b", "c", "d"], ["x", "y"], ["only"], [" "]]})
    spec = SourceSpec(name="wa", hub="x", pair_from_list="set")
    first, dropped = data.to_pairs(spec, raw, seed=7)
    again, _ = data.to_pairs(spec, raw, seed=7)
    assert first["anchor"] == again["anchor"] and first["positive"] == again["positive"]
    assert dropped == 1  # a set with no text
    assert all(a != p for a, p in zip(first["anchor"][:2], first["positive"][:2]))
    assert (first["anchor"][2], first["positive"][2]) == ("only", "only")  # as the original kept it
    assert "1 of 3 kept rows are one-member sets" in caplog.text  # the empty set is dropped first
    # a self pair is one text to the no-duplicates sampler: batched once per pass, never beside another "only"
    batches = list(make_source_batch_sampler(first, batch_size=3))
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2]


def test_unknown_column_names_source_and_columns(tmp_path):
    spec = _spec(_jsonl(tmp_path / "s.jsonl", [{"q": "a", "p": "b"}]), name="mysrc", anchor="q", positive="passage")
    with pytest.raises(UserError, match=r"source 'mysrc': column 'passage' not found \(columns: \['q', 'p'\]\)"):
        data.to_pairs(spec, _raw(spec, tmp_path), seed=0)


def test_all_empty_texts_fail_clearly(tmp_path):
    spec = _spec(_jsonl(tmp_path / "s.jsonl", [{"q": " ", "p": "b"}, {"q": "", "p": "c"}]), anchor="q", positive="p")
    with pytest.raises(UserError, match="all 2 rows have an empty"):
        data.to_pairs(spec, _raw(spec, tmp_path), seed=0)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "a", "p": "b"}\n{"q": "broken"\n')
    with pytest.raises(UserError, match=r"source .local.: malformed JSON at .*bad\.jsonl:2 .*fix or remove that line"):
        _raw(_spec(path, anchor="q", positive="p"), tmp_path)


def test_rows_mixing_types_arrow_cannot_hold_in_one_column_are_read(tmp_path):
    """Text, list, number, null and a missing key in one column, across chunks of the Arrow conversion."""
    path = _jsonl(tmp_path / "s.jsonl", [
        {"q": "first", "p": "a text"},
        {"q": 7, "p": ["a", "list", "of", "texts"]},
        {"q": "third", "p": None},
        {"q": ["joined", "query"], "p": {"nested": "object"}, "extra": [1, "x"]},
        {"q": "fifth"},
    ])  # fmt: skip
    spec = _spec(path, anchor="q", positive="p")
    raw = fetch.read_jsonl_lines([path], None, tmp_path / "work", "source 'local'", chunk_rows=2)
    pairs, dropped = data.to_pairs(spec, raw, seed=0)
    assert dropped == 2  # the null and the missing positive
    assert pairs["anchor"] == ["first", "7", "joined query"]
    assert pairs["positive"] == ["a text", "a list of texts", "{'nested': 'object'}"]


def test_a_glob_of_plain_and_gzipped_files_reads_in_order_and_nrows_reads_only_the_head(tmp_path):
    _jsonl(tmp_path / "part-1.jsonl", [{"q": f"q{i}", "p": f"p{i}"} for i in range(3)])
    with gzip.open(tmp_path / "part-2.jsonl.gz", "wt") as f:
        f.write('{"q": "q3", "p": "p3"}\n\n{"q": "q4", "p": "p4"}\n{"broken\n')
    spec = _spec(tmp_path / "part-*.jsonl*", anchor="q", positive="p")
    head, _ = data.to_pairs(spec, _raw(spec, tmp_path, nrows=5), seed=0)
    assert head["anchor"] == ["q0", "q1", "q2", "q3", "q4"]  # the malformed line after the head is never read
    with pytest.raises(UserError, match=r"source 'local': malformed JSON at .*part-2\.jsonl\.gz:4 "):
        _raw(spec, tmp_path)
    assert "2 file(s)" in Mirror(tmp_path / "mirror", offline=True).describe(spec)[0]
    with pytest.raises(UserError, match=r"source 'local': no file matches .*nothing-\*\.jsonl$"):
        _raw(_spec(tmp_path / "nothing-*.jsonl", anchor="q", positive="p"), tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [(b"\xff\xfe not text", "not UTF-8 text at .*s.jsonl:2; re-encode"),
     (b'["a", "list"]', "expected a JSON object at .*s.jsonl:2, found list")],
)  # fmt: skip
def test_a_line_that_is_not_one_json_object_is_one_line_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"q": "a", "p": "b"}\n' + line + b"\n")
    with pytest.raises(UserError, match=rf"^source 'local': {message}"):
        _raw(_spec(path, anchor="q", positive="p"), tmp_path)


_UNDER_MEMORY_CAP = """
import json, resource, sys
from pathlib import Path
from model_exploration import data
from model_exploration.fetch import Mirror, iter_jsonl
from model_exploration.sources import SourceSpec

def vm_data():
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmData"))

path, cache, headroom = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cap = vm_data() + headroom
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
spec = SourceSpec(name="big", fetch="jsonl", data_files=str(path), anchor="query", positive="passage")
source = data.load_source(spec, cache, None, 1, 20, Mirror(cache / "hub", offline=True))
result = {"train": len(source.train), "validation": len(source.validation)}
try:
    result["held_in_python"] = len(list(iter_jsonl(path, "big")))
except MemoryError:
    result["held_in_python"] = "MemoryError"
print(json.dumps(result))
"""


def test_a_local_source_larger_than_the_memory_cap_builds_its_cache(tmp_path):
    """RLIMIT_DATA caps the heap and private mappings (the Arrow files a build memory-maps are page cache, shared
    and reclaimable, so not counted) at what the process holds after its imports plus 96 MiB. A 150,000-row source
    (120 MB of JSON lines, ~3 times the headroom as Python objects) builds its cache under that cap, and the same
    rows held in Python, as the build did before it streamed, do not fit."""
    path = tmp_path / "big.jsonl"
    passage = " ".join(["mitochondrial membrane potential in isolated cardiomyocytes"] * 13)
    with path.open("w") as f:
        for i in range(150_000):
            f.write(json.dumps({"query": f"query {i} about membranes", "passage": f"{i} {passage}"}) + "\n")
    result = subprocess.run([PYTHON, "-c", _UNDER_MEMORY_CAP, str(path), str(tmp_path / "cache"), str(96 << 20)],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built == {"train": 149_980, "validation": 20, "held_in_python": "MemoryError"}


def test_missing_arxiv_snapshot_says_which_command_to_run(tmp_path):
    spec = SourceSpec(
        name="arxiv", fetch="kaggle", data_files=str(tmp_path / "nope.json"), anchor="title", positive="abstract"
    )
    with pytest.raises(UserError, match="data_prep/download_arxiv.py"):
        _raw(spec, tmp_path)


def test_unreachable_hub_source_is_one_line(tmp_path):
    spec = SourceSpec(name="ghost", hub="no-such-org/no-such-dataset", anchor="a", positive="b")
    with pytest.raises(UserError) as info:  # HF_HUB_OFFLINE=1 here: the hub cannot be reached
        _raw(spec, tmp_path, nrows=5, offline=False)
    message = str(info.value)
    assert "source 'ghost'" in message and "no-such-org/no-such-dataset" in message and "\n" not in message


def test_cache_is_keyed_marked_complete_and_rebuilt_when_half_written(tmp_path):
    rows = [{"q": f"query {i}", "p": f"passage {i}"} for i in range(50)]
    spec = _spec(_jsonl(tmp_path / "s.jsonl", rows), anchor="q", positive="p")
    cache = tmp_path / "cache"
    first = data.load_source(spec, cache, nrows=None, seed=1, max_eval=4)
    assert (len(first.train), len(first.validation)) == (46, 4)
    assert (first.cache_path / data.COMPLETE_MARKER).exists()
    # other nrows / seed / columns -> other cache folders
    assert data.cache_path_for(cache, spec, 10, 1, 4) != first.cache_path
    assert data.cache_path_for(cache, spec, None, 2, 4) != first.cache_path
    assert data.cache_path_for(cache, dataclasses.replace(spec, positive="q"), None, 1, 4) != first.cache_path
    # a build killed before its marker is not trusted: it is rebuilt
    (first.cache_path / data.COMPLETE_MARKER).unlink()
    again = data.load_source(spec, cache, nrows=None, seed=1, max_eval=4)
    assert again.train["anchor"] == first.train["anchor"] and (again.cache_path / data.COMPLETE_MARKER).exists()


def test_validation_split_is_seeded_bounded_and_zero_means_none(tmp_path):
    pairs = Dataset.from_dict({"anchor": [f"a{i}" for i in range(100)], "positive": [f"p{i}" for i in range(100)]})
    train, val = data._split_validation(pairs, 20, seed=5)
    _, val_again = data._split_validation(pairs, 20, seed=5)
    assert len(val) == 10 and val["anchor"] == val_again["anchor"]  # capped at a tenth of the source
    assert not set(train["anchor"]) & set(val["anchor"])
    assert len(data._split_validation(pairs, 0, seed=5)[1]) == 0


def test_a_concurrent_run_that_published_first_is_kept(tmp_path):
    target = tmp_path / "cache" / "src-key"
    target.parent.mkdir()
    first = tmp_path / "first"
    (first / "data").mkdir(parents=True)
    (first / data.COMPLETE_MARKER).write_text('{"who": "first"}')
    data._publish(first, target)
    second = tmp_path / "second"
    (second / "data").mkdir(parents=True)
    (second / data.COMPLETE_MARKER).write_text('{"who": "second"}')
    data._publish(second, target)  # loses the race: the published cache stays as it was
    assert json.loads((target / data.COMPLETE_MARKER).read_text()) == {"who": "first"}


def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path):
    rows = [{"q": f"query {i}", "p": f"passage {i}"} for i in range(30)]
    spec = _spec(_jsonl(tmp_path / "s.jsonl", rows), anchor="q", positive="p")
    first = data.load_source(spec, tmp_path / "cache", nrows=None, seed=1, max_eval=2)
    expected = list(first.train["anchor"])
    for arrow in (first.cache_path / "data").rglob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])  # truncated by a full disk or a killed copy
    again = data.load_source(spec, tmp_path / "cache", nrows=None, seed=1, max_eval=2)
    assert list(again.train["anchor"]) == expected
