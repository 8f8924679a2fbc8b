"""Test-only: compose_mlp.py (beside this file) with a get_shapes() naming two buckets (fact_ray.shapes)."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("fact_ray_test_compose_mlp", Path(__file__).with_name("compose_mlp.py"))
_mlp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mlp)
Model, get_inputs, get_init_inputs = _mlp.Model, _mlp.get_inputs, _mlp.get_init_inputs


def get_shapes():
    return [[(2, 8, 64)], [(4, 16, 64)]]
