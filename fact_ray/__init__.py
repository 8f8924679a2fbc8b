"""fact-ray: PyTorch modules -> verified, faster CUTLASS kernels, tuned on a Ray farm.

Importing the package does nothing else (no torch, no Ray): `load` imports what it needs on first use.
"""


def load(artifact, model, *, tracking_uri=None, **kwargs):
    """Restore a composed module from an artifact folder, or from the MLflow model registry with a
    `models:/<name>@production` (or `models:/<name>/<version>`) URI, without compiling (see
    `fact_ray.artifact.load`). `tracking_uri`: the registry's MLflow store (default: MLFLOW_TRACKING_URI, else the
    settings' store)."""
    from fact_ray.artifact import load as _load

    if str(artifact).startswith("models:/"):
        from fact_ray.night_tracking import default_tracking_uri, download

        artifact = download(str(artifact), tracking_uri or default_tracking_uri())
    return _load(artifact, model, **kwargs)
