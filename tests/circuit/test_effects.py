"""The dense effects file: round trip in float32 under both aggregations, recorded in circuit.json,
and errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from feature_circuits.circuit import (
    CircuitError,
    circuit_to_dict,
    load_circuit,
    load_effects,
    save_circuit,
    save_effects,
)
from tests.helpers import F, small_circuit


def test_effects_file_round_trip(tmp_path):
    for agg in ("sum", "none"):
        c = small_circuit(agg)
        eff = {
            "embed": torch.randn((F + 1,) if agg == "sum" else (2, F + 1)).double(),
            "resid_0": torch.zeros((F + 1,) if agg == "sum" else (2, F + 1)),
        }
        p = save_effects(eff, tmp_path / agg / "effects.safetensors", agg)
        back = load_effects(p, agg)
        assert set(back) == set(eff) and all(back[k].dtype == torch.float32 for k in back)
        assert all(torch.equal(back[k], eff[k].float()) for k in eff)
        c = c.replace(effects_file="effects.safetensors")
        cp = save_circuit(c, tmp_path / agg / "circuit.json")
        assert json.loads(cp.read_text())["effects_file"] == "effects.safetensors"
        assert load_circuit(cp) == c
    assert "effects_file" not in circuit_to_dict(small_circuit())  # optional
    with pytest.raises(CircuitError, match="aggregation 'sum'"):
        load_effects(tmp_path / "sum" / "effects.safetensors", "none")
    with pytest.raises(CircuitError, match="expected 1 dims"):
        save_effects({"embed": torch.zeros(2, 3)}, tmp_path / "x.safetensors", "sum")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CircuitError, match="not found") as info:
        load_effects(missing)
    assert str(missing) in str(info.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CircuitError, match="not a readable safetensors") as info:
        load_effects(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(CircuitError, match="not a site name: 'layer3'"):
        save_effects({"layer3": torch.zeros(F + 1)}, tmp_path / "y.safetensors", "sum")
    with pytest.raises(CircuitError, match="unknown aggregation"):
        save_effects({"embed": torch.zeros(F + 1)}, tmp_path / "y.safetensors", "mean")


def test_save_effects_densifies_sparse_aggregated_effects(tmp_path):
    from feature_circuits.circuit import load_effects, save_effects

    dense = torch.tensor([0.0, 1.5, 0.0, -2.0])
    path = save_effects({"resid_0": dense.to_sparse()}, tmp_path / "e.safetensors", "sum")
    got = load_effects(path, "sum")["resid_0"]
    assert not got.is_sparse
    torch.testing.assert_close(got, dense)
