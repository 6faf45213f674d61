"""The labels/groups file: feature labels and named groups of nodes (supernodes), JSON Lines.

    {"site": "resid_3", "feature": 123, "label": "plural nouns"}      # a feature's label
    {"site": "resid_3", "feature": null, "label": "resid_3 error"}    # the site's error node
    {"group": "subject number", "nodes": ["resid_0/12", "attn_1/3"]}  # a group of node ids

``discover --labels`` and ``render --labels`` read it; the explorer page writes it back (its
"download labels/groups" button) with the labels and groups edited in the page. Files with label
lines only (the format before groups existed) read as before. Blank lines are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from feature_circuits.errors import LabelsError
from feature_circuits.types import ERROR_TOKEN, Site

__all__ = ["Group", "Labels", "dump_labels", "load_labels", "parse_node_id"]

_NODE_ID = re.compile(r"^(?P<site>[a-z_0-9]+?)(?:@(?P<pos>\d+))?/(?P<feat>\d+|" + ERROR_TOKEN + r")$")


@dataclass(frozen=True)
class Group:
    """A named group of nodes (a supernode), by node id."""

    name: str
    nodes: tuple[str, ...]


class Labels(dict[tuple[str, "int | None"], str]):
    """Feature labels by ``(site, feature)`` (feature None: the site's error node), plus the file's
    groups in :attr:`groups` (in file order). A plain dict otherwise, so code that only wants labels
    sees what ``load_labels`` always returned."""

    def __init__(
        self,
        labels: Mapping[tuple[str, int | None], str] | None = None,
        groups: Iterable[Group] = (),
    ) -> None:
        super().__init__(labels or {})
        self.groups: list[Group] = list(groups)


def parse_node_id(node_id: str) -> tuple[str, int | None, int | None]:
    """``resid_3@4/123`` -> ``("resid_3", 123, 4)``; ``resid_3/err`` -> ``("resid_3", None, None)``.
    ``ValueError`` when it is not a node id."""
    m = _NODE_ID.match(node_id) if isinstance(node_id, str) else None
    if m is None or not Site.is_name(m.group("site")):
        raise ValueError(
            f"not a node id: {node_id!r} (expected SITE/FEATURE, SITE@POSITION/FEATURE or SITE/err)"
        )
    feat = m.group("feat")
    pos = m.group("pos")
    return m.group("site"), None if feat == ERROR_TOKEN else int(feat), None if pos is None else int(pos)


def _check_site(where: str, site: str, feat: int | None, sizes: Mapping[str, int] | None) -> None:
    if sizes is None:
        return
    if site not in sizes:
        raise LabelsError(f"{where}: unknown site {site!r}; the model's sites are {', '.join(sizes)}")
    if feat is not None and feat >= sizes[site]:
        raise LabelsError(
            f"{where}: feature {feat} is out of range for site {site} (dictionary size {sizes[site]})"
        )


def _label_line(where: str, d: dict, sizes: Mapping[str, int] | None) -> tuple[tuple[str, int | None], str]:
    missing = [k for k in ("site", "feature", "label") if k not in d]
    if missing:
        raise LabelsError(f"{where}: missing key(s) {missing}")
    site, feat, label = d["site"], d["feature"], d["label"]
    if not isinstance(site, str) or not site:
        raise LabelsError(f"{where}: 'site' must be a non-empty string, got {site!r}")
    if feat is not None and (isinstance(feat, bool) or not isinstance(feat, int) or feat < 0):
        raise LabelsError(f"{where}: 'feature' must be a non-negative integer or null, got {feat!r}")
    if not isinstance(label, str):
        raise LabelsError(f"{where}: 'label' must be a string, got {type(label).__name__}")
    _check_site(where, site, feat, sizes)
    return (site, feat), label


def _group_line(where: str, d: dict, sizes: Mapping[str, int] | None) -> Group:
    extra = sorted(set(d) - {"group", "nodes"})
    if extra:
        raise LabelsError(f"{where}: unknown key(s) {extra} in a group line (keys: group, nodes)")
    name, nodes = d["group"], d.get("nodes")
    if not isinstance(name, str) or not name.strip():
        raise LabelsError(f"{where}: 'group' must be a non-empty string, got {name!r}")
    if not isinstance(nodes, list) or not nodes:
        raise LabelsError(f"{where}: 'nodes' must be a non-empty list of node ids, got {nodes!r}")
    for k, nid in enumerate(nodes):
        try:
            site, feat, _pos = parse_node_id(nid)
        except ValueError as err:
            raise LabelsError(f"{where}: nodes[{k}]: {err}") from None
        _check_site(f"{where}: nodes[{k}]", site, feat, sizes)
    if len(set(nodes)) != len(nodes):
        raise LabelsError(f"{where}: group {name!r} lists a node more than once")
    return Group(name=name, nodes=tuple(nodes))


def load_labels(path: str | Path, sizes: Mapping[str, int] | None = None) -> Labels:
    """Read a labels/groups file (see the module docstring): each non-blank line a label
    ``{"site", "feature", "label"}`` or a group ``{"group", "nodes"}``. Anything else raises
    :class:`LabelsError` with ``path:line:`` and the key. With ``sizes`` (site name -> dictionary
    size: the model's sites), a site not among them or a feature index past its dictionary is such
    an error too, in labels and in group members. Two groups of one name are an error."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except UnicodeDecodeError as err:
        raise LabelsError(f"{path}: not UTF-8 ({err})") from None
    out = Labels()
    names: dict[str, int] = {}
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LabelsError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(d, dict):
            raise LabelsError(f"{where}: expected an object with keys site, feature, label (or group, nodes)")
        if "group" in d:
            group = _group_line(where, d, sizes)
            if group.name in names:
                raise LabelsError(
                    f"{where}: group {group.name!r} is already defined on line {names[group.name]}"
                )
            names[group.name] = i
            out.groups.append(group)
        else:
            key, label = _label_line(where, d, sizes)
            out[key] = label
    return out


def dump_labels(labels: Mapping[tuple[str, int | None], str], groups: Iterable[Group] = ()) -> str:
    """The labels/groups file text that :func:`load_labels` reads back (labels, then groups)."""
    lines = [
        json.dumps({"site": site, "feature": feat, "label": label}, ensure_ascii=False)
        for (site, feat), label in labels.items()
    ]
    lines += [json.dumps({"group": g.name, "nodes": list(g.nodes)}, ensure_ascii=False) for g in groups]
    return "".join(line + "\n" for line in lines)
