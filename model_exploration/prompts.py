"""Prompts (E5's "query: " / "passage: ", BGE's query instruction, Nomic's "search_query: "...): which text is
embedded with which prompt, in training, mining and evaluation, with sentence-transformers' semantics.

sentence-transformers keeps a model's prompts in `model.prompts` (saved in config_sentence_transformers.json) and
applies one by prepending it to the text (`prompt + text`) before tokenizing. With a prompt, its preprocessing also
reports `prompt_length`: the tokenized prompt's length minus a trailing special token (so the leading [CLS] / <s>
counts), which `Pooling(include_prompt=False)` uses to pool only the tokens after it. `encode_query` applies the
prompt named "query", `encode_document` the first of "document", "passage", "corpus" the model has (6.2 always has
a "document", empty unless saved). The trainer's `prompts` argument maps dataset -> column -> prompt; its collator
prepends them and adds `<column>_prompt_length`.

Here:
- the run's prompts: `--query_prompt` / `--document_prompt`, or `--prompts_from_model [QUERY [DOCUMENT]]` (the
  starting model's own, by name), else the mixture file's top-level `query_prompt` / `document_prompt`; a flag that
  contradicts the mixture file is an error, not a silent choice;
- a source's: its own `query_prompt` / `document_prompt` in the mixture, else the run's; the anchor column gets the
  query prompt, the positive and negative columns the document prompt; `document_prompt: query` means "the query
  prompt" (symmetric sources such as duplicate questions); `prompts: {column: text}` sets single columns;
- the model carries the run's prompts as `prompts["query"]` / `prompts["document"]` from the start, so checkpoints
  and final/ save them, and `encode_query` / `encode_document` of the saved model embed as the evaluation did.
Empty text means no prompt. Where this workflow bypasses sentence-transformers' preprocessing (the pre-tokenized
collator, encoding.encode_fast) it prepends the same text and passes the same `prompt_length`
(`prompt_length` below asks sentence-transformers itself), so Pooling treats both paths alike. The unpadded forward
(unpadded.py) needs nothing: it returns token embeddings in the stock [batch, length, hidden] layout, from which
Pooling drops the prompt as on the stock path; GradCache (losses.py) embeds chunks of each column's features and
keeps `prompt_length`, one int per column, whole (both tested).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from model_exploration.errors import UserError
from model_exploration.sources import SourceSpec

logger = logging.getLogger(__name__)

SYMMETRIC = "query"  # `document_prompt: query`: documents get the query prompt
DOCUMENT_NAMES = ("document", "passage", "corpus")  # encode_document's order
ST_CONFIG = "config_sentence_transformers.json"


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A query prompt and a document prompt ("" = none; `document` may be SYMMETRIC), and where they came from."""

    query: str = ""
    document: str = ""
    origin: str = "none"

    @property
    def document_text(self) -> str:
        return self.query if self.document == SYMMETRIC else self.document

    def describe(self) -> str:
        if not self.query and not self.document_text:
            return "none"
        return f"query {self.query!r}, document {self.document_text!r} ({self.origin})"


def own_prompts(
    model_prompts: dict[str, str], who: str, flag: str, query_name: str | None = None, document_name: str | None = None
) -> Prompts:
    """A model's own query and document prompts: by name where given, else those encode_query / encode_document
    apply ("query"; the first of "document", "passage", "corpus"). A name the model lacks is a one-line error."""

    def named(name: str) -> str:
        if name not in model_prompts:
            have = ", ".join(f"{k} ({v!r})" for k, v in model_prompts.items()) or "none"
            raise UserError(f"{flag}: {who} has no prompt named {name!r}; its prompts: {have}")
        return model_prompts[name] or ""

    query = named(query_name) if query_name else model_prompts.get("query") or ""
    if document_name:
        document = named(document_name)
    else:
        document = next((model_prompts[n] for n in DOCUMENT_NAMES if n in model_prompts), None) or ""
        unused = {n: model_prompts[n] for n in DOCUMENT_NAMES[1:] if model_prompts.get(n)}
        if not document and unused:  # sentence-transformers 6.2 always has a "document" prompt, empty unless saved
            name = next(iter(unused))
            logger.warning("%s: encode_document applies its empty 'document' prompt, not %s; to use %r name it: "
                           "--prompts_from_model query %s (training), --document_prompt_name %s (compare.py)", who,
                           unused, name, name, name)  # fmt: skip
    return Prompts(query, document, f"{who}'s own")


def saved_prompts(location: str) -> dict[str, str] | None:
    """The prompts a SentenceTransformer saved, as it loads them ("query" and "document" always there, empty unless
    saved), read without loading the model: from a local folder, or a hub id's files in the Hugging Face cache;
    None if its files are not here."""
    path = Path(location) / ST_CONFIG
    if not path.exists() and not (Path(location) / "modules.json").exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(location), ST_CONFIG)
        except ValueError:  # not a hub id
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    saved = json.loads(path.read_text()).get("prompts") if path.exists() else None
    return {"query": "", "document": ""} | {k: v or "" for k, v in (saved or {}).items()}


