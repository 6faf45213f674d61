"""The SAELens registry, read offline: a release name -> its model, its SAEs' TransformerLens hooks,
the sites they are spliced into, and their Neuronpedia ids (docs/algorithms.md, "Dictionaries and
the error node").

The registry is the ``pretrained_saes.yaml`` that ships inside the ``sae_lens`` package. It is read
as a file (``sae_lens`` is not imported, nothing is downloaded), so resolving ``--saes
saelens:RELEASE`` against a model is cheap and works without the hub:

    resolve_saelens_spec("saelens:pythia-70m-deduped-res-sm", model_names=["EleutherAI/pythia-70m-deduped"],
                         architecture=Architecture.GPT_NEOX, n_layers=6)
    # -> [RegistrySAE(release=..., sae_id="blocks.0.hook_resid_pre", site="embed", ...), ...]

Spec grammar (after ``saelens:``): comma-separated items; an item is a release (all its SAEs, the
first listed where it has several for one site), or
``RELEASE/SAE_ID`` (one SAE; SAE ids may themselves contain ``/``), or a bare ``SAE_ID`` of the
release named by the item before it (``saelens:R/id1,id2``).

The hook of an SAE is known offline when the registry entry's ``config_overrides`` names it, when
the release's converter derives it from names alone (Gemma Scope's ``gemma_2``: sae_lens's own
config getter is called, which reads no file), or when the SAE id is a hook name
(``blocks.3.hook_resid_post``, with an optional ``__suffix``). Otherwise it is read from the SAE's
downloaded config when the SAE is loaded (:attr:`RegistrySAE.hook_name` is then None).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from feature_circuits.errors import DictionaryError
from feature_circuits.types import Architecture

__all__ = [
    "SAELENS_PREFIX",
    "RegistrySAE",
    "Release",
    "get_release",
    "is_saelens_spec",
    "load_registry",
    "model_matches",
    "parse_saelens_spec",
    "registry_path",
    "resolve_saelens_spec",
]

#: ``--saes saelens:...`` selects SAELens registry SAEs.
SAELENS_PREFIX = "saelens:"
#: How to install sae-lens (an optional dependency of this package).
INSTALL_HINT = "install it with `pip install 'feature-circuits[saelens]'` (or `pip install sae-lens`)"
#: Converters whose config getter derives the hook from the release and SAE path alone (no file read).
_OFFLINE_CONFIG_GETTERS = frozenset({"gemma_2"})
_HOOK_ID = re.compile(r"^(hook_embed|blocks\.\d+\.(?:attn\.|mlp\.)?hook_\w+?)(?:__.*)?$")


@dataclass(frozen=True, kw_only=True)
class RegistrySAE:
    """One SAE of a release: its id and path in the release's repository, its Neuronpedia id, its
    TransformerLens hook (None when only its downloaded config says) and, once resolved against a
    model, its site."""

    release: str
    sae_id: str
    path: str
    neuronpedia: str | None = None
    hook_name: str | None = None
    site: str | None = None

    @property
    def source(self) -> str:
        """``RELEASE/SAE_ID``, as circuit.json records it."""
        return f"{self.release}/{self.sae_id}"


@dataclass(frozen=True, kw_only=True)
class Release:
    """A registry release: the model it was trained on (TransformerLens name or hub id), the hub
    repository, the sae_lens converter, and its SAEs in registry order."""

    name: str
    model: str
    repo_id: str
    conversion_func: str | None
    saes: tuple[RegistrySAE, ...]

    def sae(self, sae_id: str) -> RegistrySAE:
        """The SAE ``sae_id`` (DictionaryError listing close matches if unknown)."""
        for s in self.saes:
            if s.sae_id == sae_id:
                return s
        ids = [s.sae_id for s in self.saes]
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.5)
        listing = close or ids[:8]
        raise DictionaryError(
            f"saelens: release {self.name!r} has no SAE {sae_id!r} ({len(ids)} SAEs; "
            f"{'close matches' if close else 'e.g.'}: {', '.join(listing)})"
        )


def registry_path() -> Path:
    """``pretrained_saes.yaml`` of the installed ``sae_lens`` (found without importing it)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise DictionaryError(f"--saes saelens:...: the sae_lens package is not installed; {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "pretrained_saes.yaml"
        if path.is_file():
            return path
    raise DictionaryError(f"the installed sae_lens has no pretrained_saes.yaml (looked in {spec.origin})")


@lru_cache(maxsize=2)
def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=loader)
    if not isinstance(data, dict):
        raise DictionaryError(f"{path}: expected a mapping of releases")
    return data


