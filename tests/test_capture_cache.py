"""The capture cache: a hit only for the same code, inputs and toolchain; a miss traces again; damage is healed."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from fact_ray import capture_cache as cc
from fact_ray.capture import capture, load_model, under_policy

MODELS = Path(__file__).resolve().parent / "models"


@pytest.fixture
def model_copy(tmp_path):
    path = tmp_path / "block.py"
    shutil.copy(MODELS / "small_block.py", path)
    return path


def test_second_capture_is_served_without_tracing(model_copy, tmp_path, monkeypatch):
    first, hit = cc.captured(load_model(str(model_copy)), tmp_path / "cache")
    assert not hit and first.method == "export"

    def no_trace(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(torch.export, "export", no_trace)
    again, hit = cc.captured(load_model(str(model_copy)), tmp_path / "cache")
    assert hit and again == first


def test_the_cached_graph_is_the_traced_one(model_copy, tmp_path):
    cc.captured(load_model(str(model_copy)), tmp_path / "cache")
    served, hit = cc.captured(load_model(str(model_copy)), tmp_path / "cache")
    assert hit and served.graph == capture(load_model(str(model_copy))).graph


def test_any_change_to_what_decides_the_graph_is_a_new_key(model_copy):
    base = cc.key_of(load_model(str(model_copy)))
    assert cc.key_of(load_model(str(model_copy))) == base  # stable across loads
    assert cc.key_of(under_policy(load_model(str(model_copy)), "bf16")) != base  # dtypes
    model_copy.write_text(model_copy.read_text().replace("torch.randn(2, 8, 32)", "torch.randn(3, 8, 32)"))
    assert cc.key_of(load_model(str(model_copy))) != base  # code and input shapes
    loaded = load_model(str(MODELS / "small_block.py"))
    before = cc.key_of(loaded)
    loaded.module.bias.zero_()  # the causal-mask buffer's values (capture tags masks by value)
    assert cc.key_of(loaded) != before


def test_a_damaged_entry_is_traced_again_and_replaced(model_copy, tmp_path, caplog):
    loaded = load_model(str(model_copy))
    first, _ = cc.captured(loaded, tmp_path / "cache")
    entry = tmp_path / "cache" / f"{cc.key_of(loaded)}.pkl"
    entry.write_bytes(entry.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="fact_ray.capture_cache"):
        again, hit = cc.captured(loaded, tmp_path / "cache")
    assert not hit and again == first and "unreadable" in caplog.text
    assert cc.captured(loaded, tmp_path / "cache")[1]  # healed
