"""Search spaces per (arch, pattern/epilogue, precision), enumerated with cutlass_library.

`space(problem, arch, policy, budget)` is the entry point; `catalog` holds the enumeration (cached per process,
built on first use), `rules` the policy tables and pruning, `rank` the ordering heuristic.
"""

from fact_ray.search_spaces.gemm import ACTIVATIONS, EPILOGUES, check_problem, space

__all__ = ["ACTIVATIONS", "EPILOGUES", "check_problem", "space"]
