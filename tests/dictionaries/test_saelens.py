"""SAELens SAEs through sae_lens itself (feature_circuits.dictionaries.saelens): SAEs of every
sae_lens architecture built with sae_lens's own classes and saved with its own save methods, loaded
through the ``--saes`` dispatcher; the splice is exact, every method runs (exact and atp against
hand computations), edges equal the per-node loop, discover + evaluate run end to end with the
Neuronpedia id in circuit.json; what the splice cannot do exactly is refused naming the SAE."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="the saelens extra (make install installs it)")

from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from feature_circuits.attribution import (  # noqa: E402
    edge_effects,
    load_for_attribution,
    method_spec,
    node_effects,
)
from feature_circuits.attribution.edges import site_pairs  # noqa: E402
from feature_circuits.circuit import load_circuit  # noqa: E402
from feature_circuits.dictionaries import (  # noqa: E402
    SAELensDictionary,
    dictionary_infos,
    encode_with_error,
    load_dictionaries,
)
from feature_circuits.errors import DictionaryError  # noqa: E402
from feature_circuits.model.hooks import hook_for_site  # noqa: E402
from feature_circuits.model.sites import get_activation, save, set_activation  # noqa: E402
from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig, discover, evaluate  # noqa: E402
from feature_circuits.types import Method  # noqa: E402
from tests.attribution.test_edges import _loop_edges  # noqa: E402
from tests.helpers import CLEAN, save_model, tiny_gpt_neox, tiny_llama  # noqa: E402
from tests.helpers import patch_batch as _batch  # noqa: E402
from tests.test_pipeline import tiny_data  # noqa: E402, F401 (the pairs file fixture, shared)

ARCHS = ("standard", "jumprelu", "topk", "gated", "batchtopk")
D_SAE = 48
NEURONPEDIA_ID = "tiny-neox/1-res-test"


def make_sae(arch: str, hook: str, d_in: int, seed: int, **meta: object):
    """A random SAE of ``arch`` from sae_lens's own config and classes (BatchTopK: the training
    class, saved as sae_lens saves it for inference)."""
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook, model_name="tiny", **meta)
    if arch == "batchtopk":
        cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=D_SAE, k=6, metadata=metadata)
        sae = sae_lens.BatchTopKTrainingSAE(cfg)
    else:
        classes = {
            "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
            "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
            "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6}),
            "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
        }
        sae_cls, cfg_cls, extra = classes[arch]
        sae = sae_cls(cfg_cls(d_in=d_in, d_sae=D_SAE, metadata=metadata, **extra))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.05))
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.05)
    if arch == "batchtopk":
        sae.topk_threshold = torch.tensor(0.02, dtype=torch.double)
    return sae


def save_sae(sae, arch: str, path: Path) -> Path:
    (sae.save_inference_model if arch == "batchtopk" else sae.save_model)(path)
    return path


def save_sae_set(model, root: Path, arch: str, attn_z: bool = False, neuronpedia: str | None = None) -> Path:
    """One SAE per default site of ``model`` (and per ``attn_z_L`` with ``attn_z``), each in its own
    sae_lens directory under ``root``; ``resid_1`` gets the Neuronpedia id ``neuronpedia``."""
    from feature_circuits.model.sites import build_sites

    sites = build_sites(model, attn_z=attn_z)
    for i, site in enumerate(sites):
        meta = {"neuronpedia_id": neuronpedia} if neuronpedia and site.name == "resid_1" else {}
        hook = hook_for_site(site.name, "gpt_neox")
        save_sae(make_sae(arch, hook, site.d_model, seed=i, **meta), arch, root / site.name)
    return root


@pytest.fixture(scope="module")
def neox_model_dir(tmp_path_factory) -> Path:
    return save_model(tiny_gpt_neox(), tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="module")
def sae_sets(tmp_path_factory) -> dict[str, Path]:
    """Every architecture's SAE set for the tiny GPT-NeoX (attn_z sites included)."""
    model = tiny_gpt_neox()
    root = tmp_path_factory.mktemp("saelens")
    return {a: save_sae_set(model, root / a, a, attn_z=True, neuronpedia=NEURONPEDIA_ID) for a in ARCHS}


def _default_sites(sae_dir: Path, tmp: Path) -> Path:
    """The same SAEs without the attn_z ones (the default sites only)."""
    out = tmp / f"{sae_dir.name}_default"
    for p in sae_dir.iterdir():
        if not p.name.startswith("attn_z"):
            shutil.copytree(p, out / p.name)
    return out


