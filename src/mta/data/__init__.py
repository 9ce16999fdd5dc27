"""Per-user data: one canonical schema, readers for the layouts people have, converters."""

from mta.data.schema import Dataset, HistoryItem, Query, User

__all__ = ["Dataset", "HistoryItem", "Query", "User"]
