"""The shipped embedded model and SAEs: loading, held-out behaviour, SAE reconstruction, and tiny
end-to-end runs of the training scripts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from feature_circuits.toy import MODEL_DIR as EMBEDDED_MODEL_DIR
from feature_circuits.toy import MODEL_NAME as EMBEDDED_MODEL_NAME
from feature_circuits.toy import SAE_ROOT as EMBEDDED_SAE_ROOT
from feature_circuits.toy import grammar, train_model, train_saes
from feature_circuits.toy.datasets import build_tokenizer, encode_words, evaluate_pairs, heldout_eval_texts


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    model = GPTNeoXForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    return tok, model


def test_tokenizer_roundtrip(shipped):
    tok, model = shipped
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    assert len(tok) == model.config.vocab_size
    assert tok(" likes", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids("likes")]
    assert tok("The author").input_ids + tok(" likes").input_ids == tok("The author likes").input_ids
    assert tok.bos_token is None  # no BOS is prepended
    texts = [s.text for s in grammar.generate_corpus(50, seed=3)]
    assert encode_words(tok, texts) == [tok(t).input_ids for t in texts]
    assert all(tok.unk_token_id not in ids for ids in encode_words(tok, texts))


def test_architecture(shipped):
    _, model = shipped
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        4,
        128,
        4,
        512,
    )
    assert c.use_parallel_residual and not c.tie_word_embeddings
    assert c.rope_parameters["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize("structure", grammar.STRUCTURES)
def test_heldout_sva(shipped, structure):
    tok, model = shipped
    pairs = grammar.generate_sva_pairs(structure, 40, "test", seed=123)
    r = evaluate_pairs(model, tok, pairs)
    assert r["accuracy"] >= 0.95, r
    assert r["mean_logit_diff"] > 0


def test_heldout_ioi(shipped):
    tok, model = shipped
    r = evaluate_pairs(model, tok, grammar.generate_ioi_pairs(40, "test", seed=123))
    assert r["accuracy"] >= 0.90, r


def test_holdout_split_is_disjoint():
    for structure in grammar.STRUCTURES:  # the same (prefix, answer) never lands in both splits
        test = {
            (p["clean_prefix"], p["clean_answer"]) for p in grammar.generate_sva_pairs(structure, 150, "test")
        }
        train = {
            (p["clean_prefix"], p["clean_answer"])
            for p in grammar.generate_sva_pairs(structure, 400, "train")
        }
        assert not test & train, structure
    corpus = {s.text for s in grammar.generate_corpus(3000, seed=0)}
    for p in grammar.generate_ioi_pairs(50, "test"):
        assert not any(t.startswith(p["clean_prefix"]) for t in corpus)


@pytest.mark.slow
def test_shipped_saes_reconstruct(shipped):
    tok, model = shipped
    from feature_circuits.dictionaries.marks import load_autoencoder
    from feature_circuits.model.sites import build_sites

    texts = heldout_eval_texts(seed=0)
    sites = build_sites(model)
    assert len(sites) == 13
    acts = train_saes.collect_sites(model, tok, texts, sites)
    for site in sites:
        ddir = EMBEDDED_SAE_ROOT / EMBEDDED_MODEL_NAME / site.marks_dir / "1024"
        cfg = json.loads((ddir / "config.json").read_text())
        ae = load_autoencoder(ddir / "ae.safetensors", d_model=128, site=site.name)
        assert ae.dict_size == 1024
        stats = train_saes.sae_stats(ae, acts[site.name])
        assert abs(stats["fve"] - cfg["fve"]) < 0.02, (site.name, stats["fve"], cfg["fve"])
        assert stats["fve"] >= 0.9, site.name


def test_project_loaders():
    """The project's own loaders find the shipped model and SAEs by default."""
    from feature_circuits.dictionaries.marks import load_dictionaries
    from feature_circuits.model.loading import load_model

    loaded = load_model("embedded", device="cpu", dtype=torch.float32)
    assert [s.name for s in loaded.sites][:4] == ["embed", "attn_0", "mlp_0", "resid_0"]
    dicts = load_dictionaries(loaded.sites)
    assert len(dicts) == 13 and all(d.dict_size == 1024 for d in dicts.values())


def test_training_scripts_tiny(tmp_path):
    metrics = train_model.main(
        [
            "--steps",
            "3",
            "--d-model",
            "32",
            "--n-layers",
            "1",
            "--n-heads",
            "2",
            "--d-mlp",
            "64",
            "--batch-size",
            "8",
            "--eval-n",
            "4",
            "--out",
            str(tmp_path / "model"),
        ]
    )
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert set(metrics["model"]["heldout"]) == {*grammar.DATASET_NAMES.values(), "ioi"}
    GPTNeoXForCausalLM.from_pretrained(tmp_path / "model")
    res = train_saes.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "saes"),
            "--steps",
            "3",
            "--dict-size",
            "16",
            "--n-sentences",
            "50",
            "--batch-size",
            "32",
            "--sites",
            "embed,resid_0",
            "--metrics",
            str(tmp_path / "metrics.json"),
        ]
    )
    assert set(res) == {"embed", "resid_0"}
    assert (tmp_path / "saes" / EMBEDDED_MODEL_NAME / "resid_out_layer0" / "16" / "ae.safetensors").is_file()
    assert "saes" in json.loads((tmp_path / "metrics.json").read_text())
