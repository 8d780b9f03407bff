"""From run to release: the model card of a run holds its results, mixture and command line and no secret; the
final model goes to W&B (WANDB_LOG_MODEL=end, offline, 2 ranks) and to the hub (--push_to_hub, publish.py; the
hub API patched at its boundary, as there is no hub here)."""

import hashlib
import json
import re
import signal
import subprocess
from pathlib import Path

import huggingface_hub
import pytest

from helpers import ENTRY, PYTHON, REPO_ROOT, subprocess_env
from model_exploration import release, st_trainer_ddp_hf
from test_hub import load_script

SECRETS = {
    "HUGGINGFACE_TOKEN": "hf_PLANTEDhubTOKEN0123456789",
    "WANDB_API_KEY": "PLANTEDwandbKEY0123456789abcdef0123456789",
    "KAGGLE_KEY": "PLANTEDkaggleKEY0123456789",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_rank_run_card_holds_results_and_no_secret_and_wandb_offline_has_the_final_model(
    tiny_model, small_beir, tmp_path
):
    """torchrun, 2 ranks, W&B offline with WANDB_LOG_MODEL=end and planted tokens in .env: the card of final/ holds
    the results.json rows, the mixture and the command; the offline run folder holds the final/ folder as an
    artifact, staged once (rank 0); no planted token is in any file of the run, nor in the logs."""
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()) + "WANDB_LOG_MODEL=end\n")
    env = subprocess_env() | {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(tmp_path / "wb_cache"),
                              "WANDB_CONFIG_DIR": str(tmp_path / "wb_config")}  # fmt: skip
    argv = ["--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(tmp_path / "runs"),
            "--run_name", "rel", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--nrows", "48",
            "--max_steps", "2", "--eval_and_save_steps", "2", "--eval_benchmarks", f"beir:{small_beir}",
            "--wb_mode", "offline", "--hub_model_id", "my-org/sde-st-test"]  # fmt: skip
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*launcher, str(ENTRY), *argv], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "rel"
    card = (run / "final" / "README.md").read_text()

    rows = json.loads((run / "results.json").read_text())
    for bench, row in rows.items():
        cells = " | ".join(f"{row[m]:.4f}" for m in ("mrr@1", "mrr@5", "ndcg@1", "ndcg@5", "ndcg@10", "mrr@10"))
        assert f"| {bench} | this model | {cells} | {row['bytes_per_vector']} |" in card
    assert re.search(r"\| beir:scifact_small \| starting model \| \d\.\d{4} ", card)  # the sample stage's start
    assert "Documents are embedded from: beir:scifact_small: title + text." in card
    for source in ("scifact_train", "scitldr_train", "pubmedqa_pqal"):
        assert re.search(rf"\| {source} \| file {source}_?\w*_pairs.jsonl \| 48 \| 1 \| \d+ \| \d+ \|", card), source
    assert "torchrun (2 processes) model_exploration/st_trainer_ddp_hf.py --stage sample" in card
    assert "--run_name rel" in card and 'SentenceTransformer("my-org/sde-st-test")' in card
    assert card.index(release.SECTION_TITLE) < card.index("## Training Details")  # ST's own card, our section in it
    assert "### Framework Versions" in card
    # the configuration it was trained with: beside the card (it travels with the model) and in it
    trained_with = (run / "final" / release.TRAINING_CONFIG).read_text()
    assert trained_with == (run / "config.yaml").read_text() and "batch_size: 8" in trained_with
    assert f"[`{release.TRAINING_CONFIG}`]({release.TRAINING_CONFIG})" in card
    assert trained_with.rstrip("\n") in card

    # W&B offline: the artifact is final/ (its card included), staged inside the run folder, once
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    record = next(offline_runs[0].glob("*.wandb")).read_bytes()
    assert b"model-rel" in record and b"final_model" in record
    staged = [_sha(p) for p in (run / "wandb" / "artifacts" / "staging").iterdir()]
    for name in ("model.safetensors", "README.md", "modules.json", "1_Pooling/config.json"):
        assert staged.count(_sha(run / "final" / name)) == 1, name

    leaked = [p for p in run.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in SECRETS.values())]
    assert not leaked and not any(s in result.stdout + result.stderr for s in SECRETS.values())


