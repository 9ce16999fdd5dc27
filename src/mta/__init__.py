"""mta: Merge-then-Adapt personalisation of one LLM for many users.

The package is laid out by stage of the method: ``data`` and ``tasks`` (what users
look like and how a task is prompted and scored), ``models`` (the offline model
registry), ``retrieval`` (BM25 over a user's history), ``metrics`` and ``cli``.
"""

import os

# JAX, where installed, is reached through libraries we use (bm25s picks it for its top-k
# when it is importable) and on its first use takes 75% of the GPU's memory outside
# torch's allocator: on an H200 every mta command then held ~106 GiB it never used
# (nvidia-smi; docs/architecture.md, "Devices, dtypes and memory"). mta needs nothing
# from JAX on a GPU: keep it on the CPU, and never preallocating, unless the user says otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

__version__ = "0.1.0"
