"""fact-ray: PyTorch modules -> verified, faster CUTLASS kernels, tuned on a Ray farm.

Importing the package does nothing else (no torch, no Ray): `load` imports what it needs on first use.
"""


def load(artifact, model, **kwargs):
    """Restore a composed module from an artifact folder, without compiling (see `fact_ray.artifact.load`)."""
    from fact_ray.artifact import load as _load

    return _load(artifact, model, **kwargs)
