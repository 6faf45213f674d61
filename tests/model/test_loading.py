"""Model loading, sites, dictionaries and the splice primitive."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.dictionaries.marks import (
    DictionaryError,
    IdentityDictionary,
    load_autoencoder,
    load_dictionaries,
    save_autoencoder,
    splice_with_grad_leaves,
)
from feature_circuits.model.loading import ModelLoadError, load_model
from feature_circuits.model.sites import get_activation, set_activation
from feature_circuits.types import Architecture, SiteKind
from tests.helpers import make_tokenizer, save_model, save_random_saes, tiny_gpt_neox


def _acts(loaded, text="the w1 w2 and w3 is"):
    ids = loaded.tokenizer([text, text.replace("w1", "w5")], return_tensors="pt").input_ids
    acts = {}
    with loaded.lm.trace(ids):
        for site in loaded.sites:
            acts[site.name] = get_activation(loaded.lm, site).save()
    return ids, acts


@pytest.mark.parametrize("which", ["neox_dir", "llama_dir"])
def test_every_site_is_b_s_d(which, request):
    loaded = load_model(request.getfixturevalue(which), device="cpu")
    arch = Architecture.GPT_NEOX if which == "neox_dir" else Architecture.LLAMA
    assert loaded.architecture is arch
    assert [s.name for s in loaded.sites] == ["embed"] + [
        f"{k}_{layer}" for layer in range(2) for k in ("attn", "mlp", "resid")
    ]
    # attention returns a tuple, layers return plain tensors in transformers 5: detected, not assumed
    assert {s.kind for s in loaded.sites if s.output_is_tuple} == {SiteKind.ATTN}
    ids, acts = _acts(loaded)
    for name, a in acts.items():
        assert a.shape == (2, ids.shape[1], 32), name
    # batch elements differ (guards against output[0] taking batch element 0 of a plain tensor)
    assert not torch.equal(acts["resid_1"][0], acts["resid_1"][1])


def test_set_activation_changes_logits_and_resid_matches_model(neox):
    ids = neox.tokenizer(["the w1 w2"], return_tensors="pt").input_ids
    with neox.lm.trace(ids):
        base = neox.lm.output.logits.save()
    with neox.lm.trace(ids):
        a = get_activation(neox.lm, neox.sites[1])
        set_activation(neox.lm, neox.sites[1], a * 0)
        ablated = neox.lm.output.logits.save()
    assert (base - ablated).abs().max() > 1e-4
    # the last residual site is the input of the final layer norm
    hf = neox.hf_model
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states
    _, acts = _acts(neox, "the w1 w2")
    assert torch.allclose(acts["resid_0"][:1], hs[1][:1], atol=1e-6)
    assert torch.allclose(acts["embed"][:1], hs[0][:1], atol=1e-6)


def test_dtype_and_missing_model(neox_dir, tmp_path):
    loaded = load_model(neox_dir, device="cpu", dtype="float64")
    assert next(loaded.hf_model.parameters()).dtype == torch.float64
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(neox_dir, device="cpu", dtype="float8")


def test_before_wrap_hook_sees_hf_model(neox_dir):
    seen = []
    load_model(neox_dir, device="cpu", before_wrap=lambda m: seen.append(type(m).__name__))
    assert seen == ["GPTNeoXForCausalLM"]


def test_marks_layout_roundtrip_and_errors(neox, neox_saes, tmp_path):
    aes = load_dictionaries(neox.sites, neox_saes / "tiny", dtype=torch.float64)
    assert set(aes) == {s.name for s in neox.sites}
    assert aes["mlp_1"].encoder.weight.shape == (64, 32)
    assert aes["mlp_1"].encoder.weight.dtype == torch.float64
    # identical weights to what was saved
    sd = torch.load(neox_saes / "tiny" / "mlp_out_layer1" / "10_64" / "ae.pt", weights_only=True)
    assert torch.equal(aes["mlp_1"].decoder.weight.float(), sd["decoder.weight"])
    # safetensors round trip
    save_autoencoder(aes["mlp_1"], tmp_path / "x" / "ae.safetensors")
    back = load_autoencoder(tmp_path / "x" / "ae.safetensors", d_model=32, dtype=torch.float64)
    assert torch.equal(back.encoder.weight, aes["mlp_1"].encoder.weight)
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
    with pytest.raises(DictionaryError, match="encoder.bias has shape"):
        load_autoencoder(bad, d_model=32, site="mlp_1")


def test_splice_all_sites_leaves_logits_unchanged(neox, neox_saes):
    aes = load_dictionaries(neox.sites, neox_saes / "tiny")
    ids = neox.tokenizer(["the w1 w2 and w3", "a w4 w5 to w6"], return_tensors="pt").input_ids
    with neox.lm.trace(ids):
        base = neox.lm.output.logits.save()
    leaves = {}
    with neox.lm.trace(ids):
        for site in neox.sites:
            out, f, err = splice_with_grad_leaves(aes[site.name], get_activation(neox.lm, site))
            set_activation(neox.lm, site, out)
            leaves[site.name] = (f.save(), err.save())
        spliced = neox.lm.output.logits.save()
    assert (spliced - base).abs().max() <= 1e-5
    # gradient routing: the error node gets the true gradient of the site output, features get it
    # through the decoder
    metric = spliced[:, -1, 5].sum()
    f, err = leaves["resid_0"]
    gf, gerr = torch.autograd.grad(metric, [f, err])
    assert torch.allclose(gf, gerr @ aes["resid_0"].decoder.weight, atol=1e-6)
    with neox.lm.trace(ids):  # parameters are frozen: make the embedding a leaf to get a graph
        set_activation(
            neox.lm, neox.sites[0], get_activation(neox.lm, neox.sites[0]).detach().requires_grad_()
        )
        r = neox.lm.gpt_neox.layers[0].output.save()
        plain = neox.lm.output.logits.save()
    (g_plain,) = torch.autograd.grad(plain[:, -1, 5].sum(), [r])
    assert torch.allclose(gerr, g_plain, atol=1e-6)


def test_identity_dictionary_is_exact():
    ident = IdentityDictionary(8)
    x = torch.randn(2, 3, 8)
    x_hat, f = ident(x, output_features=True)
    assert torch.equal(x_hat, x) and torch.equal(f, x) and ident.dict_size == 8


def test_neurons_source(neox):
    aes = load_dictionaries(neox.sites, "neurons")
    assert all(isinstance(a, IdentityDictionary) for a in aes.values())


def test_tokenizer_helper_roundtrip(tmp_path):
    tok = make_tokenizer()
    save_model(tiny_gpt_neox(), tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("the w1").input_ids == tok("the w1").input_ids


def test_wrap_keeps_the_requested_device(neox_dir):
    """nnsight wraps the model in a transformers pipeline, which (given no device) moves it to the first
    accelerator: the loader must keep the model where it was asked to be."""
    from feature_circuits.model.loading import wrap

    loaded = load_model(neox_dir, device="cpu")
    assert loaded.device == torch.device("cpu")
    assert {p.device.type for p in loaded.hf_model.parameters()} == {"cpu"}
    assert {b.device.type for b in loaded.hf_model.buffers()} == {"cpu"}
    lm = wrap(loaded.hf_model, loaded.tokenizer)  # default: where the parameters are
    assert {p.device.type for p in lm._module.parameters()} == {"cpu"}


@pytest.mark.slow
def test_load_by_hub_id_from_offline_cache(tmp_path):
    """``org/name`` is a hub id (not a missing directory): a model laid out in a hub cache loads through
    the same loader, offline. Run in a subprocess because huggingface_hub reads its cache and offline
    settings from the environment when it is imported."""
    import os
    import subprocess
    import sys

    snap = tmp_path / "hub" / "models--tiny-org--tiny-neox" / "snapshots" / ("0" * 40)
    save_model(tiny_gpt_neox(), snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    code = (
        "from feature_circuits.model import load_model; m = load_model('tiny-org/tiny-neox', device='cpu'); "
        "print(m.architecture.value, len(m.sites))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["gpt_neox", "7"]
    # a hub id that is in no cache fails with a clear error (offline: no retries)
    code = "from feature_circuits.model import load_model; load_model('tiny-org/absent', device='cpu')"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "could not load model 'tiny-org/absent'" in out.stderr


def test_local_path_vs_hub_id(tmp_path):
    from feature_circuits.model.loading import is_local_path

    assert is_local_path(str(tmp_path))  # exists
    assert is_local_path("./runs/model") and is_local_path("/no/such/dir") and is_local_path("a/b/c")
    assert not is_local_path("EleutherAI/pythia-70m-deduped") and not is_local_path("gpt2")


def test_corrupt_safetensors_and_missing_marks_are_clear_errors(tmp_path, monkeypatch):
    bad = tmp_path / "embed" / "1024" / "ae.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    with pytest.raises(DictionaryError, match=r"site embed: .*ae.safetensors: cannot read safetensors"):
        load_autoencoder(bad, site="embed")
    import feature_circuits.dictionaries as dmod

    monkeypatch.setitem(
        dmod.KNOWN_SAES,
        "marks",
        dmod.SAESource(root=tmp_path / "absent", model_dir="pythia-70m-deduped", dict_id="10_32768"),
    )
    with pytest.raises(DictionaryError, match="download_saes.py"):
        load_dictionaries([], "marks")


def test_splice_leaves_llama_logits_unchanged(llama_dir, tmp_path):
    llama = load_model(llama_dir, device="cpu")
    aes = load_dictionaries(llama.sites, save_random_saes(llama.hf_model, tmp_path) / "tiny")
    ids = llama.tokenizer(["the w1 w2 and w3"], return_tensors="pt").input_ids
    with llama.lm.trace(ids):
        base = llama.lm.output.logits.save()
    with llama.lm.trace(ids):
        for site in llama.sites:
            out, _, _ = splice_with_grad_leaves(aes[site.name], get_activation(llama.lm, site))
            set_activation(llama.lm, site, out)
        spliced = llama.lm.output.logits.save()
    assert (spliced - base).abs().max() <= 1e-5
