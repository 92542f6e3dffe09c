#!/usr/bin/env python3
"""Arm's learning-path quantizer, same interface and output naming, backed by arm_int4.

Run: .venv/bin/python scripts/quantize_vllm_models.py MODEL --scheme channelwise|groupwise \
         [--method minmax|mse] [--groupsize 32]
Writes ./{basename}-w4a8dyn-{method}-{scheme}[-g{N}] (W4A8-dynamic, compressed-tensors), with the
stream engine: tensor by tensor, checked before and verified after. `arm-int4 quantize` has more.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from arm_int4.cli import learning_path_main

NOTE = """
output: the same int4 values and fp32 scales as the learning path's script (observers run in fp32,
as its model.to(torch.float32) makes them); unquantized tensors (embeddings, norms, lm_head) keep
the source dtype (e.g. bf16): the same values as its fp32 copies, in smaller files."""

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        try:
            learning_path_main()
        finally:
            print(NOTE)
    sys.exit(learning_path_main())
