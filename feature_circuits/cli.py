"""The command line: one console script, ``feature-circuits <subcommand>``.

=================  ==================================================================================
``discover``       node + edge effects, thresholded into ``circuit.json`` / ``circuit.html``
                   (:func:`feature_circuits.pipeline.discover`)
``evaluate``       held-out faithfulness / completeness by mean ablation: ``eval.json``, ``eval.html``
                   (:func:`feature_circuits.pipeline.evaluate`)
``render``         the explorer page of a ``circuit.json`` (or ``--compare A B``: two circuits overlaid)
                   (:func:`feature_circuits.render.render_circuit_html`)
``compare``        atp / relp / ig against exact patching (``experiments/compare.py``, source checkout)
``bench``          time and memory of each method (``experiments/benchmark.py``, source checkout)
``download-saes``  fetch and unpack the Marks et al. Pythia-70M dictionaries
``train-toy``      regenerate the embedded default: ``datasets``, ``model`` or ``saes``
=================  ==================================================================================

The ``discover`` and ``evaluate`` parsers are generated from :class:`~feature_circuits.pipeline.
DiscoverConfig` and :class:`~feature_circuits.pipeline.EvaluateConfig` by :func:`add_config_arguments`
(field ``foo_bar`` -> ``--foo-bar``; an Enum or Literal -> choices; a bool -> a switch, ``--no-foo``
when it defaults to True; a tuple -> a comma-separated list, or a repeated flag; help from the
field's metadata); the defaults stay in the dataclasses. Printing help imports no torch: every heavy
module is imported by the command that needs it.

Threads: every command takes ``--threads N`` (torch CPU threads; :mod:`feature_circuits.runtime`
has the default). ``discover`` and ``evaluate`` have it as a config field; for the commands that
parse their own options and have no ``--threads`` of their own it is taken off their arguments here
and applied before they run.

Errors: every user-facing error is a :class:`~feature_circuits.errors.FeatureCircuitsError` (bad
options included); :func:`main` catches it once, prints ``error: <message>`` on one line and returns 2.
Ctrl-C prints one line and returns 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from feature_circuits.errors import ConfigError, FeatureCircuitsError
from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["add_config_arguments", "build_parser", "config_from_args", "main"]

PROG = "feature-circuits"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are :class:`ConfigError` (one line, exit 2 in main)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


# ------------------------------------------------------------------------- parsers from dataclasses


def _unwrap_optional(tp: object) -> object:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _comma_list(elem: Callable[[str], object]) -> Callable[[str], tuple[object, ...]]:
    def parse(text: str) -> tuple[object, ...]:
        return tuple(elem(x.strip()) for x in text.split(",") if x.strip())

    parse.__name__ = f"comma-separated {getattr(elem, '__name__', 'value')} list"
    return parse


def _shown(value: object) -> str | None:
    """A default as help shows it (None and switches: not shown)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _field_kwargs(f: dataclasses.Field[object], tp: object) -> dict[str, object]:
    """argparse keywords of one non-bool config field."""
    kw: dict[str, object] = {}
    if "parse" in f.metadata:  # a field with its own parser (e.g. --batch-size N|auto)
        kw["type"] = f.metadata["parse"]
    elif typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)[0]
        if f.metadata.get("repeat"):
            kw.update(action="append", type=elem)
        else:
            kw.update(type=_comma_list(elem), metavar="X,Y,...")
    elif typing.get_origin(tp) is typing.Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kw["choices"] = [m.value for m in tp]
    elif tp in (int, float, str):
        kw["type"] = tp
    else:  # pragma: no cover - a config field of a type the generator does not know
        raise TypeError(f"cannot make a command-line option of {f.name}: {tp}")
    if "metavar" in f.metadata:
        kw["metavar"] = f.metadata["metavar"]
    return kw


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[DataclassInstance]) -> None:
    """One option per field of the config dataclass ``cls``. Options the user does not give are
    left out of the namespace (``argparse.SUPPRESS``), so the dataclass keeps its own defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        flag = str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        text = str(f.metadata["help"]).replace("%", "%%")
        if tp is bool:
            if default:
                flag = "--no-" + f.name.replace("_", "-")
                text = f"do not {text[0].lower()}{text[1:]}" if not text.startswith("no ") else text
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=argparse.SUPPRESS, help=text)
            continue
        shown = _shown(default)
        if shown is not None:
            text += f" (default: {shown})"
        kw = _field_kwargs(f, tp)
        if required:
            kw["required"] = True
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text, **kw)  # type: ignore[arg-type]


_C = typing.TypeVar("_C", bound="DataclassInstance")


def config_from_args(cls: type[_C], ns: argparse.Namespace, **overrides: object) -> _C:
    """The config ``cls`` from the options given in ``ns`` (others: the dataclass defaults), with
    ``overrides`` applied; validation is the config's ``__post_init__``."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return cls(**{**given, **overrides})


