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

from arm_int4.cli import learning_path_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(learning_path_main())