def _logits(loaded, ids, dicts=None, sites=()):
    dicts = dicts or {}
    with loaded.lm.trace(ids):
        for site in sites:
            x = get_activation(loaded.lm, site)
            f, err = encode_with_error(dicts[site.name], x)
            set_activation(loaded.lm, site, dicts[site.name].decode(f) + err)
        out = save(loaded.lm.output.logits)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_splice_exact_every_architecture(arch, sae_sets, neox_model_dir):
    """decode(f) + err in place of every site (attn_z included) leaves the logits unchanged,
    while the SAE itself is a real, lossy reconstruction (features fire, the error is non-zero)."""
    loaded, dicts = load_for_attribution(neox_model_dir, str(sae_sets[arch]), "cpu", torch.float32)
    assert set(dicts) == {"embed", *(f"{k}_{i}" for k in ("attn", "attn_z", "mlp", "resid") for i in (0, 1))}
    assert all(isinstance(d, SAELensDictionary) and d.dict_size == D_SAE for d in dicts.values())
    want_arch = "jumprelu" if arch == "batchtopk" else arch  # sae_lens saves BatchTopK as JumpReLU
    infos = dictionary_infos(dicts)
    assert {i.architecture for i in infos.values()} == {want_arch}
    assert infos["attn_z_1"].hook_name == "blocks.1.attn.hook_z" and infos["resid_1"].kind == "saelens"
    assert infos["resid_1"].neuronpedia == NEURONPEDIA_ID and infos["resid_0"].neuronpedia is None
    ids = loaded.tokenizer(["the w1 w2 and w3", "a w4 w5 to w6"], return_tensors="pt").input_ids
    base = _logits(loaded, ids)
    spliced = _logits(loaded, ids, dicts, loaded.spliced_sites(dicts))
    assert float((spliced - base).abs().max()) <= 1e-5
    # attn_z_1 is the flattened (b, s, H*dh) o-projection input, and the SAE is lossy there
    z = loaded.site("attn_z_1")
    got = {}
    with loaded.lm.trace(ids):
        got["x"] = save(get_activation(loaded.lm, z))
    x = got["x"]
    f, e = encode_with_error(dicts["attn_z_1"], x)
    assert x.shape[-1] == z.d_model == 32 and (f != 0).any() and e.abs().max() > 1e-3


def test_splice_exact_llama(tmp_path):
    model = tiny_llama()
    d = save_model(model, tmp_path / "m")
    saes = save_sae_set(model, tmp_path / "s", "jumprelu", attn_z=True)
    loaded, dicts = load_for_attribution(d, str(saes), "cpu", torch.float32)
    ids = loaded.tokenizer(["the w1 w2 and w3"], return_tensors="pt").input_ids
    diff = _logits(loaded, ids, dicts, loaded.spliced_sites(dicts)) - _logits(loaded, ids)
    assert "attn_z_1" in dicts and float(diff.abs().max()) <= 1e-5


@pytest.fixture(scope="module")
def jumprelu64(sae_sets, neox_model_dir, tmp_path_factory):
    src = _default_sites(sae_sets["jumprelu"], tmp_path_factory.mktemp("d"))
    return load_for_attribution(neox_model_dir, str(src), "cpu", torch.float64)


def test_every_method_and_hand_references(jumprelu64):
    """atp, relp, ig and exact run on SAELens SAEs; exact equals a manual patch of one feature, atp
    equals gradient times delta computed by hand through the splice."""
    loaded, dicts = jumprelu64
    batch = _batch()
    effects = {
        m: node_effects(loaded, dicts, batch, m, options=method_spec(m).options_from({"steps": 3}))
        for m in ("atp", "relp", "ig", "exact")
    }
    for m, ne in effects.items():
        assert ne.effects["resid_1"].shape == (2, 5, D_SAE + 1), m
        assert ne.effects["mlp_0"].abs().max() > 0, m
    # exact: patch one feature of mlp_0 by hand
    ex = effects["exact"]
    d = ex.deltas["mlp_0"]
    e, p, j = (d.f != 0).nonzero()[0].tolist()
    f1 = ex.clean["mlp_0"].f.clone()
    f1[e, p, j] += d.f[e, p, j]
    site = loaded.site("mlp_0")
    out = {}
    with loaded.lm.trace(CLEAN):
        set_activation(loaded.lm, site, dicts["mlp_0"].decode(f1) + ex.clean["mlp_0"].err)
        out["logits"] = save(loaded.lm.output.logits)
    lg = out["logits"][:, -1]
    m = lg[[0, 1], [9, 8]] - lg[[0, 1], [8, 9]]
    assert torch.allclose(ex.effects["mlp_0"][e, p, j], m[e] - ex.metric_clean[e], atol=1e-10)
    # atp at resid_0: d metric / d f (through the decoder, the rest of the model unspliced) times
    # f(patch) - f(clean)
    ae, site = dicts["resid_0"], loaded.site("resid_0")
    with loaded.lm.trace(batch.patch):
        out["x_patch"] = save(get_activation(loaded.lm, site))
    with loaded.lm.trace(batch.clean):
        out["x_clean"] = save(get_activation(loaded.lm, site))
    x_patch, x_clean = out["x_patch"], out["x_clean"]
    fc, errc = encode_with_error(ae, x_clean)
    fc = fc.detach().requires_grad_(True)
    with loaded.lm.trace(batch.clean):
        set_activation(loaded.lm, site, ae.decode(fc) + errc.detach())
        out["logits"] = save(loaded.lm.output.logits)
    lg = out["logits"][:, -1]
    metric = lg[[0, 1], [9, 8]] - lg[[0, 1], [8, 9]]
    (g,) = torch.autograd.grad(metric.sum(), [fc])
    hand = g * (ae.encode(x_patch) - fc.detach())
    assert torch.allclose(effects["atp"].effects["resid_0"][..., :D_SAE], hand, atol=1e-10)


