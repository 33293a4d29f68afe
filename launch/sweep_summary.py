#!/usr/bin/env python
"""Summarise a sweep: python launch/sweep_summary.py runs/sweeps/<name>

Writes summary.csv, summary.md and summary.png into that directory (logic: gan/sweep_summary.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.sweep_summary import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
