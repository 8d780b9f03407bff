"""Registries: the facts about the hub that the mixtures must respect, weights of the paper, switches, replay."""

import re

import pytest

from model_exploration.errors import UserError
from model_exploration.sources import (
    build_dataset_configs_s1,
    build_dataset_configs_s2,
    build_dataset_configs_sample,
    load_registry,
)

# Repos that still ship a loading script (datasets 5 refuses them; ../shared/hub-sources.md, their repo trees).
SCRIPT_REPOS = {
    "flax-sentence-embeddings/stackexchange_math_jsonl",
    "flax-sentence-embeddings/stackexchange_title_best_voted_answer_jsonl",
    "flax-sentence-embeddings/stackexchange_titlebody_best_voted_answer_jsonl",
    "ncbi/pubmed",
}


def test_no_source_is_loaded_from_a_script_repo():
    for stage in ("1", "2"):
        for spec in load_registry(stage)[0]:
            if spec.hub in SCRIPT_REPOS:
                assert spec.fetch == "parquet_export", spec.name
    assert not any(s.hub == "ncbi/pubmed" for s in load_registry("2")[0])
    assert next(s for s in load_registry("2")[0] if s.name == "pubmed_baseline").fetch == "pubmed_baseline"


def test_stage2_registry_weights_and_citation_switch():
    specs = {s.name: s for s in build_dataset_configs_s2()}
    assert specs["nasa_sde_st_corpus"].weight == 41
    assert specs["pubmed_baseline"].weight == pytest.approx(41 / 24)
    assert specs["arxiv"].weight == pytest.approx(41 / 2.7) and specs["arxiv"].fetch == "kaggle"
    assert specs["nasa_ads_corpus"].weight == pytest.approx(41 / 2.66)
    assert specs["s2orc_title_abstract"].weight == 1
    assert specs["specter_triplet"].weight == pytest.approx(41 / 5) and specs["specter_triplet"].negative
    assert "s2orc_title_citation" not in specs  # "No Cite" by default
    assert specs["nasa_sde_st_corpus"].unverified and specs["nasa_ads_corpus"].unverified

    scaled = {s.name: s for s in build_dataset_configs_s2(enable=["s2orc_title_citation"], sde_weight_scale=0.75)}
    assert scaled["nasa_sde_st_corpus"].weight == pytest.approx(30.75)
    assert "s2orc_title_citation" in scaled


def test_replay_holds_every_stage1_pair_source_and_triplets_only_when_asked():
    stage1 = build_dataset_configs_s1()
    pairs = {s.name for s in stage1 if s.negative is None}
    triplets = {s.name for s in stage1} - pairs
    assert triplets == {"msmarco_triplet_hard", "trivia_qa_triplet", "nli_for_simcse", "quora_duplicates_triplet"}
    replay = next(s for s in build_dataset_configs_s2() if s.replay_of)
    assert {m.name for m in replay.replay_of} == pairs and replay.rows_per_source == 20000
    everything = next(
        s for s in build_dataset_configs_s2(replay_rows_per_source=0, replay_triplets=True) if s.replay_of
    )
    assert {m.name for m in everything.replay_of} == pairs | triplets and everything.rows_per_source is None
    assert everything.fingerprint() != replay.fingerprint()  # another replay is another cache


def test_sample_registry_is_local_and_unknown_source_names_fail():
    assert all(s.fetch == "jsonl" and s.local_path().exists() for s in build_dataset_configs_sample())
    with pytest.raises(UserError, match="--disable_sources: unknown source"):
        build_dataset_configs_s1(disable=["no_such_source"])


def test_registry_mistakes_are_one_line_errors(tmp_path):
    from model_exploration.sources import build_dataset_configs_file

    cases = {
        "{name: a, loader: jsonl, data_files: x.jsonl, anchor: q, positive: p}": "unknown field(s) ['loader']",
        "{name: a, fetch: ftp, hub: x/y, anchor: q, positive: p}": "has fetch 'ftp'",
        "{name: a, hub: x/y, expand_configs: true, anchor: q, positive: p}": "set fetch: parquet_export",
        "{name: a, fetch: jsonl, data_files: x.jsonl, splits: [train, test], anchor: q, positive: p}": (
            "`splits` applies to hub sources"
        ),
        "{name: a, hub: x/y, split: train, splits: [test], anchor: q, positive: p}": "has both `split` and `splits`",
        "{name: a, hub: x/y, splits: [all, test], anchor: q, positive: p}": "`splits: all` already takes every split",
        "{name: a, hub: x/y, splits: [train, train], anchor: q, positive: p}": "lists a split twice",
    }
    for entry, message in cases.items():
        path = tmp_path / "m.yaml"
        path.write_text(f"sources:\n  - {entry}\n")
        with pytest.raises(UserError, match=re.escape(message)):
            build_dataset_configs_file(path)
    path.write_text("sources:\n  - {name: a, hub: x/y, split: validation, anchor: q, positive: p}\n")
    assert build_dataset_configs_file(path)[0].splits == ("validation",)  # an earlier file's one-split spelling


def test_registries_read_every_split_the_original_concatenated():
    specs = {s.name: s for s in load_registry("1")[0] + load_registry("2")[0]}
    assert specs["squad_v2"].splits == ("train", "validation")
    assert specs["cnn_dailymail"].splits == ("train", "validation", "test")
    assert specs["nasa_sde_st_corpus"].splits == ("all",)  # its splits are not public: every one the repo serves
    others = set(specs) - {"squad_v2", "cnn_dailymail", "nasa_sde_st_corpus"}
    assert all(specs[n].splits == ("train",) for n in others)


def test_a_local_source_cache_key_follows_its_content_not_its_timestamp_or_notes(tmp_path):
    import dataclasses
    import os

    from model_exploration.data import cache_key
    from model_exploration.sources import SourceSpec

    path = tmp_path / "mined.jsonl"
    path.write_text('{"anchor": "a", "positive": "p", "negative": "n"}\n')
    spec = SourceSpec(name="mined", fetch="jsonl", data_files=str(path), negative="negative")
    key = cache_key(spec, None, 42, 20)
    os.utime(path, (1, 1))  # a copy on another node, or a fresh clone: same bytes, another time
    assert cache_key(spec, None, 42, 20) == key
    assert cache_key(dataclasses.replace(spec, mined="1 negative by X", weight=3.0), None, 42, 20) == key
    path.write_text('{"anchor": "a", "positive": "p", "negative": "m"}\n')  # mined again
    assert cache_key(spec, None, 42, 20) != key
