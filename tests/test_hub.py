"""Every Stage-1 / Stage-2 source and hub benchmark, read in its real schema and layout from the fixture mirror
(tests/fixtures/hub, see tests/fixtures/SOURCES.md) by the code a real run uses; fetching (NCBI over HTTP, the hub
faked by the fixture), prefetch, --hub_dir, --build_caches_only and offline end-to-end runs. `pytest -k hub`."""

import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import threading
from pathlib import Path
from xml.etree import ElementTree

import pyarrow.parquet as pq
import pytest
import yaml

from helpers import ENTRY, PYTHON, REPO_ROOT, subprocess_env
from model_exploration import data, fetch, pubmed, sources, st_trainer_ddp_hf
from model_exploration.errors import UserError
from model_exploration.fetch import Mirror
from model_exploration.sources import build_dataset_configs_file, load_registry

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "hub"
PUBMED_XML = REPO_ROOT / "tests" / "fixtures" / "pubmed-xml"

# The first (anchor, positive[, negative]) each source yields, and how many rows it drops for an empty text.
# A text ending in "…" is a prefix. These are what the hub's real columns hold for the first fixture row.
EXPECTED = {
    "squad_v2": (("When did Beyonce start becoming popular?", "Beyoncé Giselle Knowles-Carter (born September 4, 1981)…"), 0),
    "wikipedia_en": (("Anarchism", "Anarchism is a political philosophy and movement that is sceptical of authority…"), 0),
    "stackexchange_math_titlebody_answer": (("How to determine if 3 points on a 3-D graph are collinear? Let the points…", "From $A(x_1,y_1,z_1)…"), 0),
    "stackexchange_math_title_answer": (("How to determine if 3 points on a 3-D graph are collinear?", "Compute $\\vec{AB}\\times\\vec{AC}$; the points are collinear exactly when it is zero."), 0),
    "stackexchange_title_body": (("How do I find which process is listening on a port?", "A service fails to start because port 8080 is already in use. How can I see which process holds it?"), 1),
    "stackexchange_duplicates_post": (("Why is my ssh agent not forwarded? I set ForwardAgent yes but ssh-add -l on the server says no identities.", "SSH agent forwarding not working. When I connect to my server, ssh-add -l reports no identities."), 0),
    "stackexchange_duplicates_body": (("I set ForwardAgent yes in ~/.ssh/config but the agent is not forwarded.", "ssh-add -l on the remote host says the agent has no identities."), 0),
    "stackexchange_duplicates_title": (("How can I make grep ignore case?", "Case-insensitive search with grep"), 0),
    "natural_questions": (("when did richmond last play in a preliminary final", "Richmond Football Club Richmond began 2017 with 5 straight wins, a feat it had not achieved since 1995."), 0),
    "paq_pairs": (("who founded the city of alexandria in egypt", "Alexander the Great"), 0),
    "gooaq": (("is toprol xl the same as metoprolol?", "Metoprolol succinate is also known by the brand name Toprol XL. It is the extended-release form of metoprolol."), 0),
    "yahoo_answers_title_answer": (("why do cats purr?", "Cats purr when they are content, but also when stressed or hurt; the sound comes from the muscles of the larynx."), 0),
    "msmarco_triplet_hard": (("what is the capital of peru", "Lima is the capital and the largest city of Peru.", "Cusco was the historic capital of the Inca Empire."), 0),
    "trivia_qa_triplet": (("Which Lloyd Webber musical premiered in the US on 10th December 1993?", "Sunset Boulevard (musical) ... The musical opened on Broadway at the Minskoff Theatre in 1993.", "We propose learning to transfer…"), 0),
    "nli_for_simcse": (("A man is playing a guitar on stage.", "A man performs music.", "A man is sleeping at home."), 0),
    "quora_duplicates_triplet": (("How can I be a good geologist?", "What should I do to be a great geologist?", "How can I become a good photographer?"), 0),
    "wikianswers": (("How do you get rid of fruit flies?", "What kills fruit flies?"), 0),
    "eli5": (("why does the moon look bigger near the horizon?", "It is mostly an illusion: your brain compares it with trees and buildings on the horizon."), 0),
    "sentence_compression": (("City council approved a new budget.", "The city council on Tuesday approved a new budget that raises property taxes by two percent."), 0),
    "flickr30k_captions": (("Two young guys with shaggy hair look at their hands while hanging out in the yard.", "Two young men are outside near many bushes."), 0),
    "coco_captions": (("A clock that blends in with the wall hangs in a bathroom.", "A very clean and well decorated empty bathroom."), 0),
    "xsum": (("The full cost of damage in Newton Stewart, one of the areas worst affected, is still being assessed.", "Clean-up operations are continuing across the Scottish Borders after flooding caused by Storm Frank."), 0),
    "agnews": (("Helicopter Crashes in Colombian Drug War, Kills 20", "BOGOTA, Colombia - A U.S.-made helicopter on an anti-drugs mission crashed…"), 0),
    "npr": (("Al-Awlaki's Death Raises Questions About U.S. Tactics", "A joint CIA and U.S. military operation targeted and killed the cleric Anwar al-Awlaki in an air strike this week."), 0),
    "cnn_dailymail": (("Harry Potter star Daniel Radcliffe gets 20M fortune as he turns 18 Monday .\nYoung actor says he has no plans to fritter his cash away .", "LONDON, England (Reuters) -- Harry Potter star Daniel Radcliffe gains access…"), 0),
    "cc_news": (("NASA's Juno spacecraft completes a close flyby of Jupiter", "NASA's Juno spacecraft completed its closest approach to Jupiter on Monday, the agency said."), 0),
    "stackexchange_title_best_voted_answer/astronomy": (("Is there a Stack Exchange icon available?", "Here it is! Dead link: SVG version here."), 0),
    "stackexchange_title_best_voted_answer/cardano": (("Chronic HIV stimulation of B cells…", "Antibody-Based HIV-1 Vaccines…"), 0),
    "stackexchange_titlebody_best_voted_answer/astronomy": (("Is there a Stack Exchange icon available? StackAuth /sites route provides all the site's icons…", "Here it is! Dead link: SVG version here."), 0),
    "stackexchange_titlebody_best_voted_answer/cardano": (("Chronic HIV stimulation of B cells…", "Antibody-Based HIV-1 Vaccines…"), 0),
    "nasa_sde_st_corpus": (("What instrument on Aqua measures sea surface temperature?", "The Moderate Resolution Imaging Spectroradiometer (MODIS) aboard the Aqua satellite…"), 0),
    "pubmed_baseline": (("Magnetic studies of Chromatium flavocytochrome C552. A mechanism for heme-flavin interaction.", "Electron paramagnetic resonance and magnetic susceptibility studies of Chromatium flavocytochrome C552…"), 1),
    "arxiv": (("Calculation of prompt diphoton production cross sections at Tevatron and LHC energies", "A fully differential calculation in perturbative quantum chromodynamics is presented for the production of massive photon pairs at hadron colliders."), 0),
    "nasa_ads_corpus": (("OBSERVATIONS of the APPEARANCES and DISAPPEARANCES OF SATURN's RING in 1789 and 1790", "OBSERVATIONS of the APPEARANCES and DISAPPEARANCES OF SATURN's RING. The ring of Saturn vanished…"), 0),
    "s2orc_title_abstract": (("Depth separation and weight-width trade-offs for sigmoidal neural networks", "Some recent work has shown separation between the expressive power of depth-2 and depth-3 neural networks…"), 0),
    "specter_triplet": (("Integrating children's contributions in the interaction design process", "Designing for or designing with? Informant design for interactive learning environments", "Power Operation in ISD: Technological Frames Perspectives."), 0),
    "s2orc_title_citation": (("Noise Regularization for Conditional Density Estimation", "PatchVAE: Learning Local Latent Codes for Recognition"), 0),
    "s2orc_abstract_citation": (("Existing public face image datasets are strongly biased toward Caucasian faces…", "A Learned Representation for Scalable Vector Graphics"), 0),
}  # fmt: skip