class FakeHub:
    """huggingface_hub.HfApi's create_repo / upload_folder, recorded instead of sent."""

    def __init__(self, monkeypatch, fail_create: bool = False):
        self.calls = []

        def create_repo(api, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
            self.calls.append(("create_repo", repo_id, private, exist_ok))
            if fail_create:
                raise OSError("503 Service Unavailable")
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, repo_id, folder_path, allow_patterns=None, commit_message=None, repo_type=None, **kw):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            self.calls.append(("upload_folder", repo_id, Path(folder_path), list(allow_patterns), files))
            return huggingface_hub.CommitInfo(f"https://huggingface.co/{repo_id}/commit/1", "", "", "1")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setenv("HF_TOKEN", SECRETS["HUGGINGFACE_TOKEN"])


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    """In-process runs install the trainer's SIGTERM handler (preemption) in this pytest process: put it back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def _train(tmp_path, tiny_model, *extra):
    return st_trainer_ddp_hf.main(["--stage", "sample", "--model_name", str(tiny_model), "--output_base",
                                   str(tmp_path / "runs"), "--run_name", "hub", "--batch_size", "8",
                                   "--gradient_accumulation_steps", "1", "--nrows", "32", "--max_steps", "2",
                                   "--eval_and_save_steps", "2", "--eval_benchmarks", "--wb_mode", "disabled",
                                   *extra])  # fmt: skip


def test_push_to_hub_and_publish_upload_the_model_folder_to_the_named_repo(tiny_model, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path, tiny_model, "--push_to_hub", "--hub_model_id", "my-org/m", "--hub_private_repo") == 0
    final = tmp_path / "runs" / "hub" / "final"
    model_files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert {"model.safetensors", "modules.json", "README.md", "tokenizer.json"} <= set(model_files)
    # the repo is created before training (a bad token fails at once), then final/ is uploaded as a whole
    assert hub.calls == [
        ("create_repo", "my-org/m", True, True),
        ("create_repo", "my-org/m", True, True),
        ("upload_folder", "my-org/m", final, model_files, model_files),
    ]
    assert release.SECTION_TITLE in (final / "README.md").read_text()

    # publish.py: a checkpoint without its training state; the dry run shows the same files and calls nothing
    publish = load_script(REPO_ROOT / "data_prep" / "publish.py")
    checkpoint = final.parent / "checkpoint-2"
    hub.calls.clear()
    capsys.readouterr()
    assert publish.main([str(checkpoint), "--hub_model_id", "my-org/m-step2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert not hub.calls and "has no benchmark table" in out
    assert re.search(r"left out \(training state\): .*optimizer\.pt.*rng_state\.pth.*scheduler\.pt", out)
    assert publish.main([str(checkpoint), "--hub_model_id", "my-org/m-step2"]) == 0
    (_, repo, private, _), (_, _, folder, sent, _) = hub.calls
    assert (repo, private, folder) == ("my-org/m-step2", False, checkpoint)
    assert "model.safetensors" in sent and "optimizer.pt" not in sent and "trainer_state.json" not in sent
    assert f"  {'model.safetensors':60}" in out and all(f"  {f:60}" in out for f in sent)

    # a run folder means its final/; a card that holds a secret is refused (nothing sent)
    hub.calls.clear()
    (final / "README.md").write_text(f"token {SECRETS['HUGGINGFACE_TOKEN']}\n")
    assert publish.main([str(final.parent), "--hub_model_id", "my-org/m"]) == 2
    assert "README.md hold(s) a secret of your .env; not uploaded" in capsys.readouterr().err and not hub.calls


def test_push_to_hub_fails_before_training_when_the_repo_cannot_be_created(tiny_model, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, fail_create=True)
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path, tiny_model, "--push_to_hub", "--hub_model_id", "my-org/m") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --hub_model_id my-org/m: cannot create or reach the repo (503 Service Unavailable)")
    assert err.endswith("publish later with data_prep/publish.py")
    assert len(hub.calls) == 1 and not (tmp_path / "runs").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id ORG/NAME"),
        (["--push_to_hub", "--hub_model_id", "no-org"], "argument --hub_model_id: expected ORG/NAME"),
        (["--hub_private_repo", "--hub_model_id", "a/b"], "--hub_private_repo applies to --push_to_hub"),
    ],
)
def test_release_flag_mistakes_are_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as info:
        st_trainer_ddp_hf.main(["--stage", "sample", *args])
    assert info.value.code == 2 and expected in capsys.readouterr().err.strip().splitlines()[-1]
