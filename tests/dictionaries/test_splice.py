"""The splice primitive: splicing every site's dictionary with its error node leaves the logits
unchanged, and routes gradients as docs/algorithms.md ("Dictionaries and the error node") says."""

from __future__ import annotations

import torch

from feature_circuits.dictionaries import (
    IdentityDictionary,
    MarksAutoEncoder,
    load_dictionaries,
    splice_with_grad_leaves,
)
from feature_circuits.model.loading import load_model
from feature_circuits.model.sites import get_activation, save, set_activation
from tests.helpers import save_random_saes


def test_splice_all_sites_leaves_logits_unchanged(neox, neox_saes):
    aes = load_dictionaries(neox.sites, neox_saes / "tiny")
    ids = neox.tokenizer(["the w1 w2 and w3", "a w4 w5 to w6"], return_tensors="pt").input_ids
    with neox.lm.trace(ids):
        base = save(neox.lm.output.logits)
    leaves = {}
    with neox.lm.trace(ids):
        for site in neox.sites:
            out, f, err = splice_with_grad_leaves(aes[site.name], get_activation(neox.lm, site))
            set_activation(neox.lm, site, out)
            leaves[site.name] = (save(f), save(err))
        spliced = save(neox.lm.output.logits)
    assert (spliced - base).abs().max() <= 1e-5
    # gradient routing: the error node gets the true gradient of the site output, features get it
    # through the decoder
    metric = spliced[:, -1, 5].sum()
    f, err = leaves["resid_0"]
    gf, gerr = torch.autograd.grad(metric, [f, err])
    resid_0 = aes["resid_0"]
    assert isinstance(resid_0, MarksAutoEncoder)
    assert torch.allclose(gf, gerr @ resid_0.decoder.weight, atol=1e-6)
    with neox.lm.trace(ids):  # parameters are frozen: make the embedding a leaf to get a graph
        set_activation(
            neox.lm, neox.sites[0], get_activation(neox.lm, neox.sites[0]).detach().requires_grad_()
        )
        r = save(neox.lm.gpt_neox.layers[0].output)
        plain = save(neox.lm.output.logits)
    (g_plain,) = torch.autograd.grad(plain[:, -1, 5].sum(), [r])
    assert torch.allclose(gerr, g_plain, atol=1e-6)


def test_identity_dictionary_is_exact():
    ident = IdentityDictionary(8)
    x = torch.randn(2, 3, 8)
    x_hat, f = ident(x, output_features=True)
    assert torch.equal(x_hat, x) and torch.equal(f, x) and ident.dict_size == 8


def test_splice_leaves_llama_logits_unchanged(llama_dir, tmp_path):
    llama = load_model(llama_dir, device="cpu")
    aes = load_dictionaries(llama.sites, save_random_saes(llama.hf_model, tmp_path) / "tiny")
    ids = llama.tokenizer(["the w1 w2 and w3"], return_tensors="pt").input_ids
    with llama.lm.trace(ids):
        base = save(llama.lm.output.logits)
    with llama.lm.trace(ids):
        for site in llama.sites:
            out, _, _ = splice_with_grad_leaves(aes[site.name], get_activation(llama.lm, site))
            set_activation(llama.lm, site, out)
        spliced = save(llama.lm.output.logits)
    assert (spliced - base).abs().max() <= 1e-5