def load_script(path: Path):
    """A script of data_prep/ as a module (they are run as files, not installed)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_mirror() -> Mirror:
    return Mirror(FIXTURE, offline=True, prefetch_hint="python data_prep/prefetch.py --stage 1")


def registry_sources() -> list:
    mirror = fixture_mirror()
    return [m for stage in ("1", "2") for spec in load_registry(stage)[0] for m in mirror.expand(spec)]


def matches(got: str, expected: str) -> bool:
    return got.startswith(expected[:-1]) if expected.endswith("…") else got == expected


@pytest.mark.parametrize("spec", registry_sources(), ids=lambda s: s.name)
def test_hub_source_yields_its_real_texts(spec, tmp_path):
    raw = data.load_raw(spec, fixture_mirror(), None, tmp_path)
    pairs, dropped = data.to_pairs(spec, raw, seed=42)
    texts, expected_dropped = EXPECTED[spec.name]
    first = tuple(pairs[0][c] for c in spec.columns)
    assert len(first) == len(texts) and all(matches(g, e) for g, e in zip(first, texts)), first
    assert dropped == expected_dropped


def test_hub_every_source_is_in_the_fixture_and_expected():
    assert {s.name for s in registry_sources()} == set(EXPECTED)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_hub_wrong_column_fails_with_one_line_naming_source_column_and_split(split, tmp_path):
    mirror_root = tmp_path / "mirror"
    shutil.copytree(FIXTURE / "datasets" / "rajpurkar", mirror_root / "datasets" / "rajpurkar")
    shard = next((mirror_root / "datasets" / "rajpurkar").rglob(f"{split}-*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.rename_columns(["query" if c == "question" else c for c in table.column_names]), shard)
    spec = next(s for s in load_registry("1")[0] if s.name == "squad_v2")
    with pytest.raises(UserError) as info:
        data.to_pairs(spec, data.load_raw(spec, Mirror(mirror_root, offline=True), None, tmp_path / "w"), seed=0)
    message = str(info.value)
    assert message.startswith(
        "source 'squad_v2': column 'question' not found (columns: ['id', 'title', 'context', 'query'"
    )
    assert f"in split '{split}'" in message and "\n" not in message


# ---------------------------------------------------------------- PubMed


def test_hub_pubmed_records_flatten_markup_decode_entities_and_keep_section_labels():
    records = {r["pmid"]: r for path in sorted(PUBMED_XML.glob("*.xml")) for r in pubmed.iter_records(path)}
    assert len(records) == 8
    telomere = records["27797938"]  # structured abstract, <i>, <sub>, <sup>
    assert telomere["title"] == (
        "Leucocyte telomere length, genetic variants at the TERT gene region and risk of pancreatic cancer."
    )
    assert telomere["abstract"].startswith("OBJECTIVE: Telomere shortening occurs as an early event")
    assert " DESIGN: We measured prediagnostic leucocyte telomere length" in telomere["abstract"]
    assert "telomerase reverse transcriptase (TERT) gene region" in telomere["abstract"]
    assert "ptrend=0.048" in telomere["abstract"] and "(linkage disequilibrium r2<0.25)" in telomere["abstract"]
    assert records["30108519"]["title"].startswith('A "Blood Relationship" Between the Overlooked Minimum Lactate')
    assert "(P < 0.001)" in records["11748933"]["abstract"]  # &lt; decoded
    assert "  " not in telomere["abstract"] and "\n" not in telomere["abstract"]
    assert records["12091962"]["abstract"] == ""  # no abstract: the pair builder drops and counts it


def test_hub_pubmed_parsing_streams(tmp_path):
    """A baseline file is parsed as it is read: the first records arrive before a damaged tail is reached."""
    text = (PUBMED_XML / "pubmed2.xml").read_text()
    truncated = tmp_path / "pubmed26n0009.xml"
    truncated.write_text(text[: text.rindex("<PubmedArticle>") + 200])
    records = pubmed.iter_records(truncated)
    assert next(records)["pmid"] == "11748933"
    with pytest.raises(ElementTree.ParseError):
        next(records)


def test_hub_pubmed_baseline_discovery_takes_the_newest_year_and_reads_md5():
    listing = "\n".join(
        f'<a href="{n}">{n}</a>     2026-01-29 14:48   19M'
        for n in ["pubmed25n1274.xml.gz", "pubmed26n0002.xml.gz", "pubmed26n0001.xml.gz", "pubmed26n0001.xml.gz.md5", "README.txt"]
    )  # fmt: skip
    assert pubmed.baseline_files(listing) == ["pubmed26n0001.xml.gz", "pubmed26n0002.xml.gz"]
    assert (
        pubmed.parse_md5("MD5(pubmed26n0001.xml.gz)= 2B09615F8DC1DC37A3DB6BF924E439CA\n")
        == "2b09615f8dc1dc37a3db6bf924e439ca"
    )


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static server that honours Range requests (as NCBI's does) and counts the requests it served."""

    served: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.served.append(self.path)
        path = Path(self.translate_path(self.path))
        if not path.is_file() or "Range" not in self.headers:
            return super().do_GET()
        body = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0])
        if start >= len(body):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture()
