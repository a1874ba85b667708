# SPDX-License-Identifier: MIT
"""One AdamW step over a model-sized parameter list (GPT-2 small's 148 tensors, 124M params): cpuadam against its peers.

Usage: python benchmarks/bench_step.py [any option of python -m cpuadam.bench]
"""

import sys

from cpuadam.bench import main

if __name__ == "__main__":
    # A later --sizes on the command line replaces this one.
    main(["--sizes", "gpt2", *sys.argv[1:]])
