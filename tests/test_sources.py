"""Registry completeness: every source of the original workflow, with its hub id, config and columns."""

import subprocess

import pytest

from helpers import ENTRY, PYTHON, REPO, subprocess_env
from model_exploration.errors import UserError
from model_exploration.sources import (
    build_dataset_configs_s1,
    build_dataset_configs_s2,
    build_dataset_configs_sample,
    load_registry,
)

STAGE1 = {
    # hub id, config: (anchor, positive, negative)
    ("rajpurkar/squad_v2", None): ("question", "context", None),
    ("wikimedia/wikipedia", "20231101.en"): ("title", "text", None),
    ("flax-sentence-embeddings/stackexchange_math_jsonl", "titlebody_answer"): ("title", "upvoted_answer", None),
    ("flax-sentence-embeddings/stackexchange_math_jsonl", "title_answer"): ("title", "upvoted_answer", None),
    ("flax-sentence-embeddings/stackexchange_title_body_jsonl", None): ("texts[0]", "texts[1]", None),
    ("sentence-transformers/stackexchange-duplicates", "post-post-pair"): ("post1", "post2", None),
    ("sentence-transformers/stackexchange-duplicates", "body-body-pair"): ("body1", "body2", None),
    ("sentence-transformers/stackexchange-duplicates", "title-title-pair"): ("title1", "title2", None),
    ("sentence-transformers/natural-questions", None): ("query", "answer", None),
    ("embedding-data/PAQ_pairs", None): ("set[0]", "set[1]", None),
    ("sentence-transformers/gooaq", None): ("question", "answer", None),
    ("sentence-transformers/yahoo-answers", "title-answer-pair"): ("title", "answer", None),
    ("sentence-transformers/msmarco-msmarco-MiniLM-L6-v3", "triplet-hard"): ("query", "positive", "negative"),
    ("sentence-transformers/trivia-qa-triplet", "triplet-all"): ("anchor", "positive", "negative"),
    ("sentence-transformers/nli-for-simcse", "triplet-all"): ("anchor", "positive", "negative"),
    ("sentence-transformers/quora-duplicates", "triplet-all"): ("anchor", "positive", "negative"),
    ("sentence-transformers/eli5", None): ("question", "answer", None),
    ("sentence-transformers/sentence-compression", None): ("simplified", "text", None),
    ("sentence-transformers/flickr30k-captions", None): ("caption1", "caption2", None),
    ("sentence-transformers/coco-captions", None): ("caption1", "caption2", None),
    ("sentence-transformers/xsum", None): ("article", "summary", None),
    ("sentence-transformers/agnews", None): ("title", "description", None),
    ("sentence-transformers/npr", None): ("title", "body", None),
    ("abisee/cnn_dailymail", "3.0.0"): ("highlights", "article", None),
    ("vblagoje/cc_news", None): ("title", "text", None),
}
EXPANDED = (
    "flax-sentence-embeddings/stackexchange_title_best_voted_answer_jsonl",
    "flax-sentence-embeddings/stackexchange_titlebody_best_voted_answer_jsonl",
)


def test_stage1_registry_has_every_source_with_its_columns():
    specs = build_dataset_configs_s1()
    by_key = {(s.hub, s.config): s for s in specs}
    for key, columns in STAGE1.items():
        assert key in by_key, f"missing Stage-1 source {key}"
        spec = by_key[key]
        assert (spec.anchor, spec.positive, spec.negative) == columns, key
    wikianswers = next(s for s in specs if s.hub == "embedding-data/WikiAnswers")
    assert wikianswers.pair_from_list == "set"
    for hub in EXPANDED:
        spec = next(s for s in specs if s.hub == hub)
        assert spec.expand_configs and (spec.anchor, spec.positive) == ("title_body", "upvoted_answer")
    assert len(specs) == len(STAGE1) + 1 + len(EXPANDED)


def test_stage2_registry_weights_replay_and_citation_switch():
    specs = {s.name: s for s in build_dataset_configs_s2()}
    assert specs["nasa_sde_st_corpus"].weight == 41
    assert (specs["nasa_sde_st_corpus"].anchor, specs["nasa_sde_st_corpus"].positive) == ("query", "context")
    assert specs["pubmed_baseline"].weight == pytest.approx(41 / 24) and specs["pubmed_baseline"].clean == "strip_xml"
    assert specs["arxiv"].weight == pytest.approx(41 / 2.7) and specs["arxiv"].loader == "arxiv_kaggle"
    assert specs["nasa_ads_corpus"].weight == pytest.approx(41 / 2.66)
    assert specs["nasa_ads_corpus"].positive == "positives.docs[0]"
    assert specs["s2orc_title_abstract"].weight == 1
    assert specs["specter_triplet"].weight == pytest.approx(41 / 5) and specs["specter_triplet"].negative
    assert "s2orc_title_citation" not in specs  # "No Cite" by default
    replay = specs["stage1_replay"]
    assert {m.name for m in replay.replay_of} == {s.name for s in build_dataset_configs_s1()}

    scaled = {s.name: s for s in build_dataset_configs_s2(enable=["s2orc_title_citation"], sde_weight_scale=0.75)}
    assert scaled["nasa_sde_st_corpus"].weight == pytest.approx(30.75)
    assert "s2orc_title_citation" in scaled


def test_sample_registry_is_local_and_unknown_source_names_fail():
    assert all(s.loader == "jsonl" and s.local_path().exists() for s in build_dataset_configs_sample())
    with pytest.raises(UserError, match="--disable_sources: unknown source"):
        build_dataset_configs_s1(disable=["no_such_source"])


def test_registries_parse():
    for stage in ("1", "2", "sample"):
        specs, _ = load_registry(stage)
        assert specs


@pytest.mark.parametrize("stage", ["1", "2"])
def test_dry_run_lists_every_source_offline(stage):
    out = subprocess.run(
        [PYTHON, str(ENTRY), "--stage", stage, "--dry_run"], capture_output=True, text=True, env=subprocess_env(),
        cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    specs = build_dataset_configs_s1() if stage == "1" else build_dataset_configs_s2()
    for spec in specs:
        assert spec.name in out.stdout
        if spec.hub and not spec.replay_of:
            assert spec.hub in out.stdout
    assert "cache:" in out.stdout
