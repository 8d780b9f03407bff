"""End-to-end runs of the entry script on CPU: one process, torchrun with 2 ranks, exact resume, bad input."""

import csv
import json
import subprocess

import pytest
from sentence_transformers import SentenceTransformer

from helpers import ENTRY, PYTHON, REPO_ROOT, subprocess_env
from model_exploration import st_trainer_ddp_hf, unpadded
from model_exploration.benchmarks import load_beir_folder
from model_exploration.evaluation import RetrievalEvaluator

FAKE_TOKEN = "hf_PLANTEDfakeTOKEN0123456789"


def _run(args, cwd=REPO_ROOT, env=None, launcher=None, timeout=600):
    cmd = (launcher or [PYTHON]) + [str(ENTRY)] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env or subprocess_env(), timeout=timeout)


def _common(tiny_model, out, *extra):
    return ["--stage", "sample", "--model_name", tiny_model, "--output_base", out, "--batch_size", 8,
            "--gradient_accumulation_steps", 1, "--wb_mode", "disabled", "--logging_steps", 1, *extra]  # fmt: skip


def _history(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "loss" in h}, state


def test_single_process_run_writes_model_results_and_no_secret(tiny_model, small_beir, tmp_path):
    (tmp_path / ".env").write_text(f"HUGGINGFACE_TOKEN={FAKE_TOKEN}\n")
    out = tmp_path / "runs"
    result = _run(
        _common(tiny_model, out, "--nrows", 64, "--max_steps", 4, "--eval_and_save_steps", 2, "--run_name", "r1",
                "--eval_benchmarks", f"beir:{small_beir}", "--no_custom_lr_scheduler",
                "--lr_scheduler_type", "constant", "--warmup_ratio", 0, "--eval_max_len", 4096),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--eval_max_len 4096 exceeds the 512 tokens this model can embed" in result.stderr  # capped, not a crash
    run = out / "r1"
    results = json.loads((run / "results.json").read_text())
    # the reported rows are those of the saved final model, evaluated again here in this process
    final = SentenceTransformer(str(run / "final"), device="cpu")
    unpadded.enable_unpadded(final)
    assert final.max_seq_length == 512  # saved with the evaluation's length, not the training one (128)
    again = RetrievalEvaluator([load_beir_folder(small_beir)]).compute_rows(final)["beir:scifact_small"]
    for metric in ("mrr@1", "ndcg@5", "ndcg@10", "recall@10", "map@100"):
        assert results["beir:scifact_small"][metric] == pytest.approx(again[metric], abs=1e-6), metric
    table = (run / "results.md").read_text()
    assert "(before)" in table and "| MRR@1 | MRR@5 | NDCG@1 | NDCG@5 | NDCG@10 |" in table
    assert (run / "final" / "modules.json").exists() and (run / "checkpoint-2").exists()
    history, _ = _history(run / "checkpoint-4")
    assert {h["learning_rate"] for h in history.values()} == {2e-5}  # --no_custom_lr_scheduler took effect
    assert all("pairs_per_s" in h and "tokens_per_s" in h for h in history.values())
    assert all(0 < h["mfu"] < 1 and h["model_tflops_per_device"] > 0 for h in history.values())
    assert "eval_validation_val/mean/ndcg@10" in json.dumps(_history(run / "checkpoint-4")[1]["log_history"])
    leaked = [p for p in run.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaked and FAKE_TOKEN not in result.stdout + result.stderr


def test_torchrun_two_ranks_share_one_run_and_evaluate_as_one_process(tiny_model, small_beir, tmp_path):
    """2 ranks, gathered GradCache, same-source batches, pre-tokenized; training at 32 tokens, evaluating at 64:
    both ranks encode their shards at 64 (the length travels with every encode call), so the starting model's
    rows equal one process's rows at 64 (and differ from rows at 32)."""
    out = tmp_path / "runs"
    result = _run(
        _common(tiny_model, out, "--nrows", 64, "--max_steps", 5, "--run_name", "ddp", "--pretokenize",
                "--eval_benchmarks", f"beir:{small_beir}", "--eval_and_save_steps", 5, "--gather_across_devices",
                "--same_source_global_batch", "--mini_batch_size", 4, "--mini_batch_tokens", 256,
                "--model_max_len", 32, "--eval_max_len", 64),
        launcher=[PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = out / "ddp"
    assert (run / "results.json").exists() and (run / "results.md").exists()
    _, state = _history(run / "checkpoint-5")
    # 3 sources x 58 train pairs at batch 8 -> 22 batches per epoch, 11 per rank: 5 steps are 5/11 of an
    # epoch only if the two ranks split the data (a rank training alone would be at 5/22)
    assert state["epoch"] == pytest.approx(5 / 11, abs=1e-3)
    assert list(run.parent.parent.glob("runs/cache/*/tokens-*/_COMPLETE.json"))

    with (run / "results.csv").open() as f:  # the sample stage benchmarks its starting model too
        before = next(r for r in csv.DictReader(f) if r["model"].endswith("(before)") and r["precision"] == "float32")
    model = SentenceTransformer(str(tiny_model), device="cpu")
    unpadded.enable_unpadded(model)  # as in training
    bench = [load_beir_folder(small_beir)]
    at_64 = RetrievalEvaluator(bench, max_seq_length=64).compute_rows(model)["beir:scifact_small"]
    at_32 = RetrievalEvaluator(bench, max_seq_length=32).compute_rows(model)["beir:scifact_small"]
    for metric in ("mrr@1", "mrr@10", "ndcg@1", "ndcg@5", "ndcg@10", "recall@10", "map@100"):
        assert float(before[metric]) == pytest.approx(at_64[metric], abs=1e-6), metric
    assert any(abs(at_64[m] - at_32[m]) > 1e-4 for m in ("ndcg@10", "map@100", "mrr@10"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--stage", "3"], "argument --stage: invalid choice"),
        (
            ["--stage", "sample", "--wb_mode", "disabled", "--resume_checkpoint_path", "/nonexistent/ckpt"],
            "error: --resume_checkpoint_path: /nonexistent/ckpt does not exist",
        ),
        (
            ["--stage", "sample", "--wb_mode", "disabled", "--model_name", "no-such-org/no-such-model"],
            "error: --model_name no-such-org/no-such-model: cannot load it",
        ),
        (["--stage", "sample", "--wb_mode", "online"], "error: --wb_mode online: no W&B key"),
        (
            ["--stage", "sample", "--lr", "1e-5", "--lr_min_custom", "1e-4"],
            "--lr_min_custom must be between 0 and --lr",
        ),
        (["--stage", "sample", "--lr", "0"], "--lr must be > 0"),
        (["--stage", "1", "--stage1_replay_rows", "5"], "apply to --stage 2 only"),
        (
            ["--stage", "sample", "--doc_fields", "title,abstract"],
            "argument --doc_fields: expected fields of title,text",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        code = st_trainer_ddp_hf.main(args + ["--output_base", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("config.yaml"))
