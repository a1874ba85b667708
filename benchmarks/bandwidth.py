# SPDX-License-Identifier: MIT
"""The memory-bandwidth baseline: the roofline proxy from cache-sized to 128M params, next to cpuadam in one run.

Usage: python benchmarks/bandwidth.py [any option of python -m cpuadam.bench]
"""

import sys

from cpuadam.bench import main

if __name__ == "__main__":
    # Later options on the command line replace these.
    main(["--sizes", "64k,256k,1M,4M,16M,64M,128M", "--impls", "roofline,cpuadam", "--scaling", *sys.argv[1:]])
