"""Settings, read once: command-line flags > environment `FACT_RAY_*` > `fact-ray.toml` > defaults.

Defaults are the embedded, single-machine ones of the architecture: a local Ray, sqlite MLflow, a local
pattern table and build cache under `.fact-ray/`, the LLM off.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fact_ray.errors import ConfigError, UnknownArch, UnknownPolicy
from fact_ray.types import Arch, Precision


@dataclass(frozen=True)
class Settings:
    home: str = ".fact-ray"  # working folder for the embedded defaults
    tracking_uri: str = ""  # "" -> sqlite:///<home>/mlflow.db
    table_uri: str = ""  # "" -> <home>/pattern_table
    cache_dir: str = ""  # "" -> <home>/build-cache
    ray_address: str = ""  # "" -> local ray.init()
    policy: Precision = Precision.FP32
    arch: Arch | None = None  # None -> the local GPU's, else sm90
    budget: int = 16  # candidates per pattern (see parse_budget: "64", "120s", "256,600s")
    budget_s: float = 0.0  # seconds of trials per run (0: no limit); set through `budget`'s "<T>s" form
    search: str = "rank"  # rank (one full trial per candidate) | halving (screen all, time the best quarter)
    ranker: str = "auto"  # auto | heuristic | learned | nvmmh (search_spaces.rankers)
    jobs: int = 0  # parallel compiles; 0 -> number of CPUs
    nvcc: str = "nvcc"
    llm: str = "off"  # off | rank | propose
    llm_model: str = ""
    trial_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        # Typed once, here, however the settings were made (config.load, or Settings(...) in code and tests):
        # every stage reads a Precision and an Arch and never parses them again.
        if not isinstance(self.policy, Precision):
            object.__setattr__(self, "policy", parse_policy(str(self.policy)))
        if self.arch is not None and not isinstance(self.arch, Arch):
            object.__setattr__(self, "arch", parse_arch(str(self.arch)))

    @property
    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return "sqlite:///" + str(Path(self.home).absolute() / "mlflow.db")

    @property
    def resolved_table_uri(self) -> str:
        return self.table_uri or str(Path(self.home) / "pattern_table")

    @property
    def resolved_cache_dir(self) -> str:
        return self.cache_dir or str(Path(self.home) / "build-cache")


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


_STR_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings) if f.type == "str")


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (dict, list, bool)) or (name in _STR_FIELDS and not isinstance(value, str)):
        # A wrongly typed fact-ray.toml entry (budget = [1], nvcc = 5) names the setting, not a traceback.
        raise ConfigError(f"setting {name} has the wrong type ({type(value).__name__}: {str(value)[:40]!r})")
    if name == "policy":
        return parse_policy(str(value))
    if name == "arch":
        return parse_arch(str(value))
    if name == "budget_s":
        try:
            t = float(value)
        except ValueError:
            t = math.nan
        if not (t >= 0 and math.isfinite(t)):
            raise ConfigError(f"setting budget_s must be 0 (none) or a positive number of seconds, got {value!r}")
        return t
    if name == "search" and str(value) not in SEARCHES:
        raise ConfigError(f"setting search must be {' or '.join(SEARCHES)}, got {value!r}")
    if name == "ranker" and str(value) not in RANKERS:
        raise ConfigError(f"setting ranker must be one of {', '.join(RANKERS)}, got {value!r}")
    if name in ("budget", "jobs"):
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"setting {name} must be an integer, got {value!r}") from None
        least = 1 if name == "budget" else 0
        if n < least:
            what = "candidates per pattern, at least 1" if name == "budget" else "0 (all CPUs) or more"
            raise ConfigError(f"setting {name} must be {what}, got {n}")
        return n
    if name == "trial_timeout_s":
        try:
            t = float(value)
        except ValueError:
            t = math.nan
        if not (t > 0 and math.isfinite(t)):
            raise ConfigError(f"setting trial_timeout_s must be a positive number of seconds, got {value!r}")
        return t
    if name == "llm" and str(value) not in ("off", "rank", "propose"):
        raise ConfigError(f"--llm must be off, rank or propose, got {value!r}")
    return str(value)


SEARCHES = ("rank", "halving")
RANKERS = ("auto", "heuristic", "learned", "nvmmh")  # search_spaces.rankers.KINDS (config imports nothing of ours)
# Candidates planned when the budget is given in seconds only: the trials stop at the time limit, in rank order.
SECONDS_POOL = 64
_BUDGET = re.compile(r"^\s*(?:(\d+)\s*,\s*)?(\d+(?:\.\d*)?)\s*s\s*$")  # [N,]Ts (N alone: an integer)


def parse_budget(value: Any) -> tuple[int, float]:
    """A budget as a user spells it: "64" (candidates per pattern), "120s" (seconds of trials per run, over
    SECONDS_POOL candidates per pattern in rank order), or "256,600s" (both: whichever runs out first).
    Returns (candidates, seconds; 0.0 for none)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, 0.0
    if re.fullmatch(r"\s*-?\d+\s*", str(value)):
        return int(value), 0.0  # candidates alone: _coerce checks the count and says so
    m = _BUDGET.match(str(value))
    if not m:
        raise ConfigError(f"--budget must be candidates (64), seconds (120s) or both (256,600s), got {value!r}")
    n = int(m.group(1)) if m.group(1) else SECONDS_POOL
    t = float(m.group(2))
    if n < 1 or t <= 0:
        raise ConfigError(f"--budget needs at least 1 candidate and a positive time, got {value!r}")
    return n, t


def parse_policy(value: str) -> Precision:
    """A precision policy as a user spells it (flag, env, file, a stored row): the one parser of policies."""
    try:
        return Precision(value.lower())
    except ValueError:
        raise UnknownPolicy(
            f"unknown precision policy {value!r}: choose one of {', '.join(p.value for p in Precision)}"
        ) from None


_ARCH_SPELLING = re.compile(r"(?:sm_?)?(80|90)a?")  # sm90, sm_90, sm90a, 90: one optional "a", no more


def parse_arch(value: str) -> Arch:
    """An arch as a user spells it (sm90, sm_90a, 90, h100, ...): the one parser of arch names."""
    v = value.strip().lower()
    aliases = {"a100": "sm80", "h100": "sm90", "h200": "sm90"}
    m = _ARCH_SPELLING.fullmatch(v)
    v = f"sm{m.group(1)}" if m else aliases.get(v, v)
    try:
        return Arch(v)
    except ValueError:
        raise UnknownArch(f"unknown architecture {value!r}: choose sm80 (A100) or sm90 (H100/H200)") from None


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         file: str | None = None) -> Settings:
    """Merge the layers. `flags` holds only what the user passed (None means not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = Path(file or env.get("FACT_RAY_CONFIG", "fact-ray.toml"))
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        for k, v in data.items():
            if k not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting {k!r}")
            values[k] = v
    for name in _FIELDS:
        v = env.get("FACT_RAY_" + name.upper())
        if v is not None and v != "":
            values[name] = v
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = v
    if "budget" in values and not isinstance(values["budget"], (dict, list, bool)):
        # "120s" and "256,600s" set the time budget too (a later layer's budget replaces both parts).
        n, t = parse_budget(values["budget"])
        values["budget"] = n
        values.setdefault("budget_s", t) if t == 0 else values.__setitem__("budget_s", t)
    return Settings(**{k: _coerce(k, v) for k, v in values.items()})
