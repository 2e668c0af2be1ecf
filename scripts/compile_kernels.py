"""Compile every Triton kernel the engine launches to cubin for sm_80, sm_90 and sm_100, without
a GPU, and report registers, spills and shared memory; exits 1 if one does not compile.

    .venv/bin/python scripts/compile_kernels.py [--targets sm_90] [--out report.md|.json]

The work is ``apudae_kernels.compile_check`` (``python -m apudae_kernels.compile_check``).
"""

import sys

from apudae_kernels.compile_check import main

if __name__ == "__main__":
    sys.exit(main())
