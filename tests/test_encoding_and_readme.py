import re

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from helpers import REPO_ROOT
from model_exploration.encoding import encode_fast, token_budget_batches


def test_token_budget_batches_cover_every_text_once_within_budget():
    lengths = np.array([5, 300, 17, 17, 120, 1, 64, 300])
    batches = token_budget_batches(lengths, token_budget=600)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(len(b) * lengths[b].max() <= 600 for b in batches)
    assert lengths[flat].tolist() == sorted(lengths.tolist(), reverse=True)


def test_fast_encoder_equals_sentence_transformers_encode(tiny_model):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    texts = ["short", "", "a much longer text about mitochondria and cells " * 30, "medium length text here"] * 5
    ours = encode_fast(model, texts, token_budget=256, max_seq_length=64)
    model.max_seq_length = 64
    reference = model.encode(texts, convert_to_tensor=True)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5)


def test_readme_test_command_works_after_set_up_and_is_the_line_ci_runs():
    """A fresh clone has only requirements.txt installed (the set-up command), so the README's one test line must
    install what pytest -n needs itself; .ci/run runs that line verbatim, not a variant of it."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Tests\s+```bash\n(.+?)\n```", readme, re.S).group(1)
    assert "\n" not in block  # one line, copied as a whole
    install, _, run = block.partition(" && ")
    assert install == "python -m pip install -r requirements-dev.txt"
    assert run.startswith("python -m pytest ") and " -n 2 " in f"{run} "
    dev = (REPO_ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^-r requirements.txt$", dev, re.M)
    assert re.search(r"^pytest\b", dev, re.M) and re.search(r"^pytest-xdist\b", dev, re.M)  # -n needs xdist
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert block in ci_lines