# -------------------------------------------------------------------------------------- commands


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _silent(_msg: str) -> None:
    pass


def _discover(ns: argparse.Namespace) -> int:
    from feature_circuits.circuit import EFFECTS_FILE
    from feature_circuits.distributed import is_main_process
    from feature_circuits.pipeline import discover

    cfg = config_from_args(DiscoverConfig, ns, **({"progress": False} if ns.quiet else {}))
    circuit = discover(cfg, log=_silent if ns.quiet else _stderr)
    if not ns.quiet and cfg.out is not None and is_main_process():  # torchrun: rank 0 reports
        out = Path(cfg.out)
        print(circuit.summary())
        html = f" and {out / 'circuit.html'}" if cfg.html else ""
        print(f"wrote {out / 'circuit.json'}, {out / EFFECTS_FILE}{html}")
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from feature_circuits.pipeline import evaluate

    cfg = config_from_args(EvaluateConfig, ns, **({"progress": False} if ns.quiet else {}))
    evaluate(cfg, log=_stderr, echo=print)
    return 0


def _experiment(module: str, command: str) -> ModuleType:
    """``experiments.<...>`` from the source checkout: importable as is, or from the current
    directory or the checkout the package itself is imported from (an editable install)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name not in ("experiments", module):
            raise
    package_root = Path(__file__).resolve().parents[1]
    for root in (Path.cwd(), package_root):
        if (root / "experiments" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return importlib.import_module(module)
    raise FeatureCircuitsError(
        f"{PROG} {command} runs {module}, which is part of the source checkout, not of the installed "
        "package: run it from the repository root"
    )


def _compare(argv: list[str]) -> int:
    return int(_experiment("experiments.compare", "compare").main(argv))


def _bench(argv: list[str]) -> int:
    return int(_experiment("experiments.benchmark", "bench").main(argv))


_RENDER_HELP = """Write the circuit explorer page (one self-contained offline HTML file) of a circuit.json.

  feature-circuits render out/circuit.json --labels labels.jsonl --out out/circuit.html
  feature-circuits render --compare out/relp out/ig --out compare.html

The labels/groups file is what the page's "download labels/groups" button saves (JSON Lines of
{"site", "feature", "label"} and {"group", "nodes"}); it is checked against the circuit's
dictionaries when circuit.json lists them. With --compare the two circuits are overlaid on one layout:
nodes and edges in both, only in A (dashed orange) or only in B (dashed green). What the page does:
docs/explorer.md.
"""


def _render(argv: list[str]) -> int:
    from feature_circuits.circuit import load_circuit
    from feature_circuits.render import load_labels, render_circuit_html, render_compare_html

    ap = _Parser(
        prog=f"{PROG} render", description=_RENDER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("circuit", nargs="?", help="circuit.json (or its directory)")
    ap.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="two circuits (files or directories) to overlay"
    )
    ap.add_argument("--labels", help="labels/groups file (JSON Lines) shown and edited in the page")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="page to write (default: circuit.html beside the circuit; --compare: compare.html beside A)",
    )
    args = ap.parse_args(argv)
    if (args.circuit is None) == (args.compare is None):
        raise ConfigError(f"{PROG} render: give one CIRCUIT or --compare A B")

    def path_of(p: str) -> Path:
        path = Path(p)
        return path / "circuit.json" if path.is_dir() else path

    paths = [path_of(p) for p in (args.compare or [args.circuit])]
    circuits = [load_circuit(p) for p in paths]
    sizes: dict[str, int] = {}
    for c in circuits:
        sizes.update({site: info.n_features for site, info in c.dictionaries.items()})
    labels = None if args.labels is None else load_labels(args.labels, sizes or None)
    if args.compare is None:
        out = args.out or paths[0].with_name("circuit.html")
        render_circuit_html(circuits[0], out, labels=labels)
    else:
        names = tuple(str(p.parent) if p.name == "circuit.json" else str(p) for p in paths)
        if names[0] == names[1]:
            names = (str(paths[0]), str(paths[1]))
        out = args.out or paths[0].with_name("compare.html")
        render_compare_html(circuits[0], circuits[1], out, labels=labels, names=(names[0], names[1]))
    print(f"wrote {out}")
    return 0


_DOWNLOAD_HELP = """Download and unpack the Marks et al. (2024) Pythia-70M-deduped sparse autoencoders.

Fetches the archive from the Hugging Face hub into the hub cache (resumable; re-running reuses it),
unpacks it into the dictionaries directory and checks that all 19 dictionaries are there:

  <out>/pythia-70m-deduped/{embed, attn_out_layer0..5, mlp_out_layer0..5, resid_out_layer0..5}/10_32768/ae.pt

