"""Output directories: checked before the compute, written atomically at the end.

    out = check_out_dir("runs/relp", "--out")       # before the model is loaded
    with staged_outputs() as stage:
        save_circuit(circuit, stage.path(out / "circuit.json"))
        render_circuit_html(circuit, stage.path(out / "circuit.html"))
    # here every staged file has been renamed into place; had anything raised (Ctrl-C included),
    # none would have been, and the previous run's files would be as they were

:func:`check_out_dir` creates the directory if needed and proves it writable, so that a path under
a file or an unwritable directory is one :class:`~feature_circuits.errors.ConfigError` naming the
option, not a traceback after the attribution. :func:`staged_outputs` writes each file to a hidden
temporary name in its final directory (so the rename is atomic: same file system) and renames them
all once every one is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from feature_circuits.errors import ConfigError

__all__ = ["StagedOutputs", "check_out_dir", "staged_outputs"]


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_out_dir(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as an existing, writable directory (created with its parents if missing);
    :class:`ConfigError` naming ``option`` when it is, or is under, a file, or cannot be created or
    written."""
    out = Path(path).expanduser()
    above = out
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        where = "is a file" if above == out else f"is under {above}, which is a file"
        raise ConfigError(f"{option}: {out} {where}, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option}: cannot create the output directory {out} ({_reason(err)})") from None
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".fc-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{option}: cannot write in the output directory {out} ({_reason(err)})") from None
    return out


@dataclass(frozen=True, kw_only=True)
class StagedOutputs:
    """Files being written under temporary names, renamed into place by :meth:`commit`."""

    pending: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, final)

    def path(self, final: str | os.PathLike[str]) -> Path:
        """The temporary path to write ``final`` to (hidden, in ``final``'s directory)."""
        final = Path(final)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        """Rename every staged file into place; returns the final paths."""
        for tmp, final in self.pending:
            os.replace(tmp, final)
        done = [final for _, final in self.pending]
        self.pending.clear()
        return done

    def discard(self) -> None:
        """Remove the temporary files (those already written)."""
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Stage files in the ``with`` block, commit them on a clean exit, discard them on any error
    or interrupt (which propagates). A failed rename is a :class:`ConfigError` naming the file."""
    stage = StagedOutputs()
    try:
        yield stage
    except BaseException:
        stage.discard()
        raise
    try:
        stage.commit()
    except OSError as err:
        stage.discard()
        raise ConfigError(f"cannot write {err.filename} ({_reason(err)})") from None
