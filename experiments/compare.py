"""Component-level faithfulness check of the attribution approximations (docs/algorithms.md,
"Component-level check").

For every layer's ``resid_l``, ``attn_l`` and ``mlp_l`` output (the whole vector at one position), the
exact indirect effect of patching it clean -> patch (one forward per (site, position), stacked along
the batch dimension) is compared with the atp / relp / ig scores of the same component,
``delta x . g`` summed over the hidden dimensions (g the gradient, the LRP propagation coefficient
for relp, or the IG-averaged gradient). The approximations are computed with the attribution engine on
identity dictionaries (``"neurons"``): the per-dimension feature effects summed over dimensions are
exactly the component score, and the error node is identically zero. The result is the Pearson
correlation with exact per component kind over all (pair, layer, position) points.

``features=True`` does the same at the SAE-feature level: the attribution engine's exact (one
patched forward per feature with a nonzero delta, and per error node) against atp / relp / ig, over
every node whose delta is nonzero, per site kind with feature nodes and error nodes apart (kinds
``"resid features"``, ``"resid errors"``, ...).

Pairs are built for the model's own tokenizer from the project's word lists (feature_circuits.grammar),
keeping only words that are one token (with the leading space) and pairs whose clean/patch prefixes
have equal token lengths and whose answers tokenize as one separate token after the prefix.

    result = run_compare("embedded", task="ioi", num_pairs=100)
    write_outputs(result, "out/")   # pcc.json, pcc.md, pcc.html
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feature_circuits.data import DatasetError, Pair, make_batches, tokenize_pair
from feature_circuits.model.sites import get_activation, save
from feature_circuits.toy import grammar
from feature_circuits.types import LRPConfig, Method, Site, SiteKind

COMPONENT_KINDS = ("resid", "attn", "mlp")
DEFAULT_METHODS = ("atp", "relp", "ig")
TASKS = ("ioi", "sva")


class PairBuildError(ValueError):
    """The tokenizer cannot express the task's pairs (too few single-token words, or no valid pair)."""


# ------------------------------------------------------------------------------------------ pairs


def _unk_id(tokenizer: Any) -> int | None:
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if unk is None else int(unk)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def is_single_token(tokenizer: Any, word: str) -> bool:
    """``" " + word`` is exactly one (known) token of ``tokenizer``."""
    ids = token_ids(tokenizer, " " + word)
    return len(ids) == 1 and ids[0] != _unk_id(tokenizer)


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    return [w for w in words if is_single_token(tokenizer, w)]


def _require(tokenizer: Any, what: str, kept: Sequence[Any], pool: Sequence[Any], need: int) -> None:
    if len(kept) < need:
        example = pool[0] if pool else "?"
        example_word = example[0] if isinstance(example, tuple) else example
        toks = tokenizer.convert_ids_to_tokens(token_ids(tokenizer, " " + example_word))
        raise PairBuildError(
            f"need at least {need} {what} that are single tokens (with a leading space) in this tokenizer, "
            f"found {len(kept)} of {len(pool)} (e.g. {' ' + example_word!r} -> {toks}); "
            "this tokenizer cannot express the task's pairs"
        )


def _validated(candidates: Any, tokenizer: Any, n: int, task: str) -> list[Pair]:
    pairs: list[Pair] = []
    first_error: str | None = None
    seen: set[tuple[str, str]] = set()
    for i, ex in enumerate(candidates):
        key = (ex["clean_prefix"], ex["clean_answer"])
        if key in seen:
            continue
        seen.add(key)
        pair = Pair(**ex, source=f"<{task} builder>", line=i + 1)
        try:
            tokenize_pair(pair, tokenizer)
        except DatasetError as err:
            first_error = first_error or err.problem
            continue
        pairs.append(pair)
        if len(pairs) >= n:
            break
    if not pairs:
        raise PairBuildError(f"no valid {task} pair for this tokenizer (first problem: {first_error})")
    return pairs