Nothing is downloaded when the 19 files are already present (use --force to unpack again). The zip
stays in the hub cache (remove it with `hf cache` tooling if space is short). Exit status: 0 when
complete, 1 when files are missing (they are listed), 2 on usage or download errors.
"""


def _download_saes(argv: list[str]) -> int:
    import logging
    import zipfile

    from feature_circuits.dictionaries import download as dl
    from feature_circuits.errors import DownloadError

    ap = _Parser(
        prog=f"{PROG} download-saes",
        description=_DOWNLOAD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to unpack (default: $FEATURE_CIRCUITS_SAES or saes/dictionaries)",
    )
    ap.add_argument("--repo-id", default=dl.DEFAULT_REPO_ID, help="Hugging Face repo (default: %(default)s)")
    ap.add_argument("--filename", default=dl.DEFAULT_FILENAME, help="file in the repo (default: %(default)s)")
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help="hub cache directory (default: the hub's own)"
    )
    ap.add_argument("--force", action="store_true", help="unpack again even if all files are present")
    ap.add_argument("--verify-only", action="store_true", help="only check that the 19 files are present")
    ap.add_argument("--quiet", action="store_true", help="no unpacking progress bar")
    args = ap.parse_args(argv)
    out: Path = args.out if args.out is not None else dl.marks_sae_root()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.verify_only:
        missing = dl.verify_marks_layout(out, dl.DEFAULT_MODEL_DIR, dl.DEFAULT_DICT_ID)
        if missing:
            _stderr(f"{len(missing)} dictionary file(s) missing under {out}:")
            for p in missing:
                _stderr(f"  {p}")
            return 1
        print(f"all 19 dictionaries present under {out}")
        return 0
    try:
        root = dl.download_marks_saes(
            out,
            repo_id=args.repo_id,
            filename=args.filename,
            force=args.force,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
    except zipfile.BadZipFile as err:
        raise DownloadError(
            f"the downloaded archive is corrupt ({err}); delete it from the hub cache (`hf cache`) and "
            "run again"
        ) from None
    print(f"all 19 dictionaries present under {root}")
    return 0


def _toy_datasets(argv: list[str]) -> int:
    from feature_circuits.toy import DATA_DIR
    from feature_circuits.toy.datasets import N_TEST, N_TRAIN, write_datasets

    ap = _Parser(
        prog=f"{PROG} train-toy datasets",
        description="Write the SVA (four templates) and IOI JSON Lines datasets of the embedded model: "
        "<name>_train.jsonl (discovery split: combinations seen in training) and <name>_test.jsonl "
        "(evaluation split: held-out combinations); see feature_circuits/toy/grammar.py for the hold-out "
        "rule.",
    )
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the hold-out rule is seed-free)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: the package data)")
    ap.add_argument(
        "--n-train", type=int, default=N_TRAIN, help="pairs per *_train file (default: %(default)s)"
    )
    ap.add_argument("--n-test", type=int, default=N_TEST, help="pairs per *_test file (default: %(default)s)")
    args = ap.parse_args(argv)
    for p in write_datasets(args.out, args.seed, args.n_train, args.n_test):
        print(p)
    return 0


def _toy_model(argv: list[str]) -> int:
    from feature_circuits.toy.train_model import main as train_model

    train_model(argv)
    return 0


def _toy_saes(argv: list[str]) -> int:
    from feature_circuits.toy.train_saes import main as train_saes

    train_saes(argv)
    return 0


_TOY: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "datasets": (_toy_datasets, "regenerate the shipped datasets from the grammar"),
    "model": (_toy_model, "re-train the embedded model on CPU (defaults reproduce the shipped one)"),
    "saes": (_toy_saes, "re-train its SAEs (dictionary_learning, Marks layout)"),
}


def _train_toy(argv: list[str]) -> int:
    if argv and argv[0] in _TOY:
        return _TOY[argv[0]][0](argv[1:])
    ap = _Parser(prog=f"{PROG} train-toy", description="Regenerate the embedded default (package data).")
    ap.add_argument("part", choices=list(_TOY), help="; ".join(f"{k}: {v[1]}" for k, v in _TOY.items()))
    ap.parse_args(argv)  # only reached for --help or a bad part
    return 2


#: Own-parser commands (and ``train-toy`` parts) whose parsers take ``--threads`` themselves.
_OWN_THREADS = frozenset({"bench", "train-toy model"})


def _take_threads(args: list[str]) -> tuple[list[str], int | None]:
    """``args`` without ``--threads N`` / ``--threads=N``, and N (None when not given)."""
    rest: list[str] = []
    threads: str | None = None
    it = iter(args)
    for a in it:
        if a == "--threads":
            threads = next(it, None)
            if threads is None:
                raise ConfigError("--threads: expected a number of threads")
        elif a.startswith("--threads="):
            threads = a.split("=", 1)[1]
        else:
            rest.append(a)
    if threads is None:
        return rest, None
    if not threads.isdigit() or int(threads) < 1:
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}")
    return rest, int(threads)


def _run_own(args: list[str]) -> int:
    """Run an own-parser command, applying ``--threads`` for it when its parser has none (compare
    gets the default thread count when none is given: it runs the model)."""
    name, rest = args[0], args[1:]
    part = f"{name} {rest[0]}" if rest else name
    if name not in _OWN_THREADS and part not in _OWN_THREADS:
        rest, threads = _take_threads(rest)
        wants_help = "-h" in rest or "--help" in rest
        if not wants_help and (threads is not None or name == "compare"):
            from feature_circuits.runtime import apply_threads

            apply_threads(threads)
    return _OWN_PARSER[name][0](rest)


#: Subcommands that parse their own arguments: name -> (run(argv), one-line help).
_OWN_PARSER: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "render": (_render, "the explorer page of a circuit.json, or --compare A B (two circuits overlaid)"),
    "compare": (
        _compare,
        "atp / relp / ig against exact activation patching (source checkout: experiments/)",
    ),
    "bench": (_bench, "wall time and memory of each method against the 2-forward + 1-backward floor"),
    "download-saes": (_download_saes, "fetch and unpack the Marks et al. Pythia-70M SAEs (needs the HF hub)"),
    "train-toy": (_train_toy, "regenerate the embedded default: train-toy {datasets,model,saes} [options]"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ConfigCommand:
    """A subcommand whose options are generated from a config dataclass."""

    config: type[DataclassInstance]
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str
    example: str
    quiet: str  # help of the CLI-only --quiet switch


_CONFIG_COMMANDS: dict[str, _ConfigCommand] = {
    "discover": _ConfigCommand(
        config=DiscoverConfig,
        run=_discover,
        help="node + edge effects, thresholded into DIR/circuit.json and DIR/circuit.html",
        description="Discover a sparse feature circuit: attribute the metric to SAE features and error "
        "nodes, aggregate over examples, threshold, and write DIR/circuit.json, DIR/effects.safetensors "
        "(the aggregated effect of every node, which `evaluate` sweeps below --node-threshold) and an "
        "interactive DIR/circuit.html. Measured node counts, faithfulness and timings per threshold: "
        "docs/methods.md.",
        example="discover --method relp --num-examples 64 --out out/",
        quiet="no progress bar or summary",
    ),
    "evaluate": _ConfigCommand(
        config=EvaluateConfig,
        run=_evaluate,
        help="held-out faithfulness/completeness by mean ablation: eval.json + eval.html",
        description="Faithfulness and completeness of one or more circuits by mean ablation (or --ablation "
        "zero, patch, resample) on held-out "
        "data. For each --circuit it loads the model and dictionaries the circuit.json names and, when "
        "it names an effects file, every node's effect (so the threshold sweep reaches below the "
        "discovery threshold). Writes eval.json per circuit and one eval.html plot (several circuits on "
        "one plot), with the integrated scores (auc, MIB's cpr and cmd) on a fixed grid of sizes, their "
        "bootstrap intervals and a random-circuit baseline. Evaluating on a circuit's own discovery "
        "data is refused unless --allow-discovery-split is given.",
        example="evaluate --circuit out/relp/circuit.json --circuit out/ig --split test",
        quiet="no progress bar",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``discover`` and ``evaluate`` generated from their configs; the other
    subcommands are listed here and parse their own options."""
    p = _Parser(
        prog=PROG,
        description="Sparse feature circuits in language models: discover a circuit of SAE features and "
        "error nodes, evaluate it by mean ablation. Each subcommand takes --help and --threads N (torch CPU "
        "threads).",
    )
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    for name, cmd in _CONFIG_COMMANDS.items():
        c = sub.add_parser(
            name, help=cmd.help, description=cmd.description, epilog=f"Example: {PROG} {cmd.example}"
        )
        add_config_arguments(c, cmd.config)
        c.add_argument("--quiet", action="store_true", help=cmd.quiet)
        c.set_defaults(run=cmd.run)
    for name, (_, text) in _OWN_PARSER.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``feature-circuits`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in _OWN_PARSER:
            return _run_own(args)
        ns = build_parser().parse_args(args)
        run: Callable[[argparse.Namespace], int] = ns.run
        return run(ns)
    except FeatureCircuitsError as err:
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:  # --help, and the experiments' own parsers
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
