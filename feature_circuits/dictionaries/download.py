"""Fetch, unpack and verify the Marks et al. Pythia-70M-deduped dictionaries (docs/algorithms.md,
"Dictionaries and the error node").

The zip (about 2.4 GB) is downloaded with :func:`huggingface_hub.hf_hub_download`, so it lands in
the hub's cache (resumable, with the hub's own progress bar), and is then unpacked into
``saes/dictionaries/`` under the current directory (:func:`marks_sae_root`; set
``FEATURE_CIRCUITS_SAES`` to put them elsewhere) as::

    <root>/pythia-70m-deduped/{embed,attn_out_layer{l},mlp_out_layer{l},resid_out_layer{l}}/10_32768/ae.pt

The archive stores its members under a leading ``dictionaries/`` directory; that prefix is stripped
(an archive without it works too). Members with absolute paths or ``..`` components are rejected
before anything is written, and every file is written to a temporary name and renamed when complete,
so an interrupted unpack never leaves a truncated ``ae.pt`` that looks present.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path, PurePosixPath

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from tqdm.auto import tqdm

from feature_circuits.errors import DownloadError, MissingDictionariesError, UnsafeArchiveError

__all__ = [
    "DEFAULT_DICT_ID",
    "DEFAULT_FILENAME",
    "DEFAULT_MODEL_DIR",
    "DEFAULT_REPO_ID",
    "DownloadError",
    "MissingDictionariesError",
    "UnsafeArchiveError",
    "download_marks_saes",
    "expected_marks_files",
    "fetch_zip",
    "unpack_zip",
    "verify_marks_layout",
]

log = logging.getLogger(__name__)


def marks_sae_root() -> Path:
    """Where the Marks et al. dictionaries are downloaded to and looked for: ``$FEATURE_CIRCUITS_SAES``
    if set, else ``saes/dictionaries`` under the current directory (the repository's ``saes/``, ignored
    by git, when run from a checkout)."""
    return Path(os.environ.get("FEATURE_CIRCUITS_SAES", "saes/dictionaries"))


DEFAULT_REPO_ID = "saprmarks/pythia-70m-deduped-saes"
DEFAULT_FILENAME = "dictionaries_pythia-70m-deduped_10.zip"
DEFAULT_MODEL_DIR = "pythia-70m-deduped"
DEFAULT_DICT_ID = "10_32768"
N_LAYERS = 6
#: Leading directory the published archive puts everything under.
ARCHIVE_PREFIX = "dictionaries"
_CHUNK = 1 << 20


def site_dirs(n_layers: int = N_LAYERS) -> list[str]:
    """Directory names of the 1 + 3 * n_layers sites in the Marks layout."""
    return ["embed"] + [
        f"{kind}_out_layer{layer}" for kind in ("attn", "mlp", "resid") for layer in range(n_layers)
    ]


def expected_marks_files(
    root: str | Path, model_dir: str = DEFAULT_MODEL_DIR, dict_id: str = DEFAULT_DICT_ID
) -> list[Path]:
    """The 19 ``ae.pt`` paths the layout must contain."""
    root = Path(root)
    return [root / model_dir / site / dict_id / "ae.pt" for site in site_dirs()]


def verify_marks_layout(
    root: str | Path, model_dir: str = DEFAULT_MODEL_DIR, dict_id: str = DEFAULT_DICT_ID
) -> list[Path]:
    """Return the expected ``ae.pt`` files that are missing (or empty) under ``root``; [] if complete."""
    return [
        p for p in expected_marks_files(root, model_dir, dict_id) if not p.is_file() or p.stat().st_size == 0
    ]


def fetch_zip(
    repo_id: str = DEFAULT_REPO_ID, filename: str = DEFAULT_FILENAME, *, cache_dir: str | Path | None = None
) -> Path:
    """Download (or reuse from the hub cache) the dictionary archive; returns its local path."""
    log.info("fetching %s from %s", filename, repo_id)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir))
    except (OSError, HfHubHTTPError) as exc:
        raise DownloadError(
            f"could not fetch {filename} from the Hugging Face repo {repo_id} "
            f"(is https://huggingface.co reachable? HF_HUB_OFFLINE set?): {exc}"
        ) from exc


def _member_target(name: str, strip_prefix: bool) -> PurePosixPath | None:
    """Relative destination of a member, or None for entries to skip. Raises on unsafe names."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} contains '..'")
    if parts and parts[0] == "__MACOSX":
        return None
    if strip_prefix:
        parts = parts[1:]
    if not parts:
        return None
    return PurePosixPath(*parts)


def unpack_zip(zip_path: str | Path, out: str | Path, *, progress: bool = True) -> list[Path]:
    """Safely unpack ``zip_path`` into ``out``; returns the written files.

    A leading ``dictionaries/`` directory shared by every member is stripped. All member names are
    checked before anything is written; an unsafe one raises :class:`UnsafeArchiveError`.
    """
    out = Path(out)
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        first = {i.filename.replace("\\", "/").lstrip("/").split("/", 1)[0] for i in infos}
        strip = first == {ARCHIVE_PREFIX}
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        root = out.resolve()
        for info in infos:
            rel = _member_target(info.filename, strip)
            if rel is None or info.is_dir():
                continue
            target = out / rel
            if not target.resolve().is_relative_to(root):
                raise UnsafeArchiveError(f"archive member {info.filename!r} would be written outside {out}")
            plan.append((info, target))
        written: list[Path] = []
        total = sum(info.file_size for info, _ in plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc="unpacking", disable=not progress) as bar:
            for info, target in plan:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".partial")
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        bar.update(len(chunk))
                os.replace(tmp, target)
                written.append(target)
    return written


def download_marks_saes(
    out: str | Path | None = None,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    filename: str = DEFAULT_FILENAME,
    force: bool = False,
    cache_dir: str | Path | None = None,
    model_dir: str = DEFAULT_MODEL_DIR,
    dict_id: str = DEFAULT_DICT_ID,
    progress: bool = True,
) -> Path:
    """Make sure the Marks et al. dictionaries are unpacked under ``out``; returns ``out``.

    Does nothing if all 19 files are already there (unless ``force``). Raises
    :class:`MissingDictionariesError` if files are still missing after unpacking.
    """
    out = marks_sae_root() if out is None else Path(out)
    if not force and not verify_marks_layout(out, model_dir, dict_id):
        log.info("all dictionaries already present under %s", out)
        return out
    zip_path = fetch_zip(repo_id, filename, cache_dir=cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    unpack_zip(zip_path, out, progress=progress)
    missing = verify_marks_layout(out, model_dir, dict_id)
    if missing:
        raise MissingDictionariesError(out, missing)
    return out