def run_prompts(args, mixture_defaults: tuple[str | None, str | None], model_prompts: dict[str, str] | None) -> Prompts:
    """The run's prompts (module docstring): flags, the starting model's (`model_prompts`, needed only with
    --prompts_from_model), or the mixture's defaults."""
    mixture_query, mixture_document = mixture_defaults
    if args.prompts_from_model is not None:
        if model_prompts is None:
            raise UserError(
                f"--prompts_from_model: the saved prompts of --model_name {args.model_name} are not available "
                "offline yet (they are read once the model is fetched)"
            )
        names = list(args.prompts_from_model) + [None, None]
        chosen = own_prompts(model_prompts, f"the model {args.model_name}", "--prompts_from_model", *names[:2])
        flags = {"query": chosen.query, "document": chosen.document}
        flag_names = {"query": "--prompts_from_model", "document": "--prompts_from_model"}
    else:
        flags = {"query": args.query_prompt, "document": args.document_prompt}
        flag_names = {"query": "--query_prompt", "document": "--document_prompt"}
    for side, mixture in (("query", mixture_query), ("document", mixture_document)):
        if flags[side] is not None and mixture is not None and flags[side] != mixture:
            raise UserError(
                f"{flag_names[side]} gives the {side} prompt {flags[side]!r}, the mixture's {side}_prompt is "
                f"{mixture!r}; set it in one place"
            )
    if args.prompts_from_model is not None:
        return dataclasses.replace(chosen, origin=f"--prompts_from_model: {chosen.origin}")
    query = flags["query"] if flags["query"] is not None else mixture_query
    document = flags["document"] if flags["document"] is not None else mixture_document
    origins = [flag_names[side] if flags[side] is not None else "the mixture file" for side, value in
               (("query", query), ("document", document)) if value]  # fmt: skip
    return Prompts(query or "", document or "", " / ".join(dict.fromkeys(origins)) or "none")


def source_prompts(spec: SourceSpec, run: Prompts) -> dict[str, str]:
    """Column -> prompt ("" = none) for every output column of a source."""
    query = spec.query_prompt if spec.query_prompt is not None else run.query
    document = spec.document_prompt if spec.document_prompt is not None else run.document
    document = query if document == SYMMETRIC else document
    out = {column: query if column == "anchor" else document for column in spec.columns}
    return out | dict(spec.prompts)


def trainer_prompts(per_source: dict[str, dict[str, str]]) -> dict[str, dict[str, str]] | None:
    """The trainer's `prompts` argument (dataset -> column -> prompt) with the non-empty prompts; None if none."""
    nested = {name: {c: p for c, p in columns.items() if p} for name, columns in per_source.items()}
    nested = {name: columns for name, columns in nested.items() if columns}
    return nested or None


def prompt_length(preprocess, prompt: str | None) -> int | None:
    """sentence-transformers' `prompt_length` of `prompt` (`preprocess`: a model's `preprocess`, which measures and
    caches it: the tokenized prompt minus a trailing special token); None without a prompt."""
    if not prompt:
        return None
    return preprocess([""], prompt=prompt).get("prompt_length")


def set_model_prompts(model, run: Prompts) -> None:
    """Give the model the run's prompts as `query` / `document` (what encode_query / encode_document apply, and
    what model.save writes). A starting model's own different prompts are replaced, with a warning: a model saved
    with prompts it was not trained and evaluated with would embed differently from how it was scored."""
    own = {name: model.prompts[name] for name in ("query", *DOCUMENT_NAMES) if model.prompts.get(name)}
    if own and (own.get("query", ""), own.get("document", "")) != (run.query, run.document_text):
        logger.warning("the starting model's own prompts %s give way to this run's (%s) as `query` / `document`; "
                       "--prompts_from_model trains with them", own, run.describe())  # fmt: skip
    model.prompts["query"] = run.query
    model.prompts["document"] = run.document_text


def describe_columns(columns: dict[str, str]) -> str:
    """`anchor 'query: ' | positive, negative 'passage: '` (columns sharing a prompt together), or `none`."""
    groups: dict[str, list[str]] = {}
    for column, prompt in columns.items():
        groups.setdefault(prompt, []).append(column)
    if not any(groups):
        return "none"
    return " | ".join(f"{', '.join(cols)} {prompt!r}" for prompt, cols in groups.items())


def card_section(run: Prompts, per_source: dict[str, dict[str, str]]) -> str:
    """The model card's lines on prompts: the saved query / document prompts and any source that differed."""
    lines = ["### Prompts", ""]
    if not run.query and not run.document_text:
        lines.append("Trained and evaluated without prompts (the saved `query` and `document` prompts are empty).")
    else:
        lines.append(
            f"Queries were embedded with the prompt `{run.query!r}` and documents with `{run.document_text!r}`, in "
            "training and evaluation; they are saved as this model's `query` and `document` prompts, so "
            "`model.encode_query(...)` and `model.encode_document(...)` apply them."
        )
    expected = {"query": run.query, "document": run.document_text}
    other = {
        name: cols
        for name, cols in per_source.items()
        if any(p != expected["query" if c == "anchor" else "document"] for c, p in cols.items())
    }
    if other:
        lines += ["", "Sources trained with other prompts:", ""]
        lines += [f"- {name}: {describe_columns(cols)}" for name, cols in other.items()]
    return "\n".join(lines) + "\n"
