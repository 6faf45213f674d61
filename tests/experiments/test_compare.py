"""Component-level comparison (feature_circuits.compare): pair builder, exact and atp component scores
against hand computations on the plain HF model, pcc.json schema, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.compare import (
    PairBuildError,
    build_ioi_pairs,
    build_sva_pairs,
    component_exact,
    component_scores,
    main,
    run_compare,
    write_outputs,
)
from feature_circuits.attribution import load_for_attribution
from feature_circuits.data import make_batches, tokenize_pair
from feature_circuits.metrics import logit_diff as logit_diff_metric
from feature_circuits.model.sites import get_submodule, site_by_name
from feature_circuits.toy import grammar
from tests.helpers import WORDS, tiny_gpt_neox, tiny_llama, tiny_tokenizer

IOI_WORDS = [
    "Then",
    ",",
    "and",
    "went",
    "to",
    "the",
    ".",
    "gave",
    "a",
    "Mary",
    "John",
    "Alice",
    "Bob",
    "store",
    "park",
    "ring",
    "book",
]
SVA_WORDS = [
    "The",
    "the",
    "that",
    "near",
    "behind",
    "author",
    "authors",
    "pilot",
    "pilots",
    "is",
    "are",
    "has",
    "have",
    "likes",
    "like",
    "knows",
    "know",
]


def _assert_valid(pairs, tok):
    for p in pairs:
        t = tokenize_pair(p, tok)  # raises on unequal lengths / multi-token or misaligned answers
        assert len(t.clean) == len(t.patch)
        assert len(tok(p.clean_answer, add_special_tokens=False)["input_ids"]) == 1


def test_ioi_pairs_tiny_tokenizer():
    tok = tiny_tokenizer()  # names: Mary, John; place: store; object: ring
    pairs = build_ioi_pairs(tok, 10, seed=0)
    assert len(pairs) == 2  # (B, A) in both orders: all the tokenizer admits
    _assert_valid(pairs, tok)
    assert {p.clean_answer for p in pairs} == {" Mary", " John"}
    assert build_ioi_pairs(tok, 10, seed=0) == pairs


def test_ioi_pairs_seeded_and_distinct():
    tok = tiny_tokenizer(IOI_WORDS)
    a, b, c = (
        build_ioi_pairs(tok, 8, seed=1),
        build_ioi_pairs(tok, 8, seed=1),
        build_ioi_pairs(tok, 8, seed=2),
    )
    assert a == b and a != c
    assert len({p.clean_prefix for p in a}) == 8
    _assert_valid(a, tok)


def test_ioi_rejects_tokenizer_without_single_token_names():
    tok = tiny_tokenizer([w for w in WORDS if w not in grammar.NAMES])
    with pytest.raises(PairBuildError, match="IOI names"):
        build_ioi_pairs(tok, 5)


def test_sva_pairs_word_level():
    tok = tiny_tokenizer(SVA_WORDS)
    pairs = build_sva_pairs(tok, 12, seed=0)
    assert len(pairs) == 12
    _assert_valid(pairs, tok)
    assert {p.case for p in pairs}  # several structures
    assert any("that" in p.clean_prefix for p in pairs) and any(p.clean_prefix.count(" ") == 1 for p in pairs)


def test_ioi_pairs_bpe_tokenizer():
    """A small byte-level BPE trained on IOI text: only some names are single tokens (with the space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    names = grammar.NAMES[:6]  # only these get merged into single tokens
    text = [
        grammar.make_ioi_pair(b, a, p, o)["clean_prefix"] + " " + a
        for b, a in zip(names, names[1:] + names[:1], strict=True)
        for p, o in zip(grammar.PLACES, grammar.OBJECTS, strict=True)
    ] * 5
    tk.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    singles = [n for n in grammar.NAMES if len(tok(" " + n, add_special_tokens=False)["input_ids"]) == 1]
    assert 2 <= len(singles) < len(grammar.NAMES)
    pairs = build_ioi_pairs(tok, 20, seed=0)
    assert pairs
    _assert_valid(pairs, tok)
    assert all(p.clean_answer.strip() in singles for p in pairs)


# --------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def ioi_model_dir(tmp_path_factory) -> Path:
    tok = tiny_tokenizer(IOI_WORDS)
    path = tmp_path_factory.mktemp("ioi_neox")
    tiny_gpt_neox(seed=3, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ioi_loaded(ioi_model_dir):
    return load_for_attribution(ioi_model_dir, "neurons", device="cpu")


@pytest.fixture(scope="module")
def ioi_batch(ioi_loaded):
    loaded, _ = ioi_loaded
    return make_batches(build_ioi_pairs(loaded.tokenizer, 6, seed=0), loaded.tokenizer, 6)[0]


def _hook_forward(hf, site, ids, replace=None, capture=None):
    """Plain HF forward; ``replace(x) -> x'`` rewrites the site's activation, ``capture`` stores it."""

    def hook(_m, _i, out):
        x = out[0] if site.output_is_tuple else out
        if capture is not None:
            capture.append(x)
        if replace is None:
            return None
        y = replace(x)
        return (y, *out[1:]) if site.output_is_tuple else y

    h = get_submodule(hf, site.module_path).register_forward_hook(hook)
    try:
        return hf(input_ids=ids).logits
    finally:
        h.remove()


@pytest.mark.parametrize("site_name,pos", [("mlp_0", 3), ("attn_1", 7), ("resid_0", 10)])
def test_component_exact_equals_hand_patch(ioi_loaded, ioi_batch, site_name, pos):
    loaded, _ = ioi_loaded
    site = site_by_name(list(loaded.sites), site_name)
    hf = loaded.hf_model
    exact = component_exact(loaded, ioi_batch, [site])[site_name]
    assert exact.shape == ioi_batch.clean.shape
    with torch.no_grad():
        cap: list = []
        _hook_forward(hf, site, ioi_batch.patch, capture=cap)
        x_patch = cap[0]
        m_clean = logit_diff_metric(hf(input_ids=ioi_batch.clean).logits, ioi_batch)

        def patch_one(x):
            x = x.clone()
            x[:, pos] = x_patch[:, pos]
            return x

        m = logit_diff_metric(_hook_forward(hf, site, ioi_batch.clean, replace=patch_one), ioi_batch)
    torch.testing.assert_close(exact[:, pos], m - m_clean, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("site_name", ["mlp_1", "attn_0", "resid_1"])
def test_atp_component_equals_hand_gradient(ioi_loaded, ioi_batch, site_name):
    loaded, dicts = ioi_loaded
    site = site_by_name(list(loaded.sites), site_name)
    hf = loaded.hf_model
    scores = component_scores(loaded, dicts, ioi_batch, "atp", sites=[site])[site_name]
    with torch.no_grad():
        cap: list = []
        _hook_forward(hf, site, ioi_batch.patch, capture=cap)
        x_patch = cap[0]
    leaf: list = []

    def make_leaf(x):
        y = x.detach().requires_grad_(True)
        leaf.append(y)
        return y

    m = logit_diff_metric(_hook_forward(hf, site, ioi_batch.clean, replace=make_leaf), ioi_batch)
    (g,) = torch.autograd.grad(m.sum(), leaf)
    hand = ((x_patch - leaf[0].detach()) * g).sum(-1)
    torch.testing.assert_close(scores, hand, atol=1e-5, rtol=1e-4)
    relp = component_scores(loaded, dicts, ioi_batch, "relp", sites=[site])[site_name]
    assert not torch.allclose(relp, scores)  # the LRP rules change the backward


def test_pcc_json_schema(ioi_loaded, tmp_path):
    result = run_compare(
        task="ioi",
        num_pairs=6,
        methods=["atp", "relp", "ig"],
        steps=2,
        batch_size=4,
        loaded_and_dicts=ioi_loaded,
    )
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["task"] == "ioi" and data["num_pairs"] == 6 and data["model"]
    assert set(data["pcc"]) == {"atp", "relp", "ig"}
    for per_kind in data["pcc"].values():
        assert set(per_kind) == {"resid", "attn", "mlp"}
        assert all(v is None or -1.0 <= v <= 1.0 for v in per_kind.values())
    assert set(data["timing_s"]) == {"exact", "atp", "relp", "ig"}
    n_layers = 2
    assert data["num_points"] == {k: 6 * 15 * n_layers for k in ("resid", "attn", "mlp")}
    html = paths["html"].read_text()
    assert "plotly" in html.lower() and '<script src="http' not in html
    assert "| relp |" in paths["md"].read_text()


def test_cli_llama_and_errors(tmp_path):
    tok = tiny_tokenizer(IOI_WORDS)
    model_dir = tmp_path / "llama"
    tiny_llama(seed=1, vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(
        [
            "--model",
            str(model_dir),
            "--task",
            "ioi",
            "--num-pairs",
            "4",
            "--methods",
            "atp,relp",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads((out / "pcc.json").read_text())
    assert set(data["pcc"]) == {"atp", "relp"}
    assert main(["--model", str(model_dir), "--methods", "exact", "--out", str(out)]) == 2
    assert (
        main(["--model", str(model_dir), "--task", "sva", "--out", str(out)]) == 2
    )  # no SVA words: clear error


def test_feature_level(tmp_path, ioi_model_dir):
    from tests.helpers import save_random_saes

    sae_root = save_random_saes(
        tiny_gpt_neox(seed=3, vocab_size=len(tiny_tokenizer(IOI_WORDS))), tmp_path / "saes"
    )
    result = run_compare(
        ioi_model_dir,
        task="ioi",
        num_pairs=3,
        methods=["atp"],
        features=True,
        saes=str(sae_root),
        batch_size=3,
    )
    assert result.level == "feature"
    assert set(result.kinds) >= {
        f"{k} {part}" for k in ("embed", "resid", "attn", "mlp") for part in ("features", "errors")
    }
    for kind in ("resid features", "resid errors"):
        x, y = result.points["atp"][kind]
        assert x.shape == y.shape and x.size > 0
    # one error node per (example, position, site) against up to 64 features there
    x_err, _ = result.points["atp"]["resid errors"]
    x_feat, _ = result.points["atp"]["resid features"]
    assert x_err.size < x_feat.size
    assert json.loads(json.dumps(result.to_json()))["pcc"]["atp"].keys() == set(result.kinds)


def test_component_exact_resumed_equals_full_reruns(ioi_loaded, ioi_batch, capsys):
    """Resumed component patching (the default) gives the full re-runs' effects, every component."""
    loaded, _ = ioi_loaded
    capsys.readouterr()
    resumed = component_exact(loaded, ioi_batch, max_rows=17, progress=True)
    assert "exact components" in capsys.readouterr().err
    full = component_exact(loaded, ioi_batch, max_rows=64, resume=False, progress=False)
    assert set(resumed) == set(full) == {s.name for s in loaded.sites if s.layer >= 0}
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=0)
    assert max(float(v.abs().max()) for v in full.values()) > 1e-3


def test_component_exact_resumed_llama_float64(tmp_path):
    tok = tiny_tokenizer(IOI_WORDS)
    tiny_llama(seed=2, vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_for_attribution(tmp_path / "m", "neurons", device="cpu", dtype=torch.float64)
    batch = make_batches(build_ioi_pairs(loaded.tokenizer, 3, seed=1), loaded.tokenizer, 3)[0]
    resumed = component_exact(loaded, batch)
    full = component_exact(loaded, batch, resume=False)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-10, rtol=0)
    # before the first token where clean and patch differ nothing changes: not run, exactly 0
    first = (batch.clean != batch.patch).int().argmax(1)
    assert int(first.min()) > 0
    for k in full:
        for e, p in enumerate(first.tolist()):
            assert torch.equal(resumed[k][e, :p], torch.zeros(p, dtype=resumed[k].dtype)), k
            assert torch.equal(full[k][e, :p], torch.zeros(p, dtype=full[k].dtype)), k
        assert resumed[k].abs().max() > 0, k
