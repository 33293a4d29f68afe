"""gan.dist on one process (the 2-process gloo runs in test_trainer.py exercise the collectives)."""
from __future__ import annotations

import pytest
import torch

from gan.dist import Stats, any_rank


def test_stats_mean_per_name_over_mixed_reports_then_reset():
    s = Stats(torch.device("cpu"))
    s.report("a", torch.tensor(1.0))
    s.report("a", torch.tensor([2.0, 4.0]))  # a non-scalar counts as its mean: 3
    s.report("a", 5)  # a Python number, summed on the host
    s.report("b", torch.tensor(0.5, dtype=torch.bfloat16))
    s.report("b", 1.5)
    assert s.reduce() == {"a": pytest.approx(3.0), "b": pytest.approx(1.0)}
    assert s.reduce() == {}  # started over
    s.report("c", torch.tensor(2.0, dtype=torch.float64))
    assert s.reduce() == {"c": 2.0}


def test_any_rank_single_process():
    assert any_rank([True, False], torch.device("cpu")) == [True, False]
