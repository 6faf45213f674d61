"""Fixtures of the evaluation tests: the tiny GPT-NeoX (2 layers, so only embed is free) with random
SAEs, aligned evaluation pairs, and an independent reference for an ablated forward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from feature_circuits.data import Pair, make_batches
from feature_circuits.dictionaries import encode_with_error, load_dictionaries
from feature_circuits.model.sites import get_submodule

#: ``{site: [(position or None for every position, feature or None for the error node)]}``
Ablation = dict[str, list[tuple[int | None, int | None]]]


def _pairs(n: int = 10) -> list[Pair]:
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


@pytest.fixture(scope="session")
def eval_pairs() -> Callable[[int], list[Pair]]:
    """``eval_pairs(n)``: n clean/patch pairs of one token length (5)."""
    return _pairs


@pytest.fixture(scope="module")
def aes(neox, neox_saes):
    return load_dictionaries(neox.sites, neox_saes / "tiny")


@pytest.fixture(scope="module")
def batches(neox):
    return make_batches(_pairs(), neox.tokenizer, 4)


def _hand_metric(loaded, aes, batches, means, ablate: Ablation, capture=None, metric="logit_diff") -> float:
    """Plain torch hooks: at each site in ``ablate`` compute f/err from the site's actual activation,
    set the listed nodes to their mean and output decode(f) + err. The metric, by hand:
    logit(patch answer) - logit(clean answer) (``logit_diff``) or -logit(clean answer)
    (``answer_logit``) at the last position, averaged over the examples."""
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
                clean = logits.gather(1, b.clean_answer[:, None])
                m = -clean if metric == "answer_logit" else logits.gather(1, b.patch_answer[:, None]) - clean
                total += float(m.double().sum())
                n += len(b)
    finally:
        for h in handles:
            h.remove()
    return total / n


@pytest.fixture(scope="session")
def hand_metric():
    """The independent reference :func:`_hand_metric`."""
    return _hand_metric
