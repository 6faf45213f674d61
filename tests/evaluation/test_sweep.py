"""Mean-ablation evaluation (spec section 7): faithfulness / completeness, composition, means over
patch inputs, the held-out refusal and the CLI. Tiny GPT-NeoX (2 layers, so only embed is free)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from feature_circuits.data import Pair, make_batches
from feature_circuits.dictionaries.marks import encode_with_error, load_dictionaries
from feature_circuits.evaluation.report import check_held_out, main
from feature_circuits.evaluation.sweep import (
    VARIANTS,
    CircuitNode,
    CircuitNodes,
    EvaluationError,
    SiteMask,
    ablated_metric,
    compute_means,
    default_free_layers,
    evaluate_circuit,
    keep_masks,
)
from feature_circuits.model.sites import get_submodule
from feature_circuits.types import Aggregation


def _pairs(n=10):
    out = []
    for i in range(n):
        a, b = 1 + (i % 40), 2 + (i * 7) % 45
        out.append(
            Pair(
                clean_prefix=f"the w{a} w{b} and w{a + 1}",
                patch_prefix=f"a w{a} w{b + 3} and w{a + 1}",
                clean_answer=" is",
                patch_answer=" are",
            )
        )
    return out


@pytest.fixture(scope="module")
def aes(neox, neox_saes):
    return load_dictionaries(neox.sites, neox_saes / "tiny")


@pytest.fixture(scope="module")
def batches(neox):
    return make_batches(_pairs(), neox.tokenizer, 4)


def _all_nodes(loaded, aes, aggregation=Aggregation.SUM, seq_len=None, effect=1.0):
    nodes = []
    positions = [None] if aggregation is Aggregation.SUM else list(range(seq_len))
    for s in loaded.sites:
        for p in positions:
            nodes += [CircuitNode(s.name, p, k, effect) for k in range(aes[s.name].dict_size)]
            nodes.append(CircuitNode(s.name, p, None, effect))
    return CircuitNodes(aggregation=aggregation, nodes=nodes, node_threshold=0.0)


def _hand_metric(loaded, aes, batches, means, ablate, capture=None):
    """Independent reference with plain torch hooks: at each site in ``ablate`` ({site: [(pos, feature
    or None)]}; pos None = every position), compute f/err from the site's actual activation, set the
    listed nodes to their mean and output decode(f) + err."""
    by_name = {s.name: s for s in loaded.sites}
    handles = []
    for name, nodes in ablate.items():
        site = by_name[name]

        def hook(_m, _i, out, site=site, nodes=nodes):
            x = out[0] if site.output_is_tuple else out
            if capture is not None:
                capture.setdefault(site.name, []).append(x.clone())
            f, err = encode_with_error(aes[site.name], x)
            mf, me = means[site.name]
            for pos, feat in nodes:
                p = slice(None) if pos is None else pos
                mp = 0 if mf.shape[0] == 1 else p
                if feat is None:
                    err[:, p, :] = me[mp]
                else:
                    f[:, p, feat] = mf[mp, feat]
            new = aes[site.name].decode(f) + err
            return (new, *out[1:]) if site.output_is_tuple else new

        handles.append(get_submodule(loaded.hf_model, site.module_path).register_forward_hook(hook))
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches:
                logits = loaded.hf_model(b.clean).logits[:, -1]
                m = logits.gather(1, b.clean_answer[:, None]) - logits.gather(1, b.patch_answer[:, None])
                total += float(m.double().sum())
                n += len(b)
    finally:
        for h in handles:
            h.remove()
    return total / n


def test_full_model_is_1_empty_is_0(neox, aes):
    circ = _all_nodes(neox, aes)
    res = evaluate_circuit(neox, aes, circ, _pairs(6), thresholds=[0.5, 2.0], batch_size=6)
    assert default_free_layers(neox.n_layers) == 0 and res.free_layers == 0
    for name in VARIANTS:
        v = res.variants[name]
        assert v.faithfulness[0] == 1.0 and v.completeness[0] == 0.0, name  # exactly, by construction
        assert v.faithfulness[1] == 0.0 and v.completeness[1] == 1.0, name
    # counts exclude the free embed site; every non-free node is in the full circuit
    assert res.n_nodes == [6 * 65, 0] == [res.n_nodes_total, 0]
    # m(M) is the plain model; m(empty) really ablates something
    std = res.standard
    assert std.m_full == pytest.approx(
        _hand_metric(neox, aes, make_batches(_pairs(6), neox.tokenizer, 6), {}, {}), abs=1e-6
    )
    assert abs(std.m_full - std.m_empty) > 1e-3
    d = res.to_dict()
    assert d["faithfulness"] == [1.0, 0.0] and set(d["variants"]) == set(VARIANTS)
    json.dumps(d)


def test_means_are_over_patch_inputs(neox, aes, batches):
    means = compute_means(neox, aes, batches, per_position=True)
    pooled = compute_means(neox, aes, batches, per_position=False)
    patch = torch.cat([b.patch for b in batches])
    clean = torch.cat([b.clean for b in batches])
    for which, ids in (("patch", patch), ("clean", clean)):
        with torch.no_grad():
            hs = neox.hf_model(ids, output_hidden_states=True).hidden_states
        f, err = encode_with_error(aes["resid_0"], hs[1])
        close = torch.allclose(means["resid_0"][0], f.mean(0), atol=1e-5) and torch.allclose(
            means["resid_0"][1], err.mean(0), atol=1e-5
        )
        assert close == (which == "patch")
        if which == "patch":
            assert torch.allclose(pooled["resid_0"][0][0], f.mean((0, 1)), atol=1e-5)
            assert torch.allclose(pooled["resid_0"][1][0], err.mean((0, 1)), atol=1e-5)
            assert pooled["resid_0"][0].shape == (1, 64) and means["resid_0"][0].shape == (ids.shape[1], 64)


def _active_feature(neox, aes, batches, means, site, pos):
    """A feature at ``site``/``pos`` whose clean value is far from its mean (a non-trivial ablation)."""
    acts = {}
    with neox.lm.trace(batches[0].clean):
        from feature_circuits.model.sites import get_activation, site_by_name

        acts["x"] = get_activation(neox.lm, site_by_name(list(neox.sites), site)).save()
    f, _ = encode_with_error(aes[site], acts["x"])
    return int((f[:, pos] - means[site][0][pos]).abs().mean(0).argmax())


def test_single_node_ablation_matches_hand_forward(neox, aes, batches):
    means = compute_means(neox, aes, batches, per_position=True)
    s = batches[0].seq_len
    k = _active_feature(neox, aes, batches, means, "mlp_1", s - 1)
    node = [CircuitNode("mlp_1", s - 1, k, 1.0)]
    sizes = {n: a.dict_size for n, a in aes.items()}
    masks = keep_masks(node, neox.sites, sizes, n_positions=s, complement=True)  # everything but the node
    assert [n for n, m in masks.items() if m is not None] == ["mlp_1"]
    got = ablated_metric(neox, aes, batches, means, masks)
    want = _hand_metric(neox, aes, batches, means, {"mlp_1": [(s - 1, k)]})
    plain = _hand_metric(neox, aes, batches, means, {})
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(got - plain) > 1e-5  # the ablation did something


def test_ablations_compose_in_forward_order(neox, aes, batches):
    means = compute_means(neox, aes, batches, per_position=True)
    s = batches[0].seq_len
    k0 = _active_feature(neox, aes, batches, means, "resid_0", 1)
    k1 = _active_feature(neox, aes, batches, means, "mlp_1", s - 1)
    nodes = [
        CircuitNode("resid_0", 1, k0, 1.0),
        CircuitNode("resid_0", 2, None, 1.0),
        CircuitNode("mlp_1", s - 1, k1, 1.0),
    ]
    sizes = {n: a.dict_size for n, a in aes.items()}
    masks = keep_masks(nodes, neox.sites, sizes, n_positions=s, complement=True)
    got = ablated_metric(neox, aes, batches, means, masks)
    ablate = {"resid_0": [(1, k0), (2, None)], "mlp_1": [(s - 1, k1)]}
    cap_ablated, cap_clean = {}, {}
    want = _hand_metric(neox, aes, batches, means, ablate, capture=cap_ablated)
    _hand_metric(neox, aes, batches, means, {"mlp_1": []}, capture=cap_clean)
    assert got == pytest.approx(want, abs=1e-5)
    # the early ablation changed what mlp_1 sees, hence its features (so mlp_1's f is computed from
    # the already-ablated activation)
    f_abl, _ = encode_with_error(aes["mlp_1"], cap_ablated["mlp_1"][0])
    f_cln, _ = encode_with_error(aes["mlp_1"], cap_clean["mlp_1"][0])
    assert (f_abl - f_cln)[:, 2:].abs().max() > 1e-4
    assert torch.allclose(f_abl[:, :1], f_cln[:, :1], atol=1e-6)  # causal: position 0 untouched
    # both ablations matter
    only_late = _hand_metric(neox, aes, batches, means, {"mlp_1": [(s - 1, k1)]})
    assert abs(got - only_late) > 1e-5


def test_keep_masks_positions_variants_and_free_layers(neox, aes):
    sizes = {n: a.dict_size for n, a in aes.items()}
    nodes = [CircuitNode("mlp_1", None, 3, 1.0), CircuitNode("attn_1", None, None, 1.0)]
    m = keep_masks(nodes, neox.sites, sizes, n_positions=1)
    assert m["embed"] is None  # free: always kept
    assert m["mlp_1"].f.shape == (1, 64) and m["mlp_1"].f[0, 3] and m["mlp_1"].f.sum() == 1
    assert m["attn_1"].err.all() and not m["resid_1"].err.any()
    m = keep_masks(nodes, neox.sites, sizes, n_positions=1, variant="resid_errors_kept")
    assert m["resid_1"].err.all() and not m["mlp_1"].err.any()
    m = keep_masks(nodes, neox.sites, sizes, n_positions=1, variant="no_errors_ablated")
    assert all(v is None or v.err.all() for v in m.values())
    pos = [CircuitNode("mlp_1", 2, 3, 1.0)]
    m = keep_masks(pos, neox.sites, sizes, n_positions=4)
    assert m["mlp_1"].f[:, 3].tolist() == [False, False, True, False]
    c = keep_masks(pos, neox.sites, sizes, n_positions=4, complement=True, free_layers=1)
    assert c["attn_0"] is None and c["resid_1"] is None and c["mlp_1"].f.sum() == 4 * 64 - 1
    with pytest.raises(EvaluationError, match="unknown variant"):
        keep_masks(pos, neox.sites, sizes, n_positions=4, variant="bogus")


def test_sweep_from_graph_circuit_sum_and_none(neox, aes):
    from feature_circuits.circuit.graph import Circuit, Node, node_id

    def node(site, pos, feat, eff):
        kind, _, layer = site.partition("_")
        return Node(
            id=node_id(site, feat, pos),
            site=site,
            kind=kind,
            layer=int(layer or -1),
            position=pos,
            feature=feat,
            is_error=feat is None,
            effect=eff,
        )

    for agg, pos in (("sum", None), ("none", 4)):
        nodes = (
            node("resid_1", pos, None, 0.9),
            node("mlp_1", pos, 3, -0.2),
            node("attn_0", pos, 7, 0.05),
            node("embed", pos, 1, 0.5),
        )
        circ = Circuit(
            model="m",
            saes="s",
            method="relp",
            dataset="d",
            split="train",
            num_examples=10,
            aggregation=agg,
            node_threshold=0.01,
            edge_threshold=0.01,
            total_effect=1.0,
            nodes=nodes,
            edges=(),
        )
        res = evaluate_circuit(
            neox,
            aes,
            circ,
            _pairs(6),
            thresholds=[0.001, 0.1, 0.3, 1.0],
            batch_size=6,
            variants=["all_errors_ablated"],
        )
        assert res.n_nodes == [3, 2, 1, 0]  # embed is free: never counted
        assert res.below_discovery_threshold == [True, False, False, False]
        assert res.aggregation == agg and res.meta["method"] == "relp"
        assert all(math.isfinite(x) for x in res.faithfulness + res.completeness)
        assert res.faithfulness[-1] == 0.0 and res.completeness[-1] == 1.0
        # several mask configurations stacked in one forward == one forward per configuration
        one = evaluate_circuit(
            neox,
            aes,
            circ,
            _pairs(6),
            thresholds=[0.001, 0.1, 0.3, 1.0],
            batch_size=6,
            variants=["all_errors_ablated"],
            stack=1,
        )
        assert one.faithfulness == pytest.approx(res.faithfulness, abs=1e-5)
        assert one.completeness == pytest.approx(res.completeness, abs=1e-5)
    with pytest.raises(EvaluationError, match="position out of range"):
        bad = CircuitNodes(aggregation="none", nodes=[CircuitNode("mlp_1", 40, 1, 1.0)])
        evaluate_circuit(neox, aes, bad, _pairs(), thresholds=[0.1])
    with pytest.raises(EvaluationError, match="position-aligned over 3 tokens"):
        bad = CircuitNodes(
            aggregation="none", nodes=[CircuitNode("mlp_1", 1, 1, 1.0)], meta={"tokens": ["a", "b", "c"]}
        )
        evaluate_circuit(neox, aes, bad, _pairs(), thresholds=[0.1])
    with pytest.raises(EvaluationError, match="unknown site"):
        evaluate_circuit(
            neox,
            aes,
            CircuitNodes(aggregation="sum", nodes=[CircuitNode("mlp_9", None, 1, 1.0)]),
            _pairs(),
            thresholds=[0.1],
        )


def test_from_aggregated_effects(neox, aes):
    from feature_circuits.circuit.graph import AggregatedNodes

    eff = {s.name: torch.zeros(65) for s in neox.sites}
    eff["mlp_1"][3], eff["resid_1"][64] = 0.5, -2.0
    agg = AggregatedNodes(aggregation=Aggregation.SUM, effects=eff, num_examples=6, total_effect=1.0)
    circ = CircuitNodes.from_circuit(agg)
    assert sorted((n.site, n.feature, n.effect) for n in circ.nodes) == [
        ("mlp_1", 3, 0.5),
        ("resid_1", None, -2.0),
    ]
    with pytest.raises(EvaluationError, match="from_effects"):
        CircuitNodes.from_circuit(eff)


def test_neuron_baseline(neox):
    neurons = load_dictionaries(neox.sites, "neurons")
    batches = make_batches(_pairs(6), neox.tokenizer, 6)
    means = compute_means(neox, neurons, batches, per_position=True)  # aligned examples: per position
    assert all(float(e.abs().max()) == 0.0 for _, e in means.values())  # identity: error is zero
    full = _all_nodes(neox, neurons).nodes
    # the whole model at effect 1, plus resid_1's neurons at smaller effects
    nodes = [n for n in full if n.site != "resid_1"] + [
        CircuitNode("resid_1", None, i, 0.5 / (i + 1)) for i in range(32)
    ]
    circ = CircuitNodes(aggregation="sum", nodes=nodes)
    res = evaluate_circuit(
        neox, neurons, circ, _pairs(6), thresholds=[0.0, 0.9, 2.0], batch_size=6, means=means
    )
    std = res.standard
    assert std.faithfulness[-1] == 0.0 and std.completeness[-1] == 1.0
    assert std.faithfulness[0] == pytest.approx(1.0, abs=1e-5)  # every neuron kept (error is zero anyway)
    assert std.completeness[0] == pytest.approx(0.0, abs=1e-5)
    assert abs(std.faithfulness[1] - 1.0) > 1e-4  # resid_1 neurons ablated to their means
    for v in VARIANTS:  # zero error: the error variants coincide
        assert res.variants[v].faithfulness == pytest.approx(std.faithfulness, abs=1e-6)


def test_held_out_refusal():
    with pytest.raises(EvaluationError, match="allow-discovery-split"):
        check_held_out("sva_rc", "train", "sva_rc", "train", allow=False)
    check_held_out("sva_rc", "train", "sva_rc", "train", allow=True)
    check_held_out("sva_rc", "train", "sva_rc", "test", allow=False)
    check_held_out("sva_rc", "train", "sva_nounpp", "train", allow=False)


def _write_jsonl(path, pairs):
    keys = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
    path.write_text("".join(json.dumps({k: getattr(p, k) for k in keys}) + "\n" for p in pairs))


def test_cli_end_to_end(neox_dir, neox_saes, tmp_path, capsys):
    _write_jsonl(tmp_path / "tiny_train.jsonl", _pairs(6))
    _write_jsonl(tmp_path / "tiny_test.jsonl", _pairs(12)[6:])  # disjoint from the discovery file
    circ = {
        "schema_version": 1,
        "model": str(neox_dir),
        "saes": str(neox_saes / "tiny"),
        "method": "atp",
        "dataset": str(tmp_path / "tiny_train.jsonl"),
        "split": "train",
        "num_examples": 6,
        "aggregation": "sum",
        "node_threshold": 0.01,
        "edge_threshold": 0.01,
        "total_effect": 0.5,
        "edges": [],
        "timing_s": {},
        "nodes": [
            {
                "id": "resid_1/err",
                "site": "resid_1",
                "kind": "resid",
                "layer": 1,
                "position": None,
                "feature": None,
                "is_error": True,
                "effect": 0.4,
            },
            {
                "id": "mlp_1/3",
                "site": "mlp_1",
                "kind": "mlp",
                "layer": 1,
                "position": None,
                "feature": 3,
                "is_error": False,
                "effect": 0.02,
            },
        ],
    }
    cdir = tmp_path / "circ"
    cdir.mkdir()
    (cdir / "circuit.json").write_text(json.dumps(circ))
    # own dataset + split: refused, one line, exit 2
    assert main(["--circuit", str(cdir / "circuit.json"), "--split", "train", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allow-discovery-split" in err[0]
    assert main(["--circuit", str(cdir / "circuit.json"), "--thresholds", "a,b"]) == 2
    assert main(["--circuit", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not found" in err[1]
    # default: the sibling test file
    assert main(["--circuit", str(cdir), "--thresholds", "0.001,0.1,1", "--quiet", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "m(M) =" in out and "wrote" in out
    res = json.loads((cdir / "eval.json").read_text())
    assert res["n_nodes"] == [2, 1, 0] and res["eval_dataset"].endswith("tiny_test.jsonl")
    assert res["num_examples"] == 6 and res["below_discovery_threshold"] == [True, False, False]
    assert set(res["variants"]) == set(VARIANTS)
    assert res["variants"]["all_errors_ablated"]["faithfulness"] == res["faithfulness"]
    html = (cdir / "eval.html").read_text()
    assert "<script src=" not in html and "Faithfulness" in html and len(html) > 1_000_000
    # explicitly allowed on the discovery split, into another directory
    assert (
        main(
            [
                "--circuit",
                str(cdir / "circuit.json"),
                "--split",
                "train",
                "--allow-discovery-split",
                "--thresholds",
                "0.1",
                "--quiet",
                "--out",
                str(tmp_path / "o"),
                "--variants",
                "all_errors_ablated",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["num_examples"] == 6
    # the discovery examples under another name (a copy, or a file that contains some of them): refused
    _write_jsonl(tmp_path / "renamed.jsonl", _pairs(12)[4:])  # shares examples 4 and 5 with the train file
    assert main(["--circuit", str(cdir), "--dataset", str(tmp_path / "renamed.jsonl"), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 8 evaluation examples" in last and "allow-discovery-split" in last


def test_sweep_over_effects_file(neox, neox_dir, neox_saes, aes, tmp_path, capsys):
    """A circuit.json with an effects file: the sweep covers every node (more than the stored ones at
    low thresholds, no below-discovery flag), faithfulness 1 / completeness 0 with everything kept and
    0 / 1 with nothing; a missing or corrupt effects file is a one-line error naming it."""
    from feature_circuits.circuit.graph import save_effects

    _write_jsonl(tmp_path / "tiny_train.jsonl", _pairs(6))
    _write_jsonl(tmp_path / "tiny_test.jsonl", _pairs(12)[6:])  # disjoint from the discovery file
    gen = torch.Generator().manual_seed(0)
    # every node has a nonzero effect in (0.001, 0.5]; two stored nodes above the discovery threshold 0.6
    eff = {s.name: 0.001 + 0.499 * torch.rand(aes[s.name].dict_size + 1, generator=gen) for s in neox.sites}
    eff["resid_1"][-1], eff["mlp_1"][3] = 0.9, -0.7
    cdir = tmp_path / "circ"
    save_effects(eff, cdir / "effects.safetensors", "sum")
    circ = {
        "schema_version": 1,
        "model": str(neox_dir),
        "saes": str(neox_saes / "tiny"),
        "method": "atp",
        "dataset": str(tmp_path / "tiny_train.jsonl"),
        "split": "train",
        "num_examples": 6,
        "aggregation": "sum",
        "node_threshold": 0.6,
        "edge_threshold": 0.01,
        "total_effect": 0.5,
        "edges": [],
        "timing_s": {},
        "effects_file": "effects.safetensors",
        "nodes": [
            {
                "id": "resid_1/err",
                "site": "resid_1",
                "kind": "resid",
                "layer": 1,
                "position": None,
                "feature": None,
                "is_error": True,
                "effect": 0.9,
            },
            {
                "id": "mlp_1/3",
                "site": "mlp_1",
                "kind": "mlp",
                "layer": 1,
                "position": None,
                "feature": 3,
                "is_error": False,
                "effect": float(torch.tensor(-0.7)),
            },
        ],
    }
    (cdir / "circuit.json").write_text(json.dumps(circ))
    args = [
        "--circuit",
        str(cdir),
        "--thresholds",
        "0,0.25,0.6,1",
        "--quiet",
        "--batch-size",
        "6",
        "--variants",
        "all_errors_ablated",
    ]
    assert main(args) == 0
    assert "every node's effect" in capsys.readouterr().out
    res = json.loads((cdir / "eval.json").read_text())
    ablatable = sum(aes[s.name].dict_size + 1 for s in neox.sites if s.name != "embed")
    assert res["n_nodes"][0] == ablatable > 2  # every node (embed is free), not just the 2 stored
    assert 2 < res["n_nodes"][1] < ablatable and res["n_nodes"][2:] == [2, 0]
    assert res["below_discovery_threshold"] == [False] * 4 and res["sweep_nodes"] == "all"
    assert res["faithfulness"][0] == 1.0 and res["completeness"][0] == 0.0
    assert res["faithfulness"][-1] == 0.0 and res["completeness"][-1] == 1.0
    # the same circuit through the Python API
    nodes = CircuitNodes.from_json(cdir / "circuit.json")
    assert nodes.all_nodes and len(nodes.nodes) == sum(t.numel() for t in eff.values())
    # without the effects file key: only the stored nodes, flagged below the discovery threshold
    (cdir / "circuit.json").write_text(json.dumps({k: v for k, v in circ.items() if k != "effects_file"}))
    assert main(args) == 0
    res = json.loads((cdir / "eval.json").read_text())
    assert res["n_nodes"] == [2, 2, 2, 0] and res["below_discovery_threshold"] == [True, True, True, False]
    capsys.readouterr()
    # missing / corrupt / mismatched effects file: exit 2, one line naming the file
    (cdir / "circuit.json").write_text(json.dumps(circ))
    for damage, msg in (
        (lambda p: p.unlink(), "not found"),
        (lambda p: p.write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda p: save_effects({**eff, "mlp_1": -eff["mlp_1"]}, p, "sum"), "from another run"),
    ):
        damage(cdir / "effects.safetensors")
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and str(cdir / "effects.safetensors") in err[0], err
        with pytest.raises(EvaluationError, match=msg):
            CircuitNodes.from_json(cdir / "circuit.json")


def test_sum_circuit_on_aligned_data_uses_per_position_means(neox, aes):
    """Spec section 7: means per position whenever positions are aligned, for 'sum' circuits too."""
    pairs = _pairs(6)
    batches = make_batches(pairs, neox.tokenizer, 6)
    circ = CircuitNodes(
        aggregation="sum",
        nodes=[CircuitNode("resid_1", None, None, 0.4), CircuitNode("mlp_1", None, 3, 0.02)],
    )
    res = evaluate_circuit(neox, aes, circ, pairs, thresholds=[0.01, 0.1], batch_size=6)
    assert res.meta["means"] == "per position"
    per_pos = compute_means(neox, aes, batches, per_position=True)
    again = evaluate_circuit(neox, aes, circ, pairs, thresholds=[0.01, 0.1], batch_size=6, means=per_pos)
    assert again.standard.m_circuit == res.standard.m_circuit
    # the empty circuit ablated with per-position means is m(empty) by hand; pooled means give another value
    empty = {
        s.name: SiteMask(torch.zeros(1, 64, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool))
        for s in neox.sites
        if s.layer >= default_free_layers(neox.n_layers)
    }
    by_hand = ablated_metric(neox, aes, batches, per_pos, empty)
    assert res.standard.m_empty == pytest.approx(by_hand, abs=1e-6)
    pooled = compute_means(neox, aes, batches, per_position=False)
    assert abs(ablated_metric(neox, aes, batches, pooled, empty) - by_hand) > 1e-6
    with pytest.raises(EvaluationError, match="position"):
        evaluate_circuit(neox, aes, circ, pairs, thresholds=[0.01], batch_size=6, means=pooled)
