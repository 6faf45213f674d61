"""The SAELens registry read offline (feature_circuits.dictionaries.registry): releases resolve to
their model, hooks, sites and Neuronpedia ids without a download; wrong models, unknown releases
and SAE ids are refused with close matches."""

from __future__ import annotations

import pytest

pytest.importorskip("sae_lens", reason="the saelens extra (make install installs it)")

from feature_circuits.dictionaries.registry import (
    get_release,
    model_matches,
    parse_saelens_spec,
    resolve_saelens_spec,
)
from feature_circuits.errors import DictionaryError
from feature_circuits.types import Architecture


def test_pythia_70m_res_sm_resolves_offline():
    """Pythia-70M-shaped (GPT-NeoX, 6 layers): resid_pre of block 0 is the embedding, resid_post of
    block L is resid_L; every SAE has its Neuronpedia id."""
    saes = resolve_saelens_spec(
        "saelens:pythia-70m-deduped-res-sm",
        model_names=["EleutherAI/pythia-70m-deduped"],
        architecture=Architecture.GPT_NEOX,
        n_layers=6,
    )
    assert [s.site for s in saes] == ["embed"] + [f"resid_{i}" for i in range(6)]
    assert saes[0].hook_name == "blocks.0.hook_resid_pre"
    assert saes[4].neuronpedia == "pythia-70m-deduped/3-res-sm"
    assert saes[4].source == "pythia-70m-deduped-res-sm/blocks.3.hook_resid_post"
    # several releases and single SAEs in one spec
    mixed = resolve_saelens_spec(
        "saelens:pythia-70m-deduped-att-sm/blocks.2.hook_attn_out,blocks.4.hook_attn_out,"
        "pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out",
        model_names=["/models/pythia-70m-deduped"],
        architecture="gpt_neox",
        n_layers=6,
    )
    assert [(s.site, s.neuronpedia) for s in mixed] == [
        ("attn_2", "pythia-70m-deduped/2-att-sm"),
        ("attn_4", "pythia-70m-deduped/4-att-sm"),
        ("mlp_0", "pythia-70m-deduped/0-mlp-sm"),
    ]


def test_gemma_scope_resolves_offline():
    """Gemma-2-shaped (26 layers): Gemma Scope's hooks come from sae_lens's own gemma_2 config getter
    (names only); the canonical release's first SAE per site is the 16k width; attention SAEs are
    hook_z SAEs (site attn_z_L)."""
    res = resolve_saelens_spec(
        "saelens:gemma-scope-2b-pt-res-canonical",
        model_names=["google/gemma-2-2b"],
        architecture=Architecture.GEMMA2,
        n_layers=26,
    )
    assert [s.site for s in res] == [f"resid_{i}" for i in range(26)]
    assert res[20].sae_id == "layer_20/width_16k/canonical"
    assert res[20].neuronpedia == "gemma-2-2b/20-gemmascope-res-16k"
    att = resolve_saelens_spec(
        "saelens:gemma-scope-2b-pt-att-canonical/layer_5/width_16k/canonical",
        model_names=["google/gemma-2-2b"],
        architecture="gemma2",
        n_layers=26,
    )
    assert [(s.hook_name, s.site) for s in att] == [("blocks.5.attn.hook_z", "attn_z_5")]
    wide = get_release("gemma-scope-2b-pt-res-canonical").sae("layer_12/width_1m/canonical")
    assert wide.hook_name == "blocks.12.hook_resid_post"
    # an SAE id that is a hook name with a suffix (SAEBench trainers) names its hook
    bench = get_release("sae_bench_gemma-2-2b_topk_width-2pow12_date-1109").saes[0]
    assert (bench.sae_id, bench.hook_name) == (
        "blocks.12.hook_resid_post__trainer_0",
        "blocks.12.hook_resid_post",
    )


def test_wrong_model_unknown_release_and_sae_id_refused():
    with pytest.raises(DictionaryError, match=r"trained on model 'gemma-2-2b'.*pythia-70m-deduped"):
        resolve_saelens_spec(
            "saelens:gemma-scope-2b-pt-res-canonical",
            model_names=["EleutherAI/pythia-70m-deduped"],
            architecture="gpt_neox",
            n_layers=6,
        )
    with pytest.raises(
        DictionaryError, match=r"unknown release 'pythia-70m-deduped-res-sn'.*pythia-70m-deduped-res-sm"
    ):
        parse_saelens_spec("saelens:pythia-70m-deduped-res-sn")
    with pytest.raises(
        DictionaryError, match=r"no SAE 'layer_3/width_16k/canonicl'.*layer_3/width_16k/canonical"
    ):
        resolve_saelens_spec(
            "saelens:gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonicl",
            model_names=["gemma-2-2b"],
            architecture="gemma2",
        )
    with pytest.raises(DictionaryError, match="layer 7 does not exist"):
        resolve_saelens_spec(
            "saelens:gemma-scope-2b-pt-res-canonical/layer_7/width_16k/canonical",
            model_names=["gemma-2-2b"],
            architecture="gemma2",
            n_layers=4,
        )
    with pytest.raises(DictionaryError, match="empty"):
        parse_saelens_spec("saelens:")
    assert model_matches("google/gemma-3-1b-pt", ["/data/gemma-3-1b-pt/"])
    assert not model_matches("gemma-2-2b", ["gemma-2-2b-it"])
