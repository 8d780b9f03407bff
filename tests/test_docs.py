"""The README and docs/: short front page, links that resolve, commands that name files that exist, a purpose line
per page, the generated command-line reference, and every recipe of recipes/ dry-run offline."""

import dataclasses
import re
from pathlib import Path

import pytest

from helpers import REPO_ROOT
from model_exploration import cli, cli_reference, compare, config, sources, st_trainer_ddp_hf

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
RECIPES = sorted(p for p in (REPO_ROOT / "recipes").rglob("*.yaml") if "mixtures" not in p.parts)
PAPER_RECIPES = sorted(p for p in RECIPES if re.match(r"\d\d-", p.name))


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: link syntax reduced to its text, lower case, punctuation dropped, spaces to
    hyphens, -1, -2 ... for repeats."""
    seen: dict[str, int] = {}
    for line in _outside_code(path.read_text()):
        if match := re.match(r"#{1,6} (.+)", line):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).strip().lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) < 250


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for line in _outside_code(page.read_text()):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(target)
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{target} (no such heading)")
    assert not broken, broken


def test_every_command_block_of_the_readme_names_files_that_exist():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    named = {
        token.strip("'\"")
        for block in blocks
        for line in block.splitlines()
        for token in line.split("#")[0].split()
        if re.fullmatch(r"[\w./-]+\.(py|yaml|yml|txt|sh|toml|md)", token.strip("'\""))
        and not token.startswith(("/", "..", "-"))
    }
    assert {"requirements.txt", "model_exploration/st_trainer_ddp_hf.py", "recipes/06-indus-sde-st.yaml"} <= named
    assert not [name for name in named if not (REPO_ROOT / name).is_file()]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_docs_page_starts_with_a_one_line_purpose(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2] and lines[3] == "", page.name
    assert lines[2].rstrip().endswith("."), page.name


def test_the_command_line_reference_is_generated_from_the_parsers():
    reference = (REPO_ROOT / "docs" / "cli.md").read_text()
    hint = "docs/cli.md is out of date: python -m model_exploration.cli_reference"
    trainer_section = reference.split(f"## `{cli_reference.TOOLS[0]}`")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in trainer_section.splitlines() if line.startswith("| `--")}
    for action in cli_reference.flag_actions(cli.build_parser()):
        flag = cli_reference.flag_cell(action)
        assert flag in rows, f"{action.option_strings[0]} missing; {hint}"
        assert rows[flag].split(" | ")[1] == cli_reference.default_cell(action), f"{flag}: default differs; {hint}"
    assert reference == cli_reference.render(), hint


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_every_recipe_dry_runs_offline(recipe, tmp_path, capsys):
    described = config.description(recipe)
    assert described, f"{recipe.name}: a recipe says what it is in its description line"
    if config.read(recipe).get("run_with") == compare.COMPARE:
        assert compare.main(["--config", str(recipe), "--dry_run"]) == 0
        out = capsys.readouterr().out
        assert f"config {recipe}: {described}" in out and "precision ubinary" in out
        return
    assert st_trainer_ddp_hf.main(["--config", str(recipe), "--dry_run", "--output_base", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"config: {recipe}: {described}" in out
    assert "flags (those not at their defaults):" in out and "benchmarks: nanobeir nasa_smd nasa_sde" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def _sources(recipe: str) -> dict[str, float]:
    args = cli.parse_args(["--config", str(REPO_ROOT / "recipes" / recipe)])
    return {s.name: s.weight for s in st_trainer_ddp_hf.mixture_specs(args)}


def test_the_paper_recipes_train_on_what_their_rows_say():
    registry = {s.name: s.weight for s in sources.load_registry("2")[0]}
    cite = {"s2orc_title_citation", "s2orc_abstract_citation"}
    full = _sources("03-whole-moon-14.yaml")
    assert set(full) == set(registry) and set(full.values()) == {1}  # citation pairs in, unweighted, no replay
    assert _sources("04-atomic-plasma-15.yaml") == {"nasa_sde_st_corpus": 1, "nasa_ads_corpus": 1}
    no_cite = _sources("05-peach-night-57.yaml")
    assert no_cite == {k: v for k, v in registry.items() if k not in cite}  # the registry's weights, no replay
    best = _sources("06-indus-sde-st.yaml")
    assert best == no_cite | {"stage1_replay": 1.0}
    assert _sources("07-dutiful-thunder-110.yaml")["nasa_sde_st_corpus"] == pytest.approx(41 * 0.75)
    assert "nasa_sde_st_corpus" not in _sources("12-eternal-energy-94.yaml")
    eqat = cli.parse_args(["--config", str(REPO_ROOT / "recipes" / "11-indus-sde-st-eqat.yaml")])
    decay = cli.parse_args(["--config", str(REPO_ROOT / "recipes" / "13-wandering-snowflake-98.yaml")])
    assert (eqat.bat, eqat.model_name, eqat.weight_decay) == ("ste", "nasa-impact/indus-sde-st-v0.2", 0.0)
    assert {k for k in vars(eqat) if getattr(eqat, k) != getattr(decay, k)} == {"config", "weight_decay"}


@pytest.mark.parametrize("mixture", sorted((REPO_ROOT / "recipes" / "mixtures").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_mixtures_are_the_registrys_sources_reweighted(mixture):
    registry = {s.name: s for s in sources.load_registry("2")[0]}
    for spec in sources.build_dataset_configs_file(mixture):
        assert dataclasses.replace(spec, weight=1.0, enabled=True) == dataclasses.replace(
            registry[spec.name], weight=1.0, enabled=True
        ), spec.name


def test_the_docs_list_the_paper_recipes_in_the_tables_order():
    text = (REPO_ROOT / "docs" / "recipes.md").read_text()
    listed = re.findall(r"\]\(\.\./recipes/(\d\d-[\w.-]+\.yaml)\)", text)
    assert listed == [p.name for p in PAPER_RECIPES]
