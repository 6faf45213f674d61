"""Dictionaries in the Marks et al. layout: loading a set by root or name, the safetensors round
trip, the adapter's Protocol, and clear errors (wrong width, missing or corrupt files, missing
download); identity dictionaries for ``neurons``."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.dictionaries import (
    Dictionary,
    IdentityDictionary,
    MarksAutoEncoder,
    load_autoencoder,
    load_dictionaries,
    save_autoencoder,
)
from feature_circuits.errors import DictionaryError
from tests.helpers import save_random_saes, tiny_gpt_neox


def test_marks_layout_roundtrip_and_errors(neox, neox_saes, tmp_path):
    aes = load_dictionaries(neox.sites, neox_saes / "tiny", dtype=torch.float64)
    assert set(aes) == {s.name for s in neox.sites}
    mlp_1 = aes["mlp_1"]
    assert isinstance(mlp_1, MarksAutoEncoder)
    assert mlp_1.encoder.weight.shape == (64, 32)
    assert mlp_1.encoder.weight.dtype == torch.float64
    # identical weights to what was saved
    sd = torch.load(neox_saes / "tiny" / "mlp_out_layer1" / "10_64" / "ae.pt", weights_only=True)
    assert torch.equal(mlp_1.decoder.weight.float(), sd["decoder.weight"])
    # safetensors round trip
    save_autoencoder(mlp_1, tmp_path / "x" / "ae.safetensors")
    back = load_autoencoder(tmp_path / "x" / "ae.safetensors", d_model=32, dtype=torch.float64)
    assert torch.equal(back.encoder.weight, mlp_1.encoder.weight)
    # wrong width
    wide = save_random_saes(tiny_gpt_neox(hidden_size=48), tmp_path / "wide")
    with pytest.raises(DictionaryError, match=r"site embed: .*width 48.*width 32"):
        load_dictionaries(neox.sites, wide / "tiny")
    # missing file
    (neox_saes / "tiny" / "resid_out_layer1" / "10_64" / "ae.pt").rename(tmp_path / "moved.pt")
    try:
        with pytest.raises(DictionaryError, match="resid_out_layer1"):
            load_dictionaries(neox.sites, neox_saes / "tiny")
    finally:
        (tmp_path / "moved.pt").rename(neox_saes / "tiny" / "resid_out_layer1" / "10_64" / "ae.pt")
    # mis-shaped tensor
    bad = tmp_path / "bad.pt"
    sd = dict(sd)
    sd["encoder.bias"] = torch.zeros(3)
    torch.save(sd, bad)
    with pytest.raises(DictionaryError, match=r"encoder\.bias has shape"):
        load_autoencoder(bad, d_model=32, site="mlp_1")


def test_neurons_source(neox):
    aes = load_dictionaries(neox.sites, "neurons")
    assert all(isinstance(a, IdentityDictionary) for a in aes.values())


def test_corrupt_safetensors_and_missing_marks_are_clear_errors(tmp_path, monkeypatch):
    bad = tmp_path / "embed" / "1024" / "ae.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    with pytest.raises(DictionaryError, match=r"site embed: .*ae.safetensors: cannot read safetensors"):
        load_autoencoder(bad, site="embed")
    # the "marks" root is resolved when used, from $FEATURE_CIRCUITS_SAES (not at import)
    monkeypatch.setenv("FEATURE_CIRCUITS_SAES", str(tmp_path / "absent"))
    with pytest.raises(
        DictionaryError, match=r"absent.pythia-70m-deduped: download them first.*download_saes"
    ):
        load_dictionaries([], "marks")


def test_loaded_dictionaries_are_the_protocol(neox, neox_saes):
    """Every loaded dictionary satisfies the Dictionary Protocol with the site's sizes."""
    aes = load_dictionaries(neox.sites, neox_saes / "tiny")
    for site in neox.sites:
        ae = aes[site.name]
        assert isinstance(ae, Dictionary) and isinstance(ae, MarksAutoEncoder)
        assert (ae.activation_dim, ae.dict_size) == (site.d_model, 64)
        like = torch.zeros(1, dtype=torch.float64)
        dirs = ae.decoder_directions(like)
        assert dirs.shape == (64, site.d_model) and dirs.dtype == torch.float64
