import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.data_collator import (
    SentenceTransformerDataCollator,
)

from model_exploration import data, pretokenize, tracking
from model_exploration.sources import SourceSpec


def test_pretokenized_batches_equal_on_the_fly_batches_and_pad_per_batch(tiny_model, tmp_path):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    rows = [
        {"anchor": f"short query {i}", "positive": "a longer passage about mitochondria " * (i + 1)} for i in range(6)
    ]
    source = data.SourceData(
        SourceSpec(name="s", hub="x", anchor="anchor", positive="positive"),
        Dataset.from_list(rows), Dataset.from_list(rows[:1]), 0, tmp_path,
    )  # fmt: skip
    tokens, _ = pretokenize.pretokenize_source(source, model.tokenizer, model.max_seq_length)
    assert (tmp_path / next(p.name for p in tmp_path.glob("tokens-*")) / data.COMPLETE_MARKER).exists()
    fast = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer)(list(tokens))
    slow = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)(rows)
    for key in ("anchor_input_ids", "anchor_attention_mask", "positive_input_ids", "positive_attention_mask"):
        assert torch.equal(fast[key], slow[key]), key
    assert fast["positive_input_ids"].shape[1] < model.max_seq_length  # dynamic padding, not to a fixed length
    # a second call reads the cache instead of tokenizing again
    again, _ = pretokenize.pretokenize_source(source, model.tokenizer, model.max_seq_length)
    assert again["anchor"] == tokens["anchor"]


def test_wandb_run_id_is_saved_and_reused(tmp_path):
    first = tracking.resolve_run_id(tmp_path, None)
    assert (tmp_path / tracking.RUN_ID_FILE).read_text() == first
    assert tracking.resolve_run_id(tmp_path, None) == first  # --resume_checkpoint_path alone continues the run
    assert tracking.resolve_run_id(tmp_path, "override1") == "override1"  # --resume_run_id wins


def test_pad_ids_equals_the_tokenizers_padding_on_both_sides(tiny_model):
    tokenizer = SentenceTransformer(str(tiny_model), device="cpu").tokenizer
    rows = [[101, 7, 8, 102], [101, 102], [101, 5, 6, 7, 8, 9, 102]]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        reference = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        ids, mask = pretokenize.pad_ids(rows, tokenizer.pad_token_id, left=side == "left")
        assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"]), side
