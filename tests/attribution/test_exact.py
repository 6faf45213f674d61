"""Exact patching that resumes (docs/algorithms.md, "Resuming from the patched site"): the resumed
forward equals a full nnsight re-run for every site kind, several positions and every family
(GPT-NeoX parallel and sequential residual, Llama, Gemma 2, Gemma 3), in float64; exact node
effects are the same either way; unknown models fall back to full re-runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from feature_circuits.attribution import ExactOptions, load_for_attribution, node_effects
from feature_circuits.attribution.exact import full_rerun_logits
from feature_circuits.data import Batch
from feature_circuits.dictionaries.marks import MarksAutoEncoder
from feature_circuits.metrics import logit_diff
from feature_circuits.model import resume as resume_mod
from feature_circuits.model.loading import load_model
from feature_circuits.model.resume import ResumableForward, reads_last_position_only, resumable
from feature_circuits.types import SiteKind
from tests.helpers import VOCAB, patch_batch, save_model, save_random_saes, tiny_gpt_neox, tiny_llama


def tiny_gemma2(seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
    )
    return Gemma2ForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=4.0,
    )
    return Gemma3ForCausalLM(cfg).eval()


FAMILIES = {
    "neox": lambda: tiny_gpt_neox(seed=1),
    "neox_sequential": lambda: tiny_gpt_neox(seed=2, use_parallel_residual=False),
    "llama": lambda: tiny_llama(seed=3),
    "gemma2": lambda: tiny_gemma2(seed=4),
    "gemma3": lambda: tiny_gemma3(seed=5),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    model = FAMILIES[name]()
    save_model(model, path / "model")
    save_random_saes(model, path / "saes", dict_size=24)
    return name, path


@pytest.fixture(scope="module")
def loaded64(family):
    name, path = family
    loaded, dicts = load_for_attribution(path / "model", path / "saes" / "tiny", "cpu", torch.float64)
    torch.manual_seed(7)
    for s in loaded.attn_z_sites:  # attn_z_L: random dictionaries on the attention output projection's input
        dicts[s.name] = MarksAutoEncoder(s.d_model, 24).to(torch.float64)
    return name, loaded, dicts


def _ids(seq: int = 9, b: int = 3) -> torch.Tensor:
    return torch.randint(2, len(VOCAB), (b, seq), generator=torch.Generator().manual_seed(11))


def _hooked_forward(loaded, site, ids, add):
    """Reference: the HF model's whole forward with ``add`` (n, s, d) added to the site's activation."""
    from feature_circuits.model.sites import get_submodule

    module = get_submodule(loaded.hf_model, site.module_path)
    if site.reads_input:
        handle = module.register_forward_pre_hook(lambda _m, args: (args[0] + add, *args[1:]))
    else:

        def hook(_m, _i, out):
            return (out[0] + add, *out[1:]) if site.output_is_tuple else out + add

        handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return loaded.hf_model(input_ids=ids).logits
    finally:
        handle.remove()


#: Chunks of patches (one position per row): the first, the last, and mixed positions.
CHUNKS = ([0, 0, 0], [8, 8, 8], [2, 6, 8])


def test_resumed_logits_equal_full_reruns(loaded64):
    """Every site kind (embed, attn_z, attn, mlp, resid), patches at the first and the last
    position and a chunk mixing positions: resumed logits == the model's whole forward with the
    same patch (nnsight re-runs are compared below, through the exact effects)."""
    name, loaded, _ = loaded64
    runner = resumable(loaded)
    assert runner is not None, name
    ids = _ids()
    clean = runner.clean(ids)
    assert {s.kind for s in loaded.all_sites} == set(SiteKind), name
    gen = torch.Generator().manual_seed(3)
    rows = torch.tensor([2, 0, 1])
    for site in loaded.all_sites:
        for positions in CHUNKS:
            pos = torch.tensor(positions)
            vec = torch.randn(3, site.d_model, generator=gen, dtype=torch.float64)
            add = torch.zeros(3, ids.shape[1], site.d_model, dtype=torch.float64)
            add[torch.arange(3), pos] = vec
            want = _hooked_forward(loaded, site, ids[rows], add)
            got = runner.patched_logits(clean, site, rows, pos, vec)
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"{name} {site.name} {positions}")
            last = runner.patched_logits(clean, site, rows, pos, vec, last_only=True)
            torch.testing.assert_close(last, want[:, -1:], atol=1e-10, rtol=0)
            # the patch is real (the last position need not move: Gemma's sliding windows)
            assert (got - clean.logits[rows]).abs().max() > 1e-6, (name, site.name)


def test_resumed_logits_equal_nnsight_reruns(loaded64):
    """The nnsight full re-run (the fallback path) is the same reference, for one site of each kind."""
    name, loaded, _ = loaded64
    runner = resumable(loaded)
    assert runner is not None
    ids = _ids()
    batch = Batch(clean=ids, patch=ids, clean_answer=ids[:, 0], patch_answer=ids[:, 1], pairs=())
    clean = runner.clean(ids)
    rows, pos = torch.tensor([1, 2, 0]), torch.tensor([3, 5, 8])
    gen = torch.Generator().manual_seed(4)
    for site_name in ("embed", "attn_z_1", "attn_0", "mlp_1", "resid_0"):
        site = loaded.site(site_name)
        vec = torch.randn(3, site.d_model, generator=gen, dtype=torch.float64)
        want = full_rerun_logits(loaded, batch, site, rows, pos, vec)
        got = runner.patched_logits(clean, site, rows, pos, vec)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"{name} {site_name}")


def test_clean_run_equals_model(loaded64):
    _name, loaded, _ = loaded64
    runner = resumable(loaded)
    assert runner is not None
    ids = _ids(7, 2)
    clean = runner.clean(ids)
    with torch.no_grad():
        want = loaded.hf_model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(clean.logits, want.logits, atol=1e-10, rtol=0)
    assert len(clean.hidden) == runner.n_layers + 1 and len(clean.keys) == runner.n_layers
    torch.testing.assert_close(clean.hidden[1], want.hidden_states[1], atol=1e-10, rtol=0)


def test_exact_effects_resume_equal_full_reruns(loaded64):
    """Exact node effects (features and error nodes of every site, attn_z included) are the same
    with resumed forwards as with full re-runs."""
    name, loaded, dicts = loaded64
    batch = patch_batch(pos=2)
    sites = ["embed", "attn_z_0", "attn_1", "mlp_0", "resid_0", loaded.last_resid.name]  # every kind
    full = node_effects(
        loaded, dicts, batch, "exact", sites=sites, options=ExactOptions(resume=False, chunk_size=256)
    )
    res = node_effects(loaded, dicts, batch, "exact", sites=sites, options=ExactOptions(chunk_size=100))
    assert set(res.effects) == set(sites)
    for k in full.effects:
        torch.testing.assert_close(res.effects[k], full.effects[k], atol=1e-10, rtol=0, msg=f"{name} {k}")
    eff = res.effects[loaded.last_resid.name]
    assert eff.abs().max() > 1e-3
    assert res.effects["embed"][:, :2].abs().max() < 1e-12  # before the changed token: no effect


def test_exact_resume_zero_ablation_and_max_nodes(loaded64):
    _name, loaded, dicts = loaded64
    sites = ["embed", loaded.last_resid.name]
    kw = {"counterfactual": False, "sites": sites}
    full = node_effects(
        loaded, dicts, patch_batch(), "exact", options=ExactOptions(resume=False, max_nodes=15), **kw
    )
    res = node_effects(
        loaded, dicts, patch_batch(), "exact", options=ExactOptions(max_nodes=15, chunk_size=9), **kw
    )
    for k in sites:
        assert torch.isnan(res.effects[k]).any()
        torch.testing.assert_close(res.effects[k], full.effects[k], atol=1e-10, rtol=0, equal_nan=True)


def test_float32_resume_matches_full_reruns(tmp_path):
    """float32 (the default dtype): resumed and full re-run exact effects agree to 1e-6."""
    save_model(tiny_gpt_neox(seed=9, num_hidden_layers=3), tmp_path / "m")
    save_random_saes(tiny_gpt_neox(seed=9, num_hidden_layers=3), tmp_path / "s", dict_size=32)
    loaded, dicts = load_for_attribution(tmp_path / "m", tmp_path / "s" / "tiny", "cpu", torch.float32)
    batch = patch_batch(pos=3)
    sites = ["embed", "attn_0", "mlp_1", "resid_1"]
    full = node_effects(
        loaded, dicts, batch, "exact", sites=sites, options=ExactOptions(resume=False, chunk_size=256)
    )
    res = node_effects(loaded, dicts, batch, "exact", sites=sites)
    for k in full.effects:
        torch.testing.assert_close(res.effects[k], full.effects[k], atol=1e-6, rtol=0)


def test_unsupported_model_falls_back_to_full_reruns(tmp_path):
    save_model(tiny_gpt_neox(seed=4), tmp_path / "m")
    save_random_saes(tiny_gpt_neox(seed=4), tmp_path / "s")
    loaded, dicts = load_for_attribution(tmp_path / "m", tmp_path / "s" / "tiny", "cpu", torch.float64)
    want = node_effects(
        loaded, dicts, patch_batch(), "exact", options=ExactOptions(resume=False), sites=["mlp_1"]
    )
    loaded.hf_model.train()  # refused (dropout rates are 0 here: outputs are unchanged)
    try:
        with pytest.warns(RuntimeWarning, match="re-runs the whole model"):
            assert resumable(loaded) is None
        got = node_effects(loaded, dicts, patch_batch(), "exact", sites=["mlp_1"])
    finally:
        loaded.hf_model.eval()
    assert resumable(loaded) is None  # decided once per model
    torch.testing.assert_close(got.effects["mlp_1"], want.effects["mlp_1"], atol=1e-12, rtol=0)


def test_self_check_rejects_a_wrong_runner(tmp_path, monkeypatch):
    """The probe comparison catches a runner that does not reproduce the model (here: no causal mask)."""
    model = tiny_llama(seed=6).double()
    runner = ResumableForward(model)
    assert resume_mod._self_check(runner) is None
    monkeypatch.setattr(runner, "attn_impl", "eager")
    monkeypatch.setattr(runner, "_mask", lambda seq, window, like: None)
    reason = resume_mod._self_check(runner)
    assert reason is not None and "differs from the model's forward" in reason


def test_reads_last_position_only():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    batch = patch_batch()
    assert reads_last_position_only(logit_diff, logits, batch)

    def first_position(lg, answers):
        return lg[:, 0].gather(1, answers.clean_answer.view(-1, 1)).squeeze(1)

    def needs_two(lg, answers):
        return lg[:, -2, 0]

    assert not reads_last_position_only(first_position, logits, batch)
    assert not reads_last_position_only(needs_two, logits, batch)


def test_exact_progress_bar(tmp_path, capsys):
    save_model(tiny_gpt_neox(seed=5), tmp_path / "m")
    save_random_saes(tiny_gpt_neox(seed=5), tmp_path / "s")
    loaded, dicts = load_for_attribution(tmp_path / "m", tmp_path / "s" / "tiny", "cpu", torch.float64)
    capsys.readouterr()
    node_effects(
        loaded, dicts, patch_batch(), "exact", sites=["resid_1"], options=ExactOptions(progress=True)
    )
    assert "exact" in capsys.readouterr().err
    node_effects(
        loaded, dicts, patch_batch(), "exact", sites=["resid_1"], options=ExactOptions(progress=False)
    )
    assert "exact" not in capsys.readouterr().err


def test_resumable_on_plain_hf_model():
    """``resumable`` takes an HF model too, and the runner starts each site kind where it should."""
    model = tiny_gpt_neox(seed=8).double()
    runner = resumable(model)
    assert runner is not None
    loaded_sites = {s.name: s for s in load_sites(model)}
    assert runner.start_layer(loaded_sites["embed"]) == 0
    assert runner.start_layer(loaded_sites["attn_1"]) == 1
    assert runner.start_layer(loaded_sites["attn_z_1"]) == 1
    assert runner.start_layer(loaded_sites["resid_1"]) == 2 == runner.n_layers


def load_sites(model):
    from feature_circuits.model.sites import build_sites

    return build_sites(model, attn_z=True)


def test_load_model_default_dtype_runner(tmp_path):
    save_model(tiny_llama(seed=2), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert resumable(loaded) is not None


def test_row_chunks():
    from feature_circuits.attribution.exact import row_chunks

    assert row_chunks(9, 4) == [(0, 4), (4, 8), (8, 9)]
    assert row_chunks(9, 128) == [(0, 9)]
    assert row_chunks(0, 4) == []


def test_resumed_forward_runs_only_the_tokens_a_patch_can_change(loaded64):
    """A chunk of patches at mixed positions is packed: each layer after the site runs
    sum(s - p_i) tokens (not n * (s - min p)), and the result still equals the full forward."""
    name, loaded, _ = loaded64
    runner = resumable(loaded)
    assert runner is not None
    ids = _ids()
    clean = runner.clean(ids)
    site = loaded.site("mlp_0")
    rows, pos = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 7, 4, 8])
    seen: list[int] = []
    layer = runner.layers[-1]
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[:-1].numel())))
    try:
        vec = torch.randn(4, site.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        got = runner.patched_logits(clean, site, rows, pos, vec)
    finally:
        handle.remove()
    assert seen == [int((ids.shape[1] - pos).sum())], name
    add = torch.zeros(4, ids.shape[1], site.d_model, dtype=torch.float64)
    add[torch.arange(4), pos] = vec
    torch.testing.assert_close(got, _hooked_forward(loaded, site, ids[rows], add), atol=1e-10, rtol=0)
