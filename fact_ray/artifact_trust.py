"""What makes loading an artifact safe: names that cannot point outside it, bytes hashed and loaded from one
private copy, and an optional HMAC signature for teams that share artifacts.

Why a private copy: a library hashed at one moment and dlopened by path later can be swapped in between (the
model is imported and captured in between: seconds, and code of its own). Each library is read once through a
file descriptor opened without following links, hashed from those bytes, and the same bytes are written to a
folder only this process can write (mode 0700, under the system temp folder); only that copy is ever dlopened.
All of it happens before any of the model's code runs.

Names: a pattern's library must be exactly `libs/<sha256>.so`, where <sha256> is the hash the manifest records
for it (content-addressed: the name is the hash). `../x.so`, an absolute path, a link, or a name that disagrees
with its hash is refused.

Signature (optional): with a key (`FACT_RAY_ARTIFACT_KEY`, or `key=` in Python), `save` writes `manifest.sig`,
HMAC-SHA256 of the manifest's bytes; `load` with a key refuses an artifact whose signature is missing or does
not match. The manifest records every library's sha256, so the signature covers the libraries too. Without a key
nothing is signed or checked (a single machine or a trusted share).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping

from fact_ray.errors import ArtifactError
from fact_ray.types import Arch, Precision

KEY_ENV = "FACT_RAY_ARTIFACT_KEY"
SIGNATURE = "manifest.sig"
_SIG_PREFIX = "hmac-sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REQUIRED = {"arch": str, "policy": str, "model": dict, "patterns": list}
_PATTERN_REQUIRED = ("match_key", "rule", "library", "sha256", "symbol", "config")
_PRIVATE: list[str] = []  # private copies made by this process, removed at exit


def key_from_env(env: Mapping[str, str] | None = None) -> bytes | None:
    value = (os.environ if env is None else env).get(KEY_ENV, "")
    return value.encode() if value else None


def signature_of(manifest_bytes: bytes, key: bytes) -> str:
    return _SIG_PREFIX + hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def check_signature(folder: Path, manifest_bytes: bytes, key: bytes | None) -> None:
    """With a key: the folder's manifest.sig must be the HMAC of exactly these manifest bytes."""
    if key is None:
        return
    try:
        sig = (folder / SIGNATURE).read_text().strip()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {folder} is not signed ({KEY_ENV} is set: only signed artifacts load)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact {folder}: its signature cannot be read ({e})") from None
    if not hmac.compare_digest(sig, signature_of(manifest_bytes, key)):
        raise ArtifactError(f"artifact {folder}: bad signature (signed with another key, or the manifest was "
                            "edited after signing)")


def validate_manifest(manifest: Mapping[str, Any], where: str) -> None:
    """Every field load reads, present and of its type, and every library name content-addressed."""
    for name, kind in _REQUIRED.items():
        if not isinstance(manifest.get(name), kind):
            raise ArtifactError(f"{where}: manifest has no valid {name!r} (damaged or not made by fact-ray)")
    for name, enum in (("arch", Arch), ("policy", Precision)):
        if manifest[name] not in {e.value for e in enum}:
            raise ArtifactError(f"{where}: manifest {name} {manifest[name][:40]!r} is not one fact-ray knows")
    for i, pat in enumerate(manifest["patterns"]):
        if not isinstance(pat, dict) or any(k not in pat for k in _PATTERN_REQUIRED):
            raise ArtifactError(f"{where}: manifest pattern {i} lacks one of {', '.join(_PATTERN_REQUIRED)}")
        digest, lib = pat["sha256"], pat["library"]
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ArtifactError(f"{where}: pattern {i} has no valid sha256")
        if lib != f"libs/{digest}.so":
            raise ArtifactError(f"{where}: library name {str(lib)[:120]!r} is not libs/<its sha256>.so inside "
                                "the artifact; refused")


def stage_libraries(folder: Path, manifest: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Each library read once (no links followed), hashed, and copied to a private folder; returns manifest
    name -> (private path, sha256). Refuses a missing, linked or damaged library."""
    libs = folder / "libs"
    try:
        if stat.S_ISLNK(os.lstat(libs).st_mode):
            raise ArtifactError(f"artifact {folder}: libs/ is a link; refused")
    except FileNotFoundError:
        pass
    private = tempfile.mkdtemp(prefix="fact-ray-artifact-")  # 0700: no one else can swap a file in
    _PRIVATE.append(private)
    if len(_PRIVATE) == 1:
        atexit.register(_remove_private)
    out: dict[str, tuple[str, str]] = {}
    for pat in manifest["patterns"]:
        name, want = pat["library"], pat["sha256"]
        if name in out:
            continue
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ArtifactError(f"artifact {folder}: library {name} is missing") from None
        except OSError as e:
            raise ArtifactError(f"artifact {folder}: library {name} cannot be opened ({e.strerror}; a link is "
                                "refused)") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ArtifactError(f"artifact {folder}: library {name} is not a regular file")
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != want:
            raise ArtifactError(f"artifact {folder}: library {name} is damaged (sha256 {digest[:12]}, manifest "
                                f"{want[:12]})")
        dest = os.path.join(private, f"{digest}.so")
        with open(dest, "xb") as out_f:
            out_f.write(data)
        os.chmod(dest, 0o500)
        out[name] = (dest, digest)
    return out


def _remove_private() -> None:
    for p in _PRIVATE:
        shutil.rmtree(p, ignore_errors=True)


def bucket_folders(folder: str | Path, dispatch: Mapping[str, Any]) -> list[str]:
    """The bucket artifacts a shape dispatch names: each must be a plain folder name inside `folder` (no path
    separator, no `..`), as `save` writes them."""
    names = []
    for entry in dispatch.get("buckets", []):
        name = entry.get("artifact") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ArtifactError(f"artifact {folder}: bucket artifact {str(name)[:80]!r} is not a folder name "
                                "inside the artifact; refused")
        names.append(name)
    return names
