"""The packaged offline lm-eval task: `opticks_cloze`, a 4-way multiple-choice sentence ending.

No hub data: the items are built, deterministically, from the public-domain text that
arm_int4.evaluate scores (Newton's Opticks, shipped in arm_int4/data and sha256-pinned in
arm_int4.evaluate.TEXTS). Each item is one sentence of
the book: the context is the sentence without its last ENDING_WORDS words, the gold choice is
those words, and the three distractors are the endings of other sentences. A language model
scores every choice by its log-likelihood after the context (lm-eval `multiple_choice`: `acc`,
and `acc_norm`, the same per byte of the choice), so the task is a loglikelihood task: no
generation, cheap enough for the x86 W4A8 fallback.

Sentences come from after the first SKIP_CHARS characters of the whole text: when this task was
made, the perplexity check scored the start of the same text (4096 tokens ≈ 16k characters), so
the two never shared text. Since 2026-12-06 `eval` scores the held-out part (opticks-heldout, from
character 253,198) by default, whose first 4096 tokens (~17k characters) hold 9 of these 220
sentences (139 are in the held-out part, 81 in the search part); the items are
pinned (ITEMS_SHA256), so figures on record stay comparable. Neither check trains anything: the
overlap makes them correlated, not contaminated.
The files are written at run time into a directory passed to lm-eval as an include path (the
YAML needs absolute data paths); the items' sha256 is pinned, so a builder or text change is
caught by the tests rather than silently changing the numbers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Union

from . import evaluate
from .errors import EnvironmentMissing

__all__ = [
    "ENDING_WORDS",
    "ITEMS_SHA256",
    "NUM_TEST",
    "NUM_TRAIN",
    "SKIP_CHARS",
    "TASK",
    "TEXT",
    "build_items",
    "write_task",
]

TASK = "opticks_cloze"
TEXT = "opticks"  # an arm_int4.evaluate.TEXTS key
ENDING_WORDS = 4  # words in each choice
MIN_WORDS, MAX_WORDS = 12, 24  # sentence length kept: short prompts (~20-35 tokens) for the slow x86 W4A8 path
SKIP_CHARS = 60_000
NUM_TEST, NUM_TRAIN, SEED = 200, 20, 0  # train: the few-shot examples only
# sha256 of the test + train items as written (json.dumps per line, sort_keys): see build_items
ITEMS_SHA256 = "bf45db9c493d465c651c9c8102b8915bc14ffae5f61c3c9e1cf09c7718bc1700"
# Markup and reference-laden sentences (figures, propositions, numbers, ALL-CAPS headings) are
# dropped: their endings are guessable from layout, not language.
_SKIP = re.compile(r"[0-9\[\]()*&|=+:/]|Fig\.|Prop\.|Exper\.|Lib\.|Part\.|Ch\.|Mr\.|[A-Z]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def _sentences(text: str) -> list:
    flat = re.sub(r"\s+", " ", text[SKIP_CHARS:].replace("_", ""))  # `_italic_` markup
    out = []
    for s in _SENTENCE_END.split(flat)[1:]:  # [0] may start mid-sentence
        n = len(s.split())
        if MIN_WORDS <= n <= MAX_WORDS and s.endswith(".") and not _SKIP.search(s):
            out.append(s)
    return list(dict.fromkeys(out))  # a repeated sentence would be two identical items


def build_items(text: str) -> tuple:
    """(test items, train items): {"id", "context", "choices" (4 strings), "label" (gold index)}."""
    sents = _sentences(text)
    if len(sents) < NUM_TEST + NUM_TRAIN:
        raise EnvironmentMissing(f"the {TEXT} text yields {len(sents)} usable sentences, {NUM_TEST + NUM_TRAIN} needed")
    rng = random.Random(SEED)
    rng.shuffle(sents)
    split = [(s.split()[:-ENDING_WORDS], " ".join(s.split()[-ENDING_WORDS:])) for s in sents]
    endings = [e for _, e in split]
    items = []
    for i, (ctx, gold) in enumerate(split[: NUM_TEST + NUM_TRAIN]):
        distractors: list = []
        while len(distractors) < 3:
            e = rng.choice(endings)
            if e.lower() != gold.lower() and e not in distractors:
                distractors.append(e)
        choices = [gold, *distractors]
        rng.shuffle(choices)
        items.append({"id": i, "context": " ".join(ctx), "choices": choices, "label": choices.index(gold)})
    return items[:NUM_TEST], items[NUM_TEST:]


def _jsonl(items) -> str:
    return "".join(json.dumps(x, sort_keys=True) + "\n" for x in items)


def _yaml(test: Path, train: Path) -> str:
    # json.dumps quotes the paths as YAML double-quoted scalars
    return f"""# arm_int4.cloze: built from {TEXT} ({evaluate.TEXTS[TEXT].description}); {evaluate.TEXTS[TEXT].licence}
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(test))}
    train: {json.dumps(str(train))}
output_type: multiple_choice
test_split: test
fewshot_split: train
doc_to_text: context  # a column name: the value as is
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  items_sha256: {ITEMS_SHA256}
"""


def write_task(directory: Union[str, Path], text: Union[str, evaluate.Text] = TEXT) -> Path:
    """Write the task (YAML + test/train JSONL) into `directory` (an lm-eval include path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t = evaluate.load_text(text) if isinstance(text, str) else text
    test, train = build_items(t.text)
    body = _jsonl(test) + _jsonl(train)
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if digest != ITEMS_SHA256:
        raise EnvironmentMissing(
            f"{TASK} items changed (sha256 {digest[:12]}…, expected "
            f"{ITEMS_SHA256[:12]}…): the builder or the {TEXT} text differs"
        )
    (directory / f"{TASK}_test.jsonl").write_text(_jsonl(test), encoding="utf-8")
    (directory / f"{TASK}_train.jsonl").write_text(_jsonl(train), encoding="utf-8")
    (directory / f"{TASK}.yaml").write_text(
        _yaml(directory / f"{TASK}_test.jsonl", directory / f"{TASK}_train.jsonl"), encoding="utf-8"
    )
    return directory