def build_ioi_pairs(tokenizer: Any, n: int, seed: int = 0) -> list[Pair]:
    """Up to ``n`` distinct IOI pairs ("Then , B and A went to the PLACE . B gave a OBJECT to" -> " A",
    patch swaps the names) from names/places/objects that are single tokens in ``tokenizer``; seeded.
    Fewer than ``n`` only when the tokenizer admits fewer distinct combinations."""
    names = single_token_words(tokenizer, grammar.NAMES)
    places = single_token_words(tokenizer, grammar.PLACES)
    objects = single_token_words(tokenizer, grammar.OBJECTS)
    _require(tokenizer, "IOI names", names, grammar.NAMES, 2)
    _require(tokenizer, "IOI places", places, grammar.PLACES, 1)
    _require(tokenizer, "IOI objects", objects, grammar.OBJECTS, 1)
    combos = [(b, a, p, o) for b, a in itertools.permutations(names, 2) for p in places for o in objects]
    random.Random(f"compare|ioi|{seed}").shuffle(combos)
    return _validated((grammar.make_ioi_pair(*c) for c in combos), tokenizer, n, "ioi")


def build_sva_pairs(tokenizer: Any, n: int, seed: int = 0) -> list[Pair]:
    """Up to ``n`` distinct SVA pairs over the four structures (round robin) from nouns/verbs whose
    singular and plural forms are single tokens in ``tokenizer``; seeded."""

    def both(pairs_: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        return [p for p in pairs_ if is_single_token(tokenizer, p[0]) and is_single_token(tokenizer, p[1])]

    nouns, verbs, rc_verbs = both(grammar.NOUNS), both(grammar.AGREE_VERBS), both(grammar.RC_VERBS)
    preps = single_token_words(tokenizer, grammar.PREPOSITIONS) or ["near"]
    _require(tokenizer, "SVA noun pairs (singular and plural)", nouns, grammar.NOUNS, 1)
    _require(tokenizer, "SVA verb pairs (singular and plural)", verbs, grammar.AGREE_VERBS, 1)
    rng = random.Random(f"compare|sva|{seed}")

    def candidates():
        for i in range(200 * n + 1000):
            structure = grammar.STRUCTURES[i % len(grammar.STRUCTURES)]
            if structure != "simple" and len(nouns) < 2:
                structure = "simple"
            if structure in ("within_rc", "rc") and not rc_verbs:
                structure = "nounpp" if len(nouns) >= 2 else "simple"
            noun = rng.choice(nouns)
            attractor = rng.choice([x for x in nouns if x != noun]) if structure != "simple" else None
            verb = rng.choice(rc_verbs if structure == "within_rc" else verbs)
            yield grammar.make_sva_pair(
                structure,
                noun,
                verb,
                plural=rng.random() < 0.5,
                attractor=attractor,
                attractor_plural=rng.random() < 0.5,
                other_verb=rng.choice(rc_verbs) if structure == "rc" else None,
                preposition=rng.choice(preps),
            )

    return _validated(candidates(), tokenizer, n, "sva")


def build_pairs(task: str, tokenizer: Any, n: int, seed: int = 0) -> list[Pair]:
    if task == "ioi":
        return build_ioi_pairs(tokenizer, n, seed)
    if task == "sva":
        return build_sva_pairs(tokenizer, n, seed)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


# ------------------------------------------------------------------------------------ components


def component_sites(loaded: Any) -> list[Site]:
    """resid/attn/mlp sites of every layer (forward order; the embedding is not a component)."""
    return [s for s in loaded.sites if s.kind is not SiteKind.EMBED]


@torch.no_grad()
def _site_acts(
    loaded: Any, ids: torch.Tensor, sites: Sequence[Site]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    lm = loaded.lm
    saved: dict[str, Any] = {}
    with lm.trace(ids.to(loaded.device)):
        for s in sites:
            saved[s.name] = save(get_activation(lm, s))
        saved["__logits__"] = lm.output.logits.save()
    logits = saved.pop("__logits__")
    return {k: v.detach() for k, v in saved.items()}, logits.detach()


def component_exact(
    loaded: Any,
    batch: Any,
    sites: Sequence[Site] | None = None,
    *,
    metric: Any = None,
    max_rows: int = 256,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Exact component effects (b, s) per site: m(clean | x_site[pos] <- x_site^patch[pos]) - m(clean),
    one patched forward per (example, position) whose activation differs between clean and patch
    (the others' effects are exactly 0), ``max_rows`` of them stacked per forward. With
    ``resume`` the patched forwards start at the site from the clean run's state, for the positions
    from the patched one on (docs/algorithms.md, "Resuming from the patched site"); else, or for a
    model the resumable runner does not know, they re-run the whole model. ``progress``: a bar over
    the patches (None: when stderr is a terminal)."""
    from feature_circuits.attribution.exact import PatchRunner, row_chunks
    from feature_circuits.metrics import logit_diff
    from feature_circuits.progress import progress_bar

    metric = logit_diff if metric is None else metric
    sites = component_sites(loaded) if sites is None else list(sites)
    clean_acts, clean_logits = _site_acts(loaded, batch.clean, sites)
    patch_acts, _ = _site_acts(loaded, batch.patch, sites)
    with torch.no_grad():
        m_clean = metric(clean_logits, batch)
    runner = PatchRunner(loaded, batch, metric, m_clean, resume=resume)
    b, seq = batch.clean.shape
    deltas = {s.name: patch_acts[s.name] - clean_acts[s.name] for s in sites}  # (b, s, d)
    # only (example, position)s whose activation changes are patched: the others' effects are 0
    todo = {name: (d != 0).any(-1).nonzero().cpu() for name, d in deltas.items()}
    out: dict[str, torch.Tensor] = {}
    bar = progress_bar(
        total=sum(int(t.shape[0]) for t in todo.values()),
        desc="exact components",
        unit="patch",
        enabled=progress,
    )
    with bar:
        for s in sites:
            delta, rows = deltas[s.name], todo[s.name]
            eff = torch.zeros(b, seq, dtype=delta.dtype)
            for r0, r1 in row_chunks(int(rows.shape[0]), max_rows):
                e, pos = rows[r0:r1, 0], rows[r0:r1, 1]
                vec = delta[e.to(delta.device), pos.to(delta.device)]
                eff[e, pos] = (
                    runner.effects(s, e.to(delta.device), pos.to(delta.device), vec).cpu().to(eff.dtype)
                )
                bar.update(int(e.shape[0]))
            out[s.name] = eff
    return out


def component_scores(
    loaded: Any,
    neuron_dicts: dict[str, Any],
    batch: Any,
    method: Method | str,
    *,
    sites: Sequence[Site] | None = None,
    steps: int = 10,
    lrp: LRPConfig | None = None,
) -> dict[str, torch.Tensor]:
    """atp / relp / ig component scores (b, s) per site: delta x . g summed over the hidden dims,
    from the attribution engine on identity dictionaries (feature effects summed over dims)."""
    from feature_circuits.attribution import method_spec, node_effects

    sites = component_sites(loaded) if sites is None else list(sites)
    options = method_spec(method).options_from({"steps": steps, "lrp": lrp})
    nodes = node_effects(
        loaded, neuron_dicts, batch, Method(method), options=options, sites=[s.name for s in sites]
    )
    effects = nodes.dense().effects  # plain tensors (a no-op unless on the sparse feature path)
    return {s.name: effects[s.name][..., :-1].sum(-1).detach().cpu() for s in sites}


# ---------------------------------------------------------------------------------------- running


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


@dataclass
class CompareResult:
    model: str
    task: str
    num_pairs: int
    methods: list[str]
    level: str  # "component" or "feature"
    kinds: list[str]
    #: points[method][kind] = (exact, score) 1-d arrays over all points
    points: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    timing_s: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pcc(self) -> dict[str, dict[str, float]]:
        return {m: {k: pearson(*self.points[m][k]) for k in self.kinds} for m in self.methods}

    def to_json(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 6)

        return {
            "model": self.model,
            "task": self.task,
            "num_pairs": self.num_pairs,
            "level": self.level,
            "pcc": {m: {k: clean(v) for k, v in d.items()} for m, d in self.pcc.items()},
            "num_points": {k: int(self.points[self.methods[0]][k][0].size) for k in self.kinds}
            if self.methods
            else {},
            "timing_s": {k: round(v, 4) for k, v in self.timing_s.items()},
            **self.extra,
        }


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0)


def _add_node_points(
    pts: dict[str, list[np.ndarray]],
    effects: dict[str, torch.Tensor],
    keep: dict[str, torch.Tensor],
    site_kind: dict[str, str],
) -> None:
    """Append the effects of the kept nodes, feature nodes and error nodes of a site kind apart."""
    for k, eff in effects.items():
        for part, cols in (("features", slice(0, -1)), ("errors", slice(-1, None))):
            vals = eff[..., cols][keep[k][..., cols]]
            pts.setdefault(f"{site_kind[k]} {part}", []).append(vals.detach().cpu().numpy())


def run_compare(
    model: str | None = None,
    *,
    task: str = "ioi",
    num_pairs: int = 100,
    methods: Sequence[str] = DEFAULT_METHODS,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = "cpu",
    features: bool = False,
    saes: str | None = None,
    steps: int = 10,
    loaded_and_dicts: tuple[Any, dict[str, Any]] | None = None,
    log: Any = None,
    progress: bool | None = None,
) -> CompareResult:
    """Run the component-level (or, with ``features``, feature-level) comparison. ``progress``:
    progress bars over the batches and the exact patches (None: when stderr is a terminal)."""
    from feature_circuits.attribution import ExactOptions, load_for_attribution, method_spec, node_effects
    from feature_circuits.progress import progress as progress_iter

    methods = [Method(m).value for m in methods]
    if "exact" in methods:
        raise ValueError("exact is the reference; pass approximations only (atp, relp, ig)")
    if loaded_and_dicts is None:
        loaded, dicts = load_for_attribution(model, saes if features else "neurons", device=device)
    else:
        loaded, dicts = loaded_and_dicts
    pairs = build_pairs(task, loaded.tokenizer, num_pairs, seed)
    if log:
        log(f"{len(pairs)} {task} pairs for {loaded.name}")
    batches = make_batches(pairs, loaded.tokenizer, batch_size)
    timing = dict.fromkeys(["exact", *methods], 0.0)
    exact_pts: dict[str, list[np.ndarray]] = {}
    score_pts: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in methods}
    site_kind = {s.name: s.kind.value for s in loaded.sites}
    show = progress
    for bi, batch in enumerate(progress_iter(batches, desc="compare", unit="batch", enabled=show)):
        if features:
            t0 = time.perf_counter()
            ex = node_effects(loaded, dicts, batch, Method.EXACT, options=ExactOptions(progress=show))
            timing["exact"] += time.perf_counter() - t0
            keep = {
                k: torch.cat([d.f != 0, (d.err != 0).any(-1, keepdim=True)], -1) for k, d in ex.deltas.items()
            }
            _add_node_points(exact_pts, ex.effects, keep, site_kind)
            for m in methods:
                t0 = time.perf_counter()
                ne = node_effects(
                    loaded,
                    dicts,
                    batch,
                    Method(m),
                    options=method_spec(m).options_from({"steps": steps, "progress": show}),
                )
                timing[m] += time.perf_counter() - t0
                _add_node_points(score_pts[m], ne.effects, keep, site_kind)
        else:
            sites = component_sites(loaded)
            t0 = time.perf_counter()
            ex = component_exact(loaded, batch, sites, progress=show)
            timing["exact"] += time.perf_counter() - t0
            for s in sites:
                exact_pts.setdefault(s.kind.value, []).append(ex[s.name].numpy().ravel())
            for m in methods:
                t0 = time.perf_counter()
                sc = component_scores(loaded, dicts, batch, m, sites=sites, steps=steps)
                timing[m] += time.perf_counter() - t0
                for s in sites:
                    score_pts[m].setdefault(s.kind.value, []).append(sc[s.name].numpy().ravel())
        if log:
            log(f"batch {bi + 1}/{len(batches)} (b={len(batch)}, s={batch.seq_len}) done")
    kinds = [k for k in ("embed", *COMPONENT_KINDS) if k in exact_pts]
    if features:
        kinds = [
            f"{k} {part}"
            for k in ("embed", *COMPONENT_KINDS)
            for part in ("features", "errors")
            if f"{k} {part}" in exact_pts
        ]
    points = {m: {k: (_concat(exact_pts[k]), _concat(score_pts[m][k])) for k in kinds} for m in methods}
    return CompareResult(
        model=loaded.name,
        task=task,
        num_pairs=len(pairs),
        methods=methods,
        level="feature" if features else "component",
        kinds=kinds,
        points=points,
        timing_s=timing,
        extra={
            "seed": seed,
            "batch_size": batch_size,
            "ig_steps": steps,
            "metric": "logit(patch answer) - logit(clean answer) at the last position",
            "saes": str(saes) if features else "neurons (identity)",
        },
    )


# ---------------------------------------------------------------------------------------- outputs


def markdown_table(result: CompareResult) -> str:
    pcc = result.pcc
    head = f"| method | {' | '.join(result.kinds)} | time (s) |"
    sep = "|" + "---|" * (len(result.kinds) + 2)
    lines = [
        (
            f"PCC with exact activation patching ({result.level} level), model `{result.model}`, task "
            f"{result.task}, {result.num_pairs} pairs"
        ),
        "",
        head,
        sep,
    ]
    for m in result.methods:
        vals = " | ".join("nan" if math.isnan(pcc[m][k]) else f"{pcc[m][k]:.3f}" for k in result.kinds)
        lines.append(f"| {m} | {vals} | {result.timing_s.get(m, float('nan')):.2f} |")
    lines.append(
        f"| exact (reference) | {' | '.join('1' for _ in result.kinds)} | {result.timing_s['exact']:.2f} |"
    )
    return "\n".join(lines) + "\n"


def scatter_html(result: CompareResult, path: str | Path, max_points: int = 5000) -> None:
    """Self-contained plotly page: method score vs exact, one panel per component kind."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pcc = result.pcc
    fig = make_subplots(rows=1, cols=len(result.kinds), subplot_titles=result.kinds)
    colors = {"atp": "#1f77b4", "relp": "#d62728", "ig": "#2ca02c"}
    rng = np.random.default_rng(0)
    for ci, kind in enumerate(result.kinds, start=1):
        lo, hi = math.inf, -math.inf
        for m in result.methods:
            x, y = result.points[m][kind]
            if x.size > max_points:
                idx = np.sort(rng.choice(x.size, max_points, replace=False))
                x, y = x[idx], y[idx]
            if x.size:
                lo, hi = min(lo, float(x.min()), float(y.min())), max(hi, float(x.max()), float(y.max()))
            fig.add_trace(
                go.Scattergl(
                    x=x,
                    y=y,
                    mode="markers",
                    marker={"size": 4, "opacity": 0.6, "color": colors.get(m)},
                    name=f"{m} (r={pcc[m][kind]:.3f})",
                    legendgroup=m,
                    showlegend=True,
                ),
                row=1,
                col=ci,
            )
        if math.isfinite(lo):
            fig.add_trace(
                go.Scatter(
                    x=[lo, hi],
                    y=[lo, hi],
                    mode="lines",
                    line={"dash": "dot", "color": "gray"},
                    name="y = x",
                    showlegend=ci == 1,
                ),
                row=1,
                col=ci,
            )
        fig.update_xaxes(title_text="exact", row=1, col=ci)
        fig.update_yaxes(title_text="method score", row=1, col=ci)
    fig.update_layout(
        title=f"{result.level}-level scores vs exact patching: {result.model}, {result.task}, "
        f"{result.num_pairs} pairs",
        height=480,
        width=420 * len(result.kinds) + 200,
    )
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def write_outputs(result: CompareResult, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "pcc.json", "md": out / "pcc.md", "html": out / "pcc.html"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    paths["md"].write_text(markdown_table(result))
    scatter_html(result, paths["html"])
    return paths


# -------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="feature-circuits compare",
        description="Component-level (or --features: SAE-feature-level) check of atp / relp / ig against "
        "exact activation patching: Pearson correlation per component kind (docs/algorithms.md: "
        "Component-level check).",
    )
    p.add_argument(
        "--model", default="embedded", help="'embedded' (default), an HF id or a local model directory"
    )
    p.add_argument("--task", choices=TASKS, default="ioi")
    p.add_argument("--num-pairs", type=int, default=100)
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of atp,relp,ig"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="IG steps (default 10)")
    p.add_argument("--out", required=True, help="output directory (pcc.json, pcc.md, pcc.html)")
    p.add_argument("--features", action="store_true", help="SAE-feature level instead of whole components")
    p.add_argument(
        "--saes", default=None, help="with --features: 'embedded', 'marks' or a Marks-layout directory"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in DEFAULT_METHODS]
    if bad or not methods:
        print(
            f"error: --methods must be a comma-separated subset of {','.join(DEFAULT_METHODS)}, got {bad}",
            file=sys.stderr,
        )
        return 2
    if args.num_pairs < 1:
        print("error: --num-pairs must be >= 1", file=sys.stderr)
        return 2
    if args.saes and not args.features:
        print("error: --saes only applies with --features", file=sys.stderr)
        return 2
    try:
        result = run_compare(
            args.model,
            task=args.task,
            num_pairs=args.num_pairs,
            methods=methods,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            features=args.features,
            saes=args.saes if args.features else None,
            steps=args.steps,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except PairBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out)
    sys.stdout.write(markdown_table(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0
