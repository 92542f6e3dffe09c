#!/usr/bin/env python3
"""Rebuild arm_int4/data/calibration.jsonl, the offline GPTQ calibration set, byte for byte.

Run: python3 scripts/build_calibration_data.py Brotli-1.1.0.tar.gz [OUT]
     (the sdist from PyPI: pip download brotli==1.1.0 --no-binary :all: --no-deps)

Source: Lewis Carroll, "Alice's Adventures in Wonderland" (1865, public domain), the Canterbury
corpus' alice29.txt as shipped in Brotli 1.1.0's test data (tests/testdata/alice29.txt, sha256
pinned below). It is not the evaluation text (arm_int4/data/opticks.txt), so calibrating on it
does not tune a model to the text its perplexity is scored on.

Rows are chat turns, as the vLLM INT4 page's recipe renders ultrachat through the chat template:
{"messages": [user: "Continue this passage: …", assistant: the next passage]}. Models without a
chat template calibrate on the two turns' contents joined by a blank line. Standard library only.
"""

import hashlib
import itertools
import json
import re
import sys
import tarfile
from pathlib import Path

MEMBER = "Brotli-1.1.0/tests/testdata/alice29.txt"
SHA256 = "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"
MIN_CHARS = 120  # a passage: consecutive paragraphs merged up to at least this many characters
ROWS = 512  # the vLLM INT4 page's NUM_CALIBRATION_SAMPLES


def passages(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    out, cur = [], ""
    for p in filter(None, paras):
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= MIN_CHARS:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


def rows(text: str) -> list[dict]:
    ps = passages(text)
    out = []
    for a, b in itertools.pairwise(ps):
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Continue this passage:\n\n{a}"},
                    {"role": "assistant", "content": b},
                ]
            }
        )
    return out[:ROWS]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    with tarfile.open(argv[1]) as tar:
        f = tar.extractfile(MEMBER)
        data = f.read() if f else b""
    if hashlib.sha256(data).hexdigest() != SHA256:
        print(f"{argv[1]}: {MEMBER} is not the pinned alice29.txt (sha256 {SHA256[:12]}…)", file=sys.stderr)
        return 1
    default = Path(__file__).resolve().parents[1] / "arm_int4" / "data" / "calibration.jsonl"
    out = Path(argv[2]) if len(argv) > 2 else default
    made = rows(data.decode("ascii"))
    out.write_text("".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in made), encoding="ascii")
    print(f"{out}: {len(made)} rows, sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