def ncbi(tmp_path):
    """A local stand-in for https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/ serving the fixture's baseline files."""
    root = tmp_path / "ncbi"
    (root / "pubmed" / "baseline").mkdir(parents=True)
    listing = []
    for gz in sorted((FIXTURE / "ncbi" / "pubmed" / "baseline").glob("*.xml.gz")):
        shutil.copy(gz, root / "pubmed" / "baseline" / gz.name)
        digest = hashlib.md5(gz.read_bytes()).hexdigest()
        (root / "pubmed" / "baseline" / f"{gz.name}.md5").write_text(f"MD5({gz.name})= {digest}\n")
        listing.append(f'<a href="{gz.name}">{gz.name}</a>\n<a href="{gz.name}.md5">{gz.name}.md5</a>')
    (root / "pubmed" / "baseline" / "index.html").write_text("<pre>\n" + "\n".join(listing) + "\n</pre>\n")
    served: list = []
    handler = type("Handler", (_RangeHandler,), {"served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/pubmed/baseline/", root / "pubmed" / "baseline", served
    server.shutdown()


def test_hub_download_resumes_a_partial_file_and_checks_md5(ncbi, tmp_path):
    base, folder, served = ncbi
    source = folder / "pubmed26n0001.xml.gz"
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / source.name
    dest.parent.mkdir()
    dest.with_name(dest.name + ".part").write_bytes(source.read_bytes()[:100])  # an interrupted download
    fetch.download_url(base + source.name, dest, md5)
    assert dest.read_bytes() == source.read_bytes() and not dest.with_name(dest.name + ".part").exists()
    with pytest.raises(UserError, match="md5 mismatch"):
        fetch.download_url(base + source.name, tmp_path / "out" / "again.xml.gz", "0" * 32)
    assert not (tmp_path / "out" / "again.xml.gz.part").exists()


def test_hub_prefetch_fetches_pubmed_once_and_training_reads_it_offline(ncbi, tmp_path, monkeypatch, capsys):
    prefetch = load_script(REPO_ROOT / "data_prep" / "prefetch.py")
    base, _, served = ncbi
    monkeypatch.setenv("ST_PUBMED_BASELINE_URL", base)
    mixture = tmp_path / "pubmed.yaml"
    mixture.write_text(
        "sources:\n  - {name: pubmed_baseline, fetch: pubmed_baseline, anchor: title, positive: abstract}\n"
    )
    argv = ["--mixture", str(mixture), "--out", str(tmp_path / "mirror"), "--skip_model", "--eval_benchmarks"]
    # a smoke test's share: the first baseline file, recorded as a head, so the full run below fetches the rest
    assert prefetch.main([*argv, "--nrows", "3"]) == 0
    offline = Mirror(tmp_path / "mirror", offline=True)
    pubmed_spec = build_dataset_configs_file(mixture)[0]
    assert [p.name for p in offline.source_files(pubmed_spec, 3).paths] == ["pubmed26n0001.xml.gz"]
    with pytest.raises(UserError, match="holds only its first 3 rows"):
        offline.source_files(pubmed_spec, None)
    assert prefetch.main(argv) == 0
    assert [p.name for p in offline.source_files(pubmed_spec, None).paths] == [
        "pubmed26n0001.xml.gz",
        "pubmed26n0002.xml.gz",
    ]
    first = len(served)
    assert prefetch.main(argv) == 0 and len(served) == first  # complete: nothing fetched again
    spec = load_registry("2")[0][1]
    pairs, dropped = data.to_pairs(
        spec, data.load_raw(spec, Mirror(tmp_path / "mirror", offline=True), None, tmp_path / "w"), 0
    )
    assert (len(pairs), dropped) == (7, 1)
    assert "1 item(s)" in capsys.readouterr().out


# ---------------------------------------------------------------- the hub, faked by the fixture mirror


@pytest.fixture()
def fake_hub(monkeypatch):
    """The hub's file API answered from the fixture mirror: resolution returns the fixture's file lists, downloads
    copy its files, and range reads open them. Exercises plan -> fetch -> manifest -> offline read."""
    calls = {"download": 0}

    def manifest(spec):
        checkout, key = fetch.source_location(spec)
        return checkout, json.loads((FIXTURE / checkout / fetch.MANIFESTS / f"{key}.json").read_text())

    def resolve_hub(spec):
        _, meta = manifest(spec)
        return meta["format"], "abc123", meta["files"]

    def resolve_export(spec):
        return "def456", manifest(spec)[1]["files"]

    def download(repo, path, repo_type, revision, local_dir):
        calls["download"] += 1
        source = next(p for p in (FIXTURE / "datasets" / repo).glob(f"*/{path}"))
        Path(local_dir, path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, Path(local_dir, path))
        return str(Path(local_dir, path))

    class FakeFs:
        def open(self, url, mode):
            repo_and_rev, path = url.removeprefix("datasets/").split("/", 2)[:2], url.split("/", 3)[3]
            repo = "/".join([repo_and_rev[0], repo_and_rev[1].split("@")[0]])
            return next((FIXTURE / "datasets" / repo).glob(f"*/{path}")).open("rb")

    import huggingface_hub

    monkeypatch.setattr(fetch, "_resolve_hub", resolve_hub)
    monkeypatch.setattr(fetch, "_resolve_export", resolve_export)
    monkeypatch.setattr(fetch, "_export_configs", lambda repo: ["astronomy", "cardano"])
    monkeypatch.setattr(fetch, "_hub_splits", lambda spec: manifest(dataclasses.replace(spec, splits=("_splits",)))[1])
    monkeypatch.setattr(fetch, "_fetch_card", lambda *a: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeFs)
    return calls


def test_hub_prefetch_heads_then_whole_files_and_offline_reads(fake_hub, tmp_path):
    squad = next(s for s in load_registry("1")[0] if s.name == "squad_v2")
    best = next(s for s in load_registry("1")[0] if s.name == "stackexchange_title_best_voted_answer")
    online = Mirror(tmp_path / "mirror", offline=False)
    train, validation = online.split_members(squad)
    head = online.source_files(train, nrows=3)
    assert head.head_rows == 3 and pq.read_table(head.paths[0]).num_rows == 3 and fake_hub["download"] == 0
    assert fetch.HEADS in head.paths[0].parts  # apart from the whole file, which the hub client could mistake it for
    online.source_files(validation, nrows=3)

    offline = Mirror(tmp_path / "mirror", offline=True, prefetch_hint="python data_prep/prefetch.py --stage 1")
    assert len(data.load_raw(squad, offline, 2, tmp_path / "w")) == 4  # a smoke test's share of each split is there
    with pytest.raises(UserError, match=r"holds only its first 3 rows in the mirror .*prefetch.py --stage 1 --out"):
        offline.source_files(train, None)  # a full run never trains on a head

    full = online.source_files(train, None)
    assert full.head_rows is None and pq.read_table(full.paths[0]).num_rows == 12 and fake_hub["download"] == 1
    assert fetch.HEADS not in full.paths[0].parts
    members = online.expand(best)
    assert [m.name for m in members] == [f"{best.name}/astronomy", f"{best.name}/cardano"]
    for member in members:
        online.source_files(member)
    pairs, _ = data.to_pairs(members[0], data.load_raw(members[0], offline, None, tmp_path / "w2"), 0)
    assert pairs[0]["anchor"] == EXPECTED[members[0].name][0][0]
    assert [m.name for m in offline.expand(best)] == [m.name for m in members]  # the config list was recorded


def test_hub_offline_run_names_the_missing_source_and_the_prefetch_command(tmp_path, capsys):
    model = FIXTURE / "models" / "nasa-impact" / "indus-sde-st-v0.1"
    code = st_trainer_ddp_hf.main(["--stage", "1", "--hub_dir", str(tmp_path / "empty"), "--model_name", str(model),
                                   "--wb_mode", "disabled", "--output_base", str(tmp_path / "runs"), "--eval_benchmarks"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: source 'squad_v2' is not in the mirror")
    assert err.endswith(f"python data_prep/prefetch.py --stage 1 --out {tmp_path / 'empty'}")
    assert not (tmp_path / "runs").exists()  # nothing written before the inputs are known to be there


# ---------------------------------------------------------------- dry run, replay, benchmarks


def test_hub_dry_run_shows_sources_mirror_state_replay_and_unverified_schemas(capsys):
    assert st_trainer_ddp_hf.main(["--stage", "2", "--hub_dir", str(FIXTURE), "--dry_run"]) == 0
    out = capsys.readouterr().out
    for spec in load_registry("2")[0][:6]:
        assert spec.name in out
    assert out.count("schema unverified") >= 2 and "2 configs, 2 fetched" in out
    # the stand-in default model has INDUS-SDE's architecture: a RoBERTa of 1,026 positions, on the fast path
    assert (
        "model: nasa-impact/indus-sde-st-v0.1: unpadded forward (roberta, positions from row 2; at most 1024 tokens)"
        in out
    )
    assert "replay: 20000 random rows of each of 24 Stage-1 sources" in out
    assert "not replayed (triplet sources; --stage1_replay_triplets adds them): msmarco_triplet_hard" in out
    assert (
        st_trainer_ddp_hf.main(["--stage", "2", "--dry_run", "--stage1_replay_rows", "0", "--stage1_replay_triplets"])
        == 0
    )
    out = capsys.readouterr().out
    assert "replay: every row of each of 28 Stage-1 sources" in out and "not fetched" in out


def test_hub_splits_are_concatenated_counted_and_shown_per_split_by_the_dry_run(tmp_path, capsys):
    """squad_v2 reads train + validation and cnn_dailymail train + validation + test (the original's choice): the
    cache holds every split's rows, records how many each gave, and the dry run shows them per split."""
    mixture = tmp_path / "m.yaml"
    wanted = [s for s in load_registry("1")[0] if s.name in ("squad_v2", "cnn_dailymail")]
    mixture.write_text(yaml.safe_dump({"sources": [sources.registry_entry(s) for s in wanted]}))
    flags = ["--mixture", str(mixture), "--hub_dir", str(FIXTURE), "--cache_dir", str(tmp_path / "cache"),
             "--num_proc", "1", "--max_datapoints_per_src_for_eval", "2"]  # fmt: skip
    assert st_trainer_ddp_hf.main([*flags, "--dry_run"]) == 0
    plan = capsys.readouterr().out
    assert re.search(r"squad_v2 .*splits=train\+validation", plan)
    for key, rows in (("default/train", 12), ("default/validation", 4), ("3.0.0/train", 12),
                      ("3.0.0/validation", 2), ("3.0.0/test", 3)):  # fmt: skip
        assert f"[{key}]: 1 file(s), {rows} rows" in plan, key

    assert st_trainer_ddp_hf.main([*flags, "--build_caches_only"]) == 0
    built = {s.spec.name: s for s in data.load_and_cache_datasets(wanted, tmp_path / "cache", None, 42, 2, None,
                                                                   fixture_mirror())}  # fmt: skip
    squad = built["squad_v2"]
    assert squad.rows_per_split == {"train": 12, "validation": 4}
    assert len(squad.train) + len(squad.validation) + squad.dropped_empty == 16
    assert "In what country is Normandy located?" in list(squad.train["anchor"]) + list(squad.validation["anchor"])
    assert built["cnn_dailymail"].rows_per_split == {"train": 12, "validation": 2, "test": 3}
    capsys.readouterr()
    assert st_trainer_ddp_hf.main([*flags, "--dry_run"]) == 0
    assert "rows read: train 12, validation 4)" in capsys.readouterr().out


def test_hub_splits_all_reads_the_split_list_recorded_in_the_mirror(fake_hub, tmp_path, capsys):
    sde = next(s for s in load_registry("2")[0] if s.name == "nasa_sde_st_corpus")
    assert sde.splits == ("all",)
    assert [m.split for m in fixture_mirror().split_members(sde)] == ["train"]
    offline = Mirror(tmp_path / "mirror", offline=True, prefetch_hint="python data_prep/prefetch.py --stage 2")
    assert offline.describe(sde) == [
        f"{tmp_path / 'mirror' / fetch.hub_checkout(sde.hub, False)} [default/_splits]: split list not fetched (splits: all)"
    ]
    with pytest.raises(UserError, match=r"^source 'nasa_sde_st_corpus' \(splits: all\): the split list of .*"
                                        r"prefetch.py --stage 2 --out"):  # fmt: skip
        offline.split_members(sde)
    online = Mirror(tmp_path / "mirror", offline=False)
    for member in online.split_members(sde):  # listed on the hub, recorded
        online.source_files(member)
    assert [m.split for m in offline.split_members(sde)] == ["train"]
    assert len(data.load_raw(sde, offline, None, tmp_path / "w")) == 12


def test_hub_cache_keys_of_one_split_sources_are_those_before_splits_existed(monkeypatch):
    """Adding `splits` (and the single-member WikiAnswers rule) changes the keys of the sources whose rows changed,
    and no other: a registry format change alone never throws away a week of built caches. (Version 2 of the cache
    layout, source-ordered training rows, renamed every key once; the source fingerprints are what must hold.)"""
    monkeypatch.setattr(data, "CACHE_FORMAT_VERSION", 1)
    keys = {s.name: data.cache_key(s, None, 42, 20) for s in load_registry("1")[0] + load_registry("2")[0]}
    assert keys["gooaq"] == "63a5be212e042553"  # as built by the previous version
    assert keys["specter_triplet"] == "5f32ba86e8a8eb5b"


def test_hub_replay_is_a_seeded_sample_spread_over_each_whole_source(tmp_path):
    picks = data.replay_indices(1000, 20, seed=42, name="trivia_qa_triplet")
    assert picks == sorted(set(picks)) and len(picks) == 20 and max(picks) > 500  # not the head of the file
    assert picks == data.replay_indices(1000, 20, seed=42, name="trivia_qa_triplet")
    assert picks != data.replay_indices(1000, 20, seed=43, name="trivia_qa_triplet")
    assert data.replay_indices(5, 20, 42, "x") == list(range(5))

    from model_exploration.sources import stage1_replay

    replay = stage1_replay(weight=1, rows_per_source=3)
    source = data.load_source(replay, tmp_path / "cache", None, 42, 0, fixture_mirror())
    anchors = set(source.train["anchor"])
    assert len(source.train) <= 3 * 26 and len(anchors) > 26  # three rows of each of 26 expanded pair sources
    squad_rows = data.load_raw(
        next(m for m in replay.replay_of if m.name == "squad_v2"), fixture_mirror(), None, tmp_path
    )
    assert anchors & set(squad_rows["question"][2:])  # sampled beyond the head


def test_hub_nanobeir_rows_equal_sentence_transformers_nanobeir_evaluator(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import NanoBEIREvaluator

    from model_exploration.benchmarks import NANOBEIR_REPO, load_benchmarks
    from model_exploration.evaluation import RetrievalEvaluator

    model = SentenceTransformer(str(FIXTURE / "models" / "nasa-impact" / "indus-sde-st-v0.1"), device="cpu")
    ours = RetrievalEvaluator(load_benchmarks("nanobeir", fixture_mirror()), batch_size=16).compute_rows(model)
    checkout = FIXTURE / fetch.hub_checkout(NANOBEIR_REPO, export=False)
    theirs = NanoBEIREvaluator(dataset_id=str(checkout), batch_size=16, show_progress_bar=False)(model)
    for name, row in ours.items():
        prefix = "NanoBEIR_mean" if name == "nanobeir" else name.split("/")[1]
        for metric in ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10"):
            assert row[metric] == pytest.approx(theirs[f"{prefix}_cosine_{metric}"], abs=1e-4), (name, metric)
    assert len(ours) == 14


def test_hub_nasa_scores_differ_between_document_protocols_exactly_where_titles_are_non_empty(tmp_path):
    """NASA SMD / SDE embed a document's `text` alone by default (the paper's protocol); `title,text` is BEIR's. The
    fixture's SMD titles are all empty and half of its SDE titles are not: only SDE documents, and only those with a
    title, change, and so only SDE's scores."""
    from sentence_transformers import SentenceTransformer

    from model_exploration import compare
    from model_exploration.benchmarks import NASA_SDE_REPO, NASA_SMD_REPO, load_benchmarks
    from model_exploration.evaluation import RetrievalEvaluator

    model_dir = FIXTURE / "models" / "nasa-impact" / "indus-sde-st-v0.1"
    model = SentenceTransformer(str(model_dir), device="cpu")
    with_titles = {}
    for spec, repo in (("nasa_smd", NASA_SMD_REPO), ("nasa_sde", NASA_SDE_REPO)):
        corpus = data.read_jsonl(FIXTURE / fetch.hub_checkout(repo, False) / "corpus.jsonl", spec)
        titled = {d["_id"] for d in corpus if d["title"]}
        with_titles[spec] = len(titled)
        paper = load_benchmarks(spec, fixture_mirror())[0]
        beir = load_benchmarks(spec, fixture_mirror(), ("title", "text"))[0]
        assert (paper.doc_fields, beir.doc_fields) == (("text",), ("title", "text"))
        texts = {d["_id"]: d["text"] for d in corpus}
        assert all(text == texts[i] for i, text in zip(paper.corpus_ids, paper.corpus_texts))
        changed = {i for i, a, b in zip(paper.corpus_ids, paper.corpus_texts, beir.corpus_texts) if a != b}
        assert changed == titled
        rows = [RetrievalEvaluator([b]).compute_rows(model) for b in (paper, beir)]
        differs = any(rows[0][r][m] != rows[1][r][m] for r in rows[0] for m in ("ndcg@10", "mrr@10", "map@100"))
        assert differs == bool(titled), spec
    assert with_titles["nasa_smd"] == 0 and with_titles["nasa_sde"] > 0

    # compare.py: a protocol is part of what a result means, so a re-run under the other one is not skipped
    out = tmp_path / "cmp"
    argv = ["--models", str(model_dir), "--benchmarks", "nasa_sde", "--output_dir", str(out), "--hub_dir",
            str(FIXTURE), "--no_charts"]  # fmt: skip
    assert compare.main(argv) == 0
    first = json.loads((out / "results.json").read_text())[str(model_dir)]["nasa_sde"]
    assert compare.main([*argv, "--doc_fields", "title,text"]) == 0
    second = json.loads((out / "results.json").read_text())[str(model_dir)]["nasa_sde"]
    assert first != second


# ---------------------------------------------------------------- end to end, offline


def _train(tmp_path, *extra, launcher=(PYTHON,), timeout=600):
    cmd = [*launcher, str(ENTRY), "--hub_dir", str(FIXTURE), "--wb_mode", "disabled", "--max_steps", "3",
           "--batch_size", "4", "--gradient_accumulation_steps", "1", "--output_base", str(tmp_path / "runs"),
           "--run_name", "r", "--num_proc", "1", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=timeout)


def _assert_trained_on_every_source(result, tmp_path, sources: set[str], benchmarks: set[str]):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unpadded forward on" in result.stderr  # the default model's architecture (RoBERTa) on the fast path
    plan = dict(re.findall(r"mixture (\S+)\s+weight .* batches/epoch\s+(\d+)", result.stderr))
    assert set(plan) == sources and all(int(n) > 0 for n in plan.values()), plan  # every source has batches
    rows = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    assert benchmarks <= set(rows)
    assert (tmp_path / "runs" / "r" / "final" / "model.safetensors").exists()


def test_hub_stage1_trains_offline_end_to_end(tmp_path):
    result = _train(tmp_path, "--stage", "1")
    stage1 = {m.name for s in load_registry("1")[0] for m in fixture_mirror().expand(s)}
    _assert_trained_on_every_source(result, tmp_path, stage1, {"nanobeir", "nanobeir/NanoSciFact"})


def test_hub_stage2_builds_caches_ahead_then_trains_under_torchrun(tmp_path):
    built = _train(tmp_path, "--stage", "2", "--build_caches_only")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "source caches ready" in built.stdout and "stage1_replay" in built.stdout
    launcher = (PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = _train(tmp_path, "--stage", "2", launcher=launcher)
    assert "building cache" not in result.stderr  # the caches built ahead were used as they are
    stage2 = {s.name for s in load_registry("2")[0] if s.enabled} | {"stage1_replay"}
    _assert_trained_on_every_source(result, tmp_path, stage2, {"nanobeir", "nasa_smd", "nasa_sde", "nasa_sde/qa_pairs"})


@pytest.fixture(autouse=True)
def _quiet_datasets(caplog):
    caplog.set_level(logging.WARNING)