@pytest.mark.parametrize("arch", ["topk"])
def test_edges_equal_per_node_loop(arch, sae_sets, neox_model_dir, tmp_path):
    src = _default_sites(sae_sets[arch], tmp_path)
    loaded, dicts = load_for_attribution(neox_model_dir, str(src), "cpu", torch.float64)
    batch = _batch()
    nodes = node_effects(loaded, dicts, batch, "atp")
    threshold = 5e-2
    res = edge_effects(loaded, dicts, batch, nodes, node_threshold=threshold, chunk_size=5)
    n_checked = 0
    for pair in site_pairs(loaded):
        ref, n_sel = _loop_edges(loaded, dicts, batch, nodes, pair, threshold, None)
        n_checked += n_sel
        assert torch.allclose(res.edges[(pair.up, pair.down)].to_dense(), ref, atol=1e-12, rtol=1e-9), pair
    assert n_checked >= 10


def test_discover_evaluate_end_to_end_with_neuronpedia(sae_sets, neox_model_dir, tiny_data, tmp_path):  # noqa: F811 (the imported fixture)
    src = _default_sites(sae_sets["topk"], tmp_path)
    circuit = discover(
        DiscoverConfig(
            method=Method.RELP,
            model=str(neox_model_dir),
            saes=str(src),
            dataset=str(tiny_data),
            num_examples=6,
            batch_size=3,
            node_threshold=1e-4,
            edge_threshold=1e-6,
            progress=False,
            out=str(tmp_path / "c"),
        )
    )
    stored = load_circuit(tmp_path / "c" / "circuit.json")
    assert stored.nodes and stored.edges
    info = stored.dictionaries["resid_1"]
    assert (info.kind, info.architecture, info.n_features) == ("saelens", "topk", D_SAE)
    assert info.neuronpedia == NEURONPEDIA_ID and info.hook_name == "blocks.1.hook_resid_post"
    assert set(stored.dictionaries) == {"embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1"}
    assert stored.sites_without_dictionary == () and circuit.dictionaries == stored.dictionaries
    node = next(n for n in stored.nodes if n.site == "resid_1" and n.feature is not None)
    assert stored.neuronpedia_url(node) == f"https://www.neuronpedia.org/{NEURONPEDIA_ID}/{node.feature}"
    other = next(n for n in stored.nodes if n.site != "resid_1" and n.feature is not None)
    assert stored.neuronpedia_url(other) is None
    html = (tmp_path / "c" / "circuit.html").read_text()
    assert f"https://www.neuronpedia.org/{NEURONPEDIA_ID}/" in html
    results = evaluate(
        EvaluateConfig(
            circuits=(str(tmp_path / "c"),),
            split="train",
            allow_discovery_split=True,
            num_examples=6,
            thresholds=(0.0, 1e6),
            progress=False,
        )
    )
    assert len(results) == 1 and results[0].n_nodes[0] > 0 and results[0].n_nodes[-1] == 0
    # partial coverage: SAEs at resid_0, resid_1 and attn_z_1 only; the other sites are not spliced
    part = tmp_path / "partial"
    for name in ("resid_0", "resid_1", "attn_z_1"):
        shutil.copytree(sae_sets["topk"] / name, part / name)
    partial = discover(
        DiscoverConfig(
            method=Method.ATP,
            model=str(neox_model_dir),
            saes=str(part),
            dataset=str(tiny_data),
            num_examples=3,
            nodes_only=True,
            node_threshold=1e-4,
            progress=False,
            out=None,
        )
    )
    assert set(partial.dictionaries) == {"resid_0", "resid_1", "attn_z_1"}
    assert partial.sites_without_dictionary == ("embed", "attn_0", "mlp_0", "attn_1", "mlp_1")
    assert {n.site for n in partial.nodes} <= {"resid_0", "resid_1", "attn_z_1"}


