"""scripts/smi-summary.py: an nvidia-smi log's samples in a window, their mean utilisation
and peak memory (the docs' "device busy" numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("smi_summary", ROOT / "scripts" / "smi-summary.py")
smi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smi)


def test_a_window_of_the_log_is_summed_and_an_empty_one_refused(tmp_path):
    log = tmp_path / "smi.log"
    log.write_text("timestamp, memory.used [MiB], utilization.gpu [%]\n"
                   "2026/12/06 10:00:00.100, 0 MiB, 0 %\n"
                   "2026/12/06 10:00:10.100, 1000 MiB, 20 %\n"
                   "2026/12/06 10:00:20.100, [N/A], [N/A]\n"
                   "2026/12/06 10:00:30.100, 3000 MiB, 60 %\n"
                   "2026/12/06 10:00:40.100, 500 MiB, 100 %\n")
    rows = smi.samples(log)
    assert [r[0] for r in rows] == ["10:00:00", "10:00:10", "10:00:30", "10:00:40"]
    s = smi.summary(rows, "10:00:05", "10:00:30")
    assert s == {"samples": 2, "mean_utilisation_pct": 40.0, "peak_memory_mib": 3000.0,
                 "first": "10:00:10", "last": "10:00:30"}
    assert smi.summary(rows, None, None)["mean_utilisation_pct"] == 45.0
    with pytest.raises(SystemExit, match="no sample in that window"):
        smi.summary(rows, "11:00:00", None)
