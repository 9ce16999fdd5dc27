"""mta: Merge-then-Adapt personalisation of one LLM for many users.

The package is laid out by stage of the method: ``data`` and ``tasks`` (what users
look like and how a task is prompted and scored), ``models`` (the offline model
registry), ``retrieval`` (BM25 over a user's history), ``metrics`` and ``cli``.
"""

__version__ = "0.1.0"