def test_registry_release_through_the_hf_cache(tmp_path, monkeypatch):
    """``--saes saelens:pythia-70m-deduped-res-sm`` loads through sae_lens's ``SAE.from_pretrained``
    and the Hugging Face cache (here a local cache holding tiny SAEs at the release's paths, hub
    offline): sites from the hooks, Neuronpedia ids from the registry, the splice exact; a model of
    another name is refused, and an SAE missing from the cache is a clear error."""
    import huggingface_hub.constants as hf

    from feature_circuits.dictionaries.registry import get_release

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    release = get_release("pythia-70m-deduped-res-sm")
    repo = tmp_path / "hub" / ("models--" + release.repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for i, ref in enumerate(release.saes):
        assert ref.hook_name is not None
        make_sae("jumprelu", ref.hook_name, 32, seed=i).save_model(repo / "snapshots" / ("0" * 40) / ref.path)
    model = tiny_gpt_neox(num_hidden_layers=6)
    d = save_model(model, tmp_path / "pythia-70m-deduped")
    loaded, dicts = load_for_attribution(d, "saelens:pythia-70m-deduped-res-sm", "cpu", torch.float32)
    assert list(dicts) == ["embed", *(f"resid_{i}" for i in range(6))]
    info = dictionary_infos(dicts)["resid_3"]
    assert info.source == "pythia-70m-deduped-res-sm/blocks.3.hook_resid_post"
    assert info.neuronpedia == "pythia-70m-deduped/3-res-sm" and info.architecture == "jumprelu"
    ids = loaded.tokenizer(["the w1 w2 and w3"], return_tensors="pt").input_ids
    diff = _logits(loaded, ids, dicts, loaded.spliced_sites(dicts)) - _logits(loaded, ids)
    assert float(diff.abs().max()) <= 1e-5
    other = save_model(model, tmp_path / "other-model")
    with pytest.raises(DictionaryError, match="trained on model 'pythia-70m-deduped'"):
        load_for_attribution(other, "saelens:pythia-70m-deduped-res-sm", "cpu", torch.float32)
    with pytest.raises(DictionaryError, match=r"att-sm/blocks\.1\.hook_attn_out: cannot load it.*cache"):
        load_dictionaries(
            loaded.sites, "saelens:pythia-70m-deduped-att-sm/blocks.1.hook_attn_out", model=loaded
        )


def test_marks_release_neuronpedia_ids(tmp_path, monkeypatch):
    """``--saes marks`` (the Marks et al. Pythia-70M release) with a Pythia-70M model: every
    attn/mlp/resid site gets its P70D-SM Neuronpedia id; the embedding none."""
    from feature_circuits.model import load_model
    from tests.helpers import save_random_saes

    monkeypatch.setenv("FEATURE_CIRCUITS_SAES", str(tmp_path / "saes"))
    save_random_saes(tiny_gpt_neox(), tmp_path / "saes", model_dir="pythia-70m-deduped", dict_id="10_32768")
    model = load_model(save_model(tiny_gpt_neox(), tmp_path / "pythia-70m-deduped"), device="cpu")
    infos = dictionary_infos(load_dictionaries(model.sites, "marks", model=model))
    assert infos["resid_1"].neuronpedia == "pythia-70m-deduped/1-res-sm"
    assert infos["attn_0"].neuronpedia == "pythia-70m-deduped/0-att-sm"
    assert infos["mlp_1"].neuronpedia == "pythia-70m-deduped/1-mlp-sm"
    assert infos["embed"].neuronpedia is None and infos["embed"].kind == "marks"


def test_marks_and_identity_infos(neox, neox_saes):
    marks = dictionary_infos(load_dictionaries(neox.sites, neox_saes / "tiny", model=neox))
    assert marks["resid_0"].kind == "marks" and marks["resid_0"].neuronpedia is None  # not the real release
    ident = dictionary_infos(load_dictionaries(neox.sites, "neurons"))
    assert ident["mlp_1"].kind == "identity" and ident["mlp_1"].n_features == 32


# ----------------------------------------------------------------------------------- refusals


def _one(tmp_path: Path, sae, name="bad") -> Path:
    sae.save_model(tmp_path / name)
    return tmp_path / name


def test_refuses_what_the_splice_cannot_do(neox, tmp_path):
    cases = {
        "layer_norm": dict(normalize_activations="layer_norm"),
        "constant_norm_rescale": dict(normalize_activations="constant_norm_rescale"),
        "expected_average_only_in": dict(normalize_activations="expected_average_only_in"),
    }
    for i, (what, kw) in enumerate(cases.items()):
        cfg = sae_lens.StandardSAEConfig(
            d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"), **kw
        )
        path = _one(tmp_path, sae_lens.StandardSAE(cfg), f"n{i}")
        with pytest.raises(DictionaryError, match=f"{path}.*{what}.*cannot be spliced exactly"):
            load_dictionaries(neox.sites, str(path), model=neox)
    head = sae_lens.StandardSAEConfig(
        d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post", hook_head_index=2)
    )
    with pytest.raises(DictionaryError, match="head 2"):
        load_dictionaries(neox.sites, str(_one(tmp_path, sae_lens.StandardSAE(head), "h")), model=neox)
    tc = sae_lens.TranscoderConfig(
        d_in=32,
        d_sae=8,
        d_out=32,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name="blocks.0.hook_mlp_out", hook_name_out="blocks.0.hook_mlp_out"),
    )
    with pytest.raises(DictionaryError, match="transcoder"):
        load_dictionaries(neox.sites, str(_one(tmp_path, sae_lens.Transcoder(tc), "t")), model=neox)
    wide = sae_lens.StandardSAEConfig(
        d_in=16, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_mlp_out")
    )
    with pytest.raises(DictionaryError, match=r"site mlp_0.*d_in 16.*width 32"):
        load_dictionaries(neox.sites, str(_one(tmp_path, sae_lens.StandardSAE(wide), "w")), model=neox)
    mid = sae_lens.StandardSAEConfig(
        d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_mid")
    )
    with pytest.raises(DictionaryError, match=r"hook_resid_mid.*has no site"):
        load_dictionaries(neox.sites, str(_one(tmp_path, sae_lens.StandardSAE(mid), "m")), model=neox)
    with pytest.raises(DictionaryError, match="pass model="):
        load_dictionaries(neox.sites, str(tmp_path / "m"))