def load_registry() -> dict[str, Any]:
    """The raw registry: release name -> its YAML entry (parsed once per process)."""
    return _read_yaml(str(registry_path()))


def _hook_from_id(sae_id: str) -> str | None:
    m = _HOOK_ID.match(sae_id)
    return m.group(1) if m else None


def _offline_hook(conversion_func: str, repo_id: str, path: str) -> str | None:
    """The hook sae_lens's own config getter derives from names alone (no download)."""
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_CONFIG_GETTERS

    getter = NAMED_PRETRAINED_SAE_CONFIG_GETTERS[conversion_func]
    try:
        cfg = getter(repo_id, path, "cpu", False, None)
    except ValueError:
        return None
    hook = cfg.get("hook_name")
    return hook if isinstance(hook, str) else None


def get_release(name: str) -> Release:
    """The release called ``name`` (DictionaryError listing close matches if unknown)."""
    registry = load_registry()
    entry = registry.get(name)
    if not isinstance(entry, dict):
        close = difflib.get_close_matches(name, list(registry), n=6, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"{len(registry)} releases are known"
        raise DictionaryError(f"saelens: unknown release {name!r} ({hint}; registry {registry_path()})")
    return _release_cached(name, str(registry_path()))


@lru_cache(maxsize=64)
def _release_cached(name: str, path: str) -> Release:
    return _release_from_entry(name, _read_yaml(path)[name])


def _release_from_entry(name: str, entry: dict[str, Any]) -> Release:
    overrides = entry.get("config_overrides") or {}
    forced_hook = overrides.get("hook_name") if isinstance(overrides, dict) else None
    conv = entry.get("conversion_func")
    repo_id = str(entry.get("repo_id", ""))
    saes = []
    for raw in entry.get("saes") or []:
        sae_id, path = str(raw["id"]), str(raw.get("path", raw["id"]))
        hook = forced_hook if isinstance(forced_hook, str) else None
        if hook is None and conv in _OFFLINE_CONFIG_GETTERS:
            hook = _offline_hook(str(conv), repo_id, path)
        if hook is None:
            hook = _hook_from_id(sae_id)
        npd = raw.get("neuronpedia")
        saes.append(
            RegistrySAE(
                release=name,
                sae_id=sae_id,
                path=path,
                neuronpedia=str(npd) if npd else None,
                hook_name=hook,
            )
        )
    return Release(
        name=name,
        model=str(entry.get("model", "")),
        repo_id=repo_id,
        conversion_func=None if conv is None else str(conv),
        saes=tuple(saes),
    )


def is_saelens_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(SAELENS_PREFIX)


def parse_saelens_spec(spec: str) -> list[tuple[str, str | None]]:
    """``saelens:R1,R2/ID,ID2`` -> ``[(R1, None), (R2, ID), (R2, ID2)]`` (``None``: every SAE of the
    release). Release names are checked against the registry (close matches on a typo)."""
    if not is_saelens_spec(spec):
        raise DictionaryError(f"not a saelens spec: {spec!r} (expected {SAELENS_PREFIX}RELEASE[/SAE_ID],...)")
    body = spec[len(SAELENS_PREFIX) :].strip()
    items = [item.strip() for item in body.split(",")]
    if not body or any(not item for item in items):
        raise DictionaryError(
            f"--saes {spec!r}: empty release or SAE id (expected {SAELENS_PREFIX}RELEASE,...)"
        )
    registry = load_registry()
    out: list[tuple[str, str | None]] = []
    current: str | None = None
    for item in items:
        if item in registry:
            current = item
            out.append((item, None))
            continue
        # the longest registry release that prefixes the item before a '/'
        parts = item.split("/")
        release = next(
            ("/".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if "/".join(parts[:k]) in registry),
            None,
        )
        if release is not None:
            current = release
            out.append((release, item[len(release) + 1 :]))
        elif current is not None:  # a bare SAE id of the previous item's release
            out.append((current, item))
        else:
            get_release(parts[0])  # DictionaryError with close matches
            raise DictionaryError(f"--saes {spec!r}: cannot read {item!r}")
    return out


def _norm_model(name: str) -> str:
    return name.strip().rstrip("/").rsplit("/", 1)[-1].lower()


def model_matches(release_model: str, model_names: Iterable[str]) -> bool:
    """Whether a release's model (``pythia-70m-deduped``, ``google/gemma-3-1b-pt``) is one of
    ``model_names`` (hub ids, local directories, the config's ``_name_or_path``): compared by
    their last path component, case-insensitively."""
    want = _norm_model(release_model)
    return any(n and _norm_model(str(n)) == want for n in model_names)


def resolve_saelens_spec(
    spec: str,
    *,
    model_names: Sequence[str],
    architecture: Architecture | str,
    n_layers: int | None = None,
    site_names: Iterable[str] | None = None,
) -> list[RegistrySAE]:
    """The SAEs of ``spec``, each with its site in a model of ``architecture`` (``n_layers``
    layers; with ``site_names``, the site must be among them). DictionaryError for an unknown
    release or SAE id (close matches), a release trained on another model than ``model_names``, an
    SAE whose hook has no site, and two SAEs for one site. SAEs whose hook only their downloaded
    config names keep ``site=None`` (resolved when loaded). A whole release that holds several SAEs
    for one site (several widths or sparsities) contributes the first one its registry entry lists."""
    from feature_circuits.model.hooks import site_for_hook

    known = None if site_names is None else set(site_names)
    chosen: list[RegistrySAE] = []
    checked: set[str] = set()
    for release_name, sae_id in parse_saelens_spec(spec):
        release = get_release(release_name)
        if release_name not in checked:
            checked.add(release_name)
            if not model_matches(release.model, model_names):
                names = ", ".join(repr(n) for n in dict.fromkeys(model_names) if n)
                raise DictionaryError(
                    f"--saes saelens:{release_name}: the release was trained on model {release.model!r}, "
                    f"but --model is {names}; pass that model (a local copy must keep its name, e.g. a "
                    f"directory called {release.model.rsplit('/', 1)[-1]!r})"
                )
        picked = release.saes if sae_id is None else (release.sae(sae_id),)
        first_of_site: set[str] = set()
        for sae in picked:
            if sae.hook_name is None:
                chosen.append(sae)
                continue
            try:
                site = site_for_hook(sae.hook_name, architecture, n_layers=n_layers)
            except DictionaryError:
                raise
            except ValueError as err:
                raise DictionaryError(f"SAELens SAE {sae.source}: {err}") from err
            if known is not None and site not in known:
                raise DictionaryError(
                    f"SAELens SAE {sae.source}: hook {sae.hook_name} is site {site}, which this model "
                    f"does not have"
                )
            if sae_id is None:
                # a whole release may hold several SAEs per site (widths, sparsities): the first the
                # registry lists is taken (Gemma Scope canonical: the 16k width)
                if site in first_of_site:
                    continue
                first_of_site.add(site)
            chosen.append(replace(sae, site=site))
    check_one_per_site(chosen)
    return chosen


def check_one_per_site(saes: Sequence[RegistrySAE]) -> None:
    """DictionaryError when two SAEs are for one site (naming both)."""
    seen: dict[str, RegistrySAE] = {}
    for sae in saes:
        if sae.site is None:
            continue
        if sae.site in seen:
            raise DictionaryError(
                f"two SAEs for site {sae.site}: {seen[sae.site].source} and {sae.source} (hook "
                f"{sae.hook_name}); choose one with saelens:RELEASE/SAE_ID"
            )
        seen[sae.site] = sae
