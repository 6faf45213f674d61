"""Model loading (HF id, short name, local directory, device, dtype) and sites: reading and writing
them inside a trace, ``LoadedModel``'s site lookups."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.errors import ConfigError
from feature_circuits.model.loading import ModelLoadError, load_model
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import Architecture, SiteKind
from tests.helpers import make_tokenizer, save_model, tiny_gpt_neox


def _acts(loaded, text="the w1 w2 and w3 is"):
    ids = loaded.tokenizer([text, text.replace("w1", "w5")], return_tensors="pt").input_ids
    acts = {}
    with loaded.lm.trace(ids):
        for site in loaded.sites:
            acts[site.name] = save(get_activation(loaded.lm, site))
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
        base = save(neox.lm.output.logits)
    with neox.lm.trace(ids):
        a = get_activation(neox.lm, neox.sites[1])
        set_activation(neox.lm, neox.sites[1], a * 0)
        ablated = save(neox.lm.output.logits)
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


def test_loaded_model_site_lookups(neox, llama_dir):
    """``last_resid`` is the residual site after the last layer; ``site(name)`` finds a site by its
    name and names the known sites when there is none."""
    assert neox.last_resid.name == "resid_1" and neox.last_resid is neox.sites[-1]
    assert neox.site("mlp_0").kind is SiteKind.MLP and neox.site("mlp_0").layer == 0
    with pytest.raises(ConfigError, match=r"unknown site 'mlp_7'; sites are \['embed', 'attn_0'"):
        neox.site("mlp_7")
    llama = load_model(llama_dir, device="cpu")
    assert llama.last_resid.module_path == "model.layers.1"