def test_two_saes_for_one_site_refused(neox, tmp_path):
    for name in ("a", "b"):
        cfg = sae_lens.StandardSAEConfig(
            d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")
        )
        sae_lens.StandardSAE(cfg).save_model(tmp_path / "set" / name)
    # blocks.1.hook_resid_pre is resid_0, as blocks.0.hook_resid_post would be
    cfg = sae_lens.StandardSAEConfig(
        d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")
    )
    sae_lens.StandardSAE(cfg).save_model(tmp_path / "set2" / "x")
    with pytest.raises(DictionaryError, match="two SAEs for site resid_0"):
        load_dictionaries(neox.sites, str(tmp_path / "set"), model=neox)
    one = load_dictionaries(neox.sites, str(tmp_path / "set2"), model=neox)
    assert list(one) == ["resid_0"]  # partial coverage: only the sites the SAEs were trained on


@pytest.mark.parametrize("rescale", [False, True])
def test_decoder_directions_are_decode_differences(rescale, neox, tmp_path):
    """Row k of decoder_directions is decode(e_k) - decode(0) for every k: the W_dec rows, or the
    unit-norm rows for a TopK SAE that rescales its activations by the decoder norms."""
    cfg = sae_lens.TopKSAEConfig(
        d_in=32,
        d_sae=D_SAE,
        k=4,
        rescale_acts_by_decoder_norm=rescale,
        metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out"),
    )
    torch.manual_seed(3)
    sae = sae_lens.TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)  # rows of unequal norms
        sae.b_dec.normal_()
    sae.save_model(tmp_path / "topk")
    (ae,) = load_dictionaries(neox.sites, str(tmp_path / "topk"), model=neox, dtype=torch.float64).values()
    like = torch.zeros(1, dtype=torch.float64)
    expect = ae.decode(torch.eye(D_SAE, dtype=torch.float64)) - ae.decode(
        torch.zeros(1, D_SAE, dtype=torch.float64)
    )
    assert torch.allclose(ae.decoder_directions(like), expect, atol=1e-12)
    norms = ae.decoder_directions(like).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms)) == rescale
