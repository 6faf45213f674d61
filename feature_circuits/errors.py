"""User-facing errors: one base class, caught once by the command line.

Every error a user can cause (a malformed dataset line, a missing SAE file, an unknown model, a bad
option) is a :class:`FeatureCircuitsError` whose message names the file and line, the site, or the
option at fault. The CLI prints it as one line and exits with status 2; anything else is a bug and
keeps its traceback. The subclasses also derive from the matching builtin (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CircuitError",
    "ConfigError",
    "DatasetError",
    "DatasetNotFoundError",
    "DictionaryError",
    "DownloadError",
    "EvaluationError",
    "FeatureCircuitsError",
    "LabelsError",
    "MissingDictionariesError",
    "ModelLoadError",
    "UnknownDatasetError",
    "UnsafeArchiveError",
    "UnsupportedModelError",
]


class FeatureCircuitsError(Exception):
    """Base class of every error caused by the user's input (not by a bug)."""


class ConfigError(FeatureCircuitsError, ValueError):
    """An invalid option value (names the option)."""


class DatasetError(FeatureCircuitsError, ValueError):
    """A malformed dataset line; the message is ``path:line: problem`` (line is 1-based)."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.problem = problem
        super().__init__(f"{self.path}:{self.line}: {problem}")


class UnknownDatasetError(FeatureCircuitsError, ValueError):
    """A dataset name that is neither an existing file nor a shipped dataset."""


class DatasetNotFoundError(FeatureCircuitsError, FileNotFoundError):
    """A dataset path that does not exist."""


class ModelLoadError(FeatureCircuitsError, RuntimeError):
    """A model that cannot be loaded (missing directory, unknown hub id, bad device or dtype)."""


class UnsupportedModelError(FeatureCircuitsError, ValueError):
    """A model whose architecture has no known sites."""


class DictionaryError(FeatureCircuitsError, ValueError):
    """A missing, unreadable or mis-shaped dictionary (names the site and the file)."""


class DownloadError(FeatureCircuitsError, RuntimeError):
    """A download that failed (no network, unknown repository or file)."""


class MissingDictionariesError(FeatureCircuitsError, RuntimeError):
    """Dictionary files expected after unpacking are missing (lists them)."""

    def __init__(self, root: Path, missing: list[Path]) -> None:
        self.root = root
        self.missing = missing
        listing = "\n".join(f"  {p}" for p in missing)
        super().__init__(f"{len(missing)} dictionary file(s) missing under {root}:\n{listing}")


class UnsafeArchiveError(FeatureCircuitsError, ValueError):
    """An archive member that would be written outside the target directory."""


class CircuitError(FeatureCircuitsError, ValueError):
    """Bad aggregation input, or a circuit / effects file that does not match its schema."""


class EvaluationError(FeatureCircuitsError, ValueError):
    """Bad input to the evaluation (unknown site, position out of range, unaligned examples...)."""


class LabelsError(FeatureCircuitsError, ValueError):
    """A malformed feature-labels file (names the line)."""
