"""The pipeline and the lazy top-level API: discovery end to end on a tiny random GPT-NeoX with random
SAEs (valid circuit.json, non-empty graph, deterministic per seed, the dense effects file), discovery
then evaluation through ``import feature_circuits as fc``, and an import that loads no torch. The
command line (and the embedded default end to end) is tested in tests/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import feature_circuits as fc
from feature_circuits.circuit import LOGIT_ID, load_circuit, load_effects
from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig, discover, evaluate
from feature_circuits.types import Aggregation, Method, error_index
from tests.helpers import write_pairs


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    path = write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 8)
    return path


def _graph(circuit):
    return (
        [(n.id, round(n.effect, 6)) for n in circuit.nodes],
        [(e.source, e.target, round(e.weight, 6)) for e in circuit.edges],
    )


@pytest.mark.parametrize("method", ["relp", "ig", "atp"])
def test_discover_tiny(tmp_path, neox_dir, neox_saes, tiny_data, method):
    def run(out: str):
        return discover(
            DiscoverConfig(
                method=method,
                model=str(neox_dir),
                saes=str(neox_saes),
                dataset=str(tiny_data),
                num_examples=8,
                batch_size=3,
                node_threshold=1e-4,
                edge_threshold=1e-6,
                seed=1,
                progress=False,
                steps=3,
                out=str(tmp_path / out),
            )
        )

    c1, c2 = run("a"), run("b")
    assert c1.nodes and c1.edges
    assert _graph(c1) == _graph(c2)
    d = json.loads((tmp_path / "a" / "circuit.json").read_text())
    assert d["num_examples"] == 8 and d["method"] == method and d["metric"] == "logit_diff"
    assert load_circuit(tmp_path / "a" / "circuit.json").nodes == c1.nodes
    assert (tmp_path / "a" / "circuit.html").stat().st_size > 400_000  # cytoscape.js inlined
    # the dense effects of every node, beside circuit.json; the kept nodes are those above the threshold
    assert d["effects_file"] == "effects.safetensors" and c1.effects_file == "effects.safetensors"
    eff = load_effects(tmp_path / "a" / "effects.safetensors", "sum")
    kept = {(n.site, n.feature): n.effect for n in c1.nodes}
    dense = {}
    for site, t in eff.items():
        assert t.dim() == 1 and t.dtype == torch.float32
        for i in torch.nonzero(t.abs() > 1e-4).flatten().tolist():
            dense[(site, None if i == error_index(t.shape[0] - 1) else i)] = float(t[i])
    assert dense == kept


def test_discover_tiny_none_and_nodes_only(tmp_path, neox_dir, neox_saes, tiny_data):
    c = discover(
        DiscoverConfig(
            method=Method.ATP,
            model=str(neox_dir),
            saes=str(neox_saes),
            dataset=str(tiny_data),
            num_examples=4,
            aggregation=Aggregation.NONE,
            nodes_only=True,
            node_threshold=1e-4,
            progress=False,
            out=str(tmp_path),
        )
    )
    assert c.tokens == ("the", "w0", "and", "w1")
    eff = load_effects(tmp_path / "effects.safetensors", "none")
    assert all(t.shape[0] == 4 for t in eff.values())  # (s, F+1): positions kept
    assert c.nodes and all(n.position is not None for n in c.nodes)
    assert all(e.target == LOGIT_ID for e in c.edges)  # nodes only: just the logit sink's edges


def test_lazy_api_discover_then_evaluate(tmp_path, neox_dir, neox_saes, tiny_data):
    """The README's library flow through ``fc``: load, node/edge effects, discover, evaluate."""
    from feature_circuits.data import load_pairs, make_batches

    assert fc.Method is Method and fc.LRPConfig().half_rule
    assert set(fc.__all__) <= set(dir(fc)) and {"load", "discover", "evaluate", "Circuit"} <= set(fc.__all__)
    with pytest.raises(AttributeError):
        _ = fc.no_such_name
    loaded, saes = fc.load(str(neox_dir), str(neox_saes), device="cpu")
    batch = make_batches(load_pairs(tiny_data, loaded.tokenizer)[:4], loaded.tokenizer, batch_size=4)[0]
    nodes = fc.node_effects(loaded, saes, batch, fc.Method.RELP)
    edges = fc.edge_effects(loaded, saes, batch, nodes, node_threshold=1e-3, method=fc.Method.RELP)
    assert set(nodes.effects) == {s.name for s in loaded.sites} and edges is not None
    circuit = fc.discover(
        fc.DiscoverConfig(
            method=fc.Method.ATP,
            model=str(neox_dir),
            saes=str(neox_saes),
            dataset=str(tiny_data),
            num_examples=8,
            node_threshold=1e-3,
            progress=False,
            html=False,
            out=str(tmp_path / "c"),
        )
    )
    assert isinstance(circuit, fc.Circuit) and fc.load_circuit(tmp_path / "c" / "circuit.json").nodes
    lines: list[str] = []
    results = fc.evaluate(
        EvaluateConfig(
            circuits=(str(tmp_path / "c"),),
            split="train",
            allow_discovery_split=True,
            num_examples=8,
            thresholds=(0.0, 1e6),
            progress=False,
        ),
        echo=lines.append,
    )
    assert len(results) == 1 and results[0].n_nodes[-1] == 0 and results[0].n_nodes[0] > 0
    assert results[0].faithfulness[-1] == 0.0  # empty circuit
    assert (tmp_path / "c" / "eval.json").is_file() and (tmp_path / "c" / "eval.html").is_file()
    assert any(line.startswith("wrote ") for line in lines)
    assert fc.DiscoverConfig is DiscoverConfig and fc.evaluate is evaluate and fc.discover is discover


