"""Run configuration files (--config): flags from YAML, the command line over them, errors in one line, a run's
resolved config.yaml that launches the same run again."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import ENTRY, PYTHON, REPO_ROOT, subprocess_env
from model_exploration import cli, config, st_trainer_ddp_hf
from test_hub import load_script


def _write(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    run_yaml = _write(tmp_path / "run.yaml", {
        "description": "a test run", "stage": "2", "batch_size": 32, "bat": "tanh", "matryoshka_dims": [384, 256],
        "enable_sources": ["s2orc_title_citation", "s2orc_abstract_citation"], "gather_across_devices": True,
        "unpad": False, "pretokenize": False, "sde_weight_scale": 0.75, "doc_fields": "title,text",
        "eval_benchmarks": [], "hub_model_id": None,
    })  # fmt: skip
    args = cli.parse_args(["--config", str(run_yaml), "--batch_size", "16", "--bat_float_weight", "1"])
    assert args.batch_size == 16 and args.bat_float_weight == 1.0  # the command line wins
    assert (args.stage, args.bat, args.matryoshka_dims, args.sde_weight_scale) == ("2", "tanh", [384, 256], 0.75)
    assert args.enable_sources == ["s2orc_title_citation", "s2orc_abstract_citation"]
    assert args.gather_across_devices and not args.unpad and args.pretokenize is False
    assert args.doc_fields == ("title", "text") and args.eval_benchmarks == []
    assert args.config == str(run_yaml)


def test_a_base_file_is_read_first_and_metadata_keys_are_not_flags(tmp_path):
    _write(tmp_path / "base.yaml", {"description": "base", "stage": "2", "weight_decay": 0.0, "bat": "ste"})
    child = _write(tmp_path / "child.yaml", {"description": "child", "base": "base.yaml", "weight_decay": 0.1})
    args = cli.parse_args(["--config", str(child)])
    assert (args.stage, args.bat, args.weight_decay) == ("2", "ste", 0.1)
    assert config.description(child) == "child"
    _write(tmp_path / "base.yaml", {"base": "child.yaml"})
    with pytest.raises(config.UserError, match="loops back"):
        config.load(child)


@pytest.mark.parametrize(
    "mapping, expected",
    [
        ({"bacth_size": 8}, "unknown key 'bacth_size'; did you mean batch_size (--batch_size)?"),
        ({"no_unpad": True}, "unknown key 'no_unpad'; --no_unpad is written unpad: false"),
        ({"gather_across_devices": "yes please"}, "gather_across_devices is a switch"),
        ({"batch_size": [8, 16]}, "batch_size (--batch_size) takes one value, got a list"),
        ({"config": "other.yaml"}, "a config file cannot name another with `config`; use `base: FILE`"),
        ({"run_with": "model_exploration/compare.py"}, "this file is for model_exploration/compare.py"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(mapping, expected, tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {"stage": "sample", **mapping})
    assert st_trainer_ddp_hf.main(["--config", str(bad), "--output_base", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "mapping, expected",
    [
        ({"batch_size": 0}, "argument --batch_size: must be a positive integer"),
        ({"bat": "sigmoid"}, "argument --bat: invalid choice: 'sigmoid'"),
        ({"lr": 0}, "--lr must be > 0"),  # the checks of parse_args, not only argparse's types
        ({"stage": "1", "stage1_replay_rows": 5}, "apply to --stage 2 only"),
    ],
)
def test_config_values_are_checked_as_on_the_command_line(mapping, expected, tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", mapping)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--config", str(bad)])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_the_saved_configuration_parses_back_to_the_same_flags_and_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "planted-wandb-key-123")
    argv = ["--stage", "sample", "--run_name", "r", "--batch_size", "8", "--bat", "tanh", "--matryoshka_dims", "384",
            "256", "--doc_fields", "title,text", "--no_unpad", "--eval_benchmarks", "--gather_across_devices",
            "--wb_entity", "planted-wandb-key-123", "--resume_checkpoint_path", "somewhere"]  # fmt: skip
    args = cli.parse_args(argv)
    path = config.save(args, cli.build_parser(), tmp_path)
    text = path.read_text()
    assert "planted-wandb-key-123" not in text and "wb_entity: '***'" in text
    assert "# Not carried (this launch only): run_name=r, resume_checkpoint_path=somewhere" in text
    assert "model_name: null  # this machine's default; this run: " in text  # the offline model's local path
    again = cli.parse_args(["--config", str(path), "--wb_entity", "planted-wandb-key-123"])
    differ = {k for k in vars(args) if getattr(args, k) != getattr(again, k)}
    assert differ == {"config", "run_name", "resume_checkpoint_path"}


def test_tools_on_the_trainers_parser_take_a_config_too(tmp_path):
    prefetch = load_script(REPO_ROOT / "data_prep" / "prefetch.py")
    recipe = _write(tmp_path / "r.yaml", {"stage": "2", "sde_weight_scale": 0.75, "disable_sources": ["arxiv"]})
    args = cli.parse_args(["--config", str(recipe), "--out", str(tmp_path / "mirror")], prefetch.build_parser())
    assert (args.stage, args.sde_weight_scale, args.disable_sources) == ("2", 0.75, ["arxiv"])


def test_defaults_have_their_flags_type():
    """A saved configuration writes defaults as they are; parsed back they take the flag's type (1 -> 1.0)."""
    for action in cli.build_parser()._actions:
        if action.type is float and action.default is not None:
            assert isinstance(action.default, float), action.dest


def _first_loss(run: Path) -> float:
    state = json.loads(next(run.glob("checkpoint-*/trainer_state.json")).read_text())
    return next(h["loss"] for h in state["log_history"] if h.get("step") == 1 and "loss" in h)


def test_a_finished_runs_config_launches_the_same_run_again(tiny_model, tmp_path):
    """A quickstart-like run (the sample stage, tiny model); its config.yaml alone (plus a run name) launches it
    again: same first-step loss, the same configuration written."""
    out = tmp_path / "runs"
    argv = ["--stage", "sample", "--model_name", tiny_model, "--output_base", out, "--run_name", "first",
            "--batch_size", 8, "--gradient_accumulation_steps", 1, "--nrows", 32, "--max_steps", 2, "--logging_steps",
            1, "--eval_and_save_steps", 2, "--eval_benchmarks", "--lr", "5e-5", "--wb_mode", "disabled"]  # fmt: skip

    def launch(*args) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, str(ENTRY), *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                              env=subprocess_env(), timeout=600)  # fmt: skip

    first = launch(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = out / "first" / config.RUN_CONFIG
    again = launch("--config", saved, "--run_name", "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _first_loss(out / "again") == _first_loss(out / "first")

    def settings(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("#")]

    assert settings(out / "again" / config.RUN_CONFIG) == settings(saved)
