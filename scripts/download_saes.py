"""Download and unpack the Marks et al. (2024) Pythia-70M-deduped sparse autoencoders.

Fetches dictionaries_pythia-70m-deduped_10.zip (about 2.4 GB) from the Hugging Face repo
saprmarks/pythia-70m-deduped-saes into the hub cache (resumable; re-running reuses it), unpacks it
into saes/dictionaries/ and checks that all 19 dictionaries are there:

  <out>/pythia-70m-deduped/{embed, attn_out_layer0..5, mlp_out_layer0..5, resid_out_layer0..5}/10_32768/ae.pt

Nothing is downloaded when the 19 files are already present (use --force to unpack again).
Needs about 5 GB of disk (the zip stays in the hub cache; remove it with `hf cache` tooling or
`huggingface-cli delete-cache` if space is short). Exit status: 0 when complete, 1 when files are
missing (they are listed), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from pathlib import Path

from feature_circuits.dictionaries.download import (
    DEFAULT_DICT_ID,
    DEFAULT_FILENAME,
    DEFAULT_MODEL_DIR,
    DEFAULT_REPO_ID,
    DownloadError,
    MissingDictionariesError,
    UnsafeArchiveError,
    download_marks_saes,
    marks_sae_root,
    verify_marks_layout,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to unpack (default: $FEATURE_CIRCUITS_SAES or saes/dictionaries)",
    )
    ap.add_argument(
        "--repo-id", default=DEFAULT_REPO_ID, help=f"Hugging Face repo (default: {DEFAULT_REPO_ID})"
    )
    ap.add_argument(
        "--filename", default=DEFAULT_FILENAME, help=f"file in the repo (default: {DEFAULT_FILENAME})"
    )
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help="hub cache directory (default: the hub's own)"
    )
    ap.add_argument("--force", action="store_true", help="unpack again even if all files are present")
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="only check that the 19 files are present; download nothing",
    )
    ap.add_argument("--quiet", action="store_true", help="no unpacking progress bar")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = marks_sae_root()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.verify_only:
        missing = verify_marks_layout(args.out, DEFAULT_MODEL_DIR, DEFAULT_DICT_ID)
        if missing:
            print(f"{len(missing)} dictionary file(s) missing under {args.out}:", file=sys.stderr)
            for p in missing:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(f"all 19 dictionaries present under {args.out}")
        return 0
    try:
        root = download_marks_saes(
            args.out,
            repo_id=args.repo_id,
            filename=args.filename,
            force=args.force,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
    except (DownloadError, MissingDictionariesError, UnsafeArchiveError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except zipfile.BadZipFile as err:
        print(
            f"error: the downloaded archive is corrupt ({err}); delete it from the hub cache "
            "(`hf cache` / `huggingface-cli delete-cache`) and run again",
            file=sys.stderr,
        )
        return 1
    print(f"all 19 dictionaries present under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
