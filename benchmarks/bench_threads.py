# SPDX-License-Identifier: MIT
"""Thread scaling on the same buffers: cpuadam, torch fused, DeepSpeed and the roofline proxy at 1, 2, 4, ... all CPUs.

Usage: python benchmarks/bench_threads.py [any option of python -m cpuadam.bench]
"""

import sys

from cpuadam.bench import main

if __name__ == "__main__":
    # Later options on the command line replace these.
    main(["--sizes", "16M,4096x4096", "--threads", "pow2", "--scaling",
          "--impls", "cpuadam,torch-fused,deepspeed,roofline", *sys.argv[1:]])