def test_discover_streams_batches(monkeypatch, neox_dir, neox_saes, tiny_data):
    """Discovery holds no per-batch effects: when batch k+1's node effects are computed, batch k's
    NodeEffects and EdgeEffects are already freed (weak references dead), and the streamed circuit
    equals the one aggregated from the kept per-batch list."""
    import weakref

    import feature_circuits.attribution as attribution
    from feature_circuits.attribution import load_for_attribution
    from feature_circuits.circuit import aggregate_edges, aggregate_nodes, build_circuit
    from feature_circuits.data import load_pairs, make_batches

    real_nodes, real_edges = attribution.node_effects, attribution.edge_effects
    alive: list[weakref.ref] = []
    live_at_call: list[int] = []

    def nodes_spy(*args, **kwargs):
        live_at_call.append(sum(r() is not None for r in alive))
        out = real_nodes(*args, **kwargs)
        alive.append(weakref.ref(out))
        return out

    def edges_spy(*args, **kwargs):
        out = real_edges(*args, **kwargs)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(attribution, "node_effects", nodes_spy)
    monkeypatch.setattr(attribution, "edge_effects", edges_spy)
    cfg = DiscoverConfig(
        method=Method.RELP,
        model=str(neox_dir),
        saes=str(neox_saes),
        dataset=str(tiny_data),
        num_examples=8,
        batch_size=2,
        node_threshold=1e-3,
        edge_threshold=1e-5,
        progress=False,
        out=None,
    )
    streamed = discover(cfg)
    assert len(live_at_call) == 4 and live_at_call == [0, 0, 0, 0]
    monkeypatch.undo()
    loaded, dicts = load_for_attribution(str(neox_dir), str(neox_saes), device="cpu")
    batches = make_batches(load_pairs(tiny_data, loaded.tokenizer, limit=8), loaded.tokenizer, 2)
    ns = [real_nodes(loaded, dicts, b, Method.RELP) for b in batches]
    es = [
        real_edges(loaded, dicts, b, n, node_threshold=1e-3, method=Method.RELP)
        for b, n in zip(batches, ns, strict=True)
    ]
    listed = build_circuit(
        aggregate_nodes(ns),
        aggregate_edges(es),
        node_threshold=1e-3,
        edge_threshold=1e-5,
        model=str(neox_dir),
        saes=str(neox_saes),
        method=Method.RELP,
        dataset=str(tiny_data),
        split="train",
        last_resid=loaded.last_resid.name,
        n_layers=loaded.n_layers,
    )
    assert streamed.edges and _graph(streamed) == _graph(listed)
