"""A model split over devices with ``load_model(device_map=...)`` (accelerate) gives the same node and
edge effects as the single-device load.

On a CPU-only machine the split that can really be exercised is accelerate's offload: modules mapped
to ``"disk"`` keep their weights on the meta device and are run through accelerate's
``AlignDevicesHook`` (``offload=True``), which loads each weight from disk for the forward and drops
it after; nnsight 0.8 runs that hook around its own module handoff. The tests check that this path
is really taken (meta parameters, offload hooks, weights read from the checkpoint on every forward)
and that atp and relp (whose LRP rules replace module classes before nnsight wraps) give the effects
of the normal load in float64. The CUDA tests (a GPU plus CPU offload; two GPUs) are skipped where
torch sees no GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from feature_circuits import cli
from feature_circuits.attribution import (
    edge_effects,
    install_lrp,
    load_for_attribution,
    node_effects,
)
from feature_circuits.circuit import load_circuit
from feature_circuits.dictionaries import load_dictionaries
from feature_circuits.errors import ConfigError, ModelLoadError
from feature_circuits.model import load_model
from feature_circuits.model.loading import DEVICE_MAP_STRATEGIES, LoadedModel
from feature_circuits.pipeline import DEVICE_MAP_STRATEGIES as PIPELINE_STRATEGIES
from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig, parse_device_map
from tests.helpers import patch_batch, save_model, save_random_saes, tiny_gpt_neox, tiny_llama

N_LAYERS = 3
#: the tiny GPT-NeoX split by hand: embedding and layer 0 in memory, the rest offloaded to disk
NEOX_MAP = {
    "gpt_neox.embed_in": "cpu",
    "gpt_neox.rotary_emb": "cpu",
    "gpt_neox.layers.0": "cpu",
    "gpt_neox.layers.1": "disk",
    "gpt_neox.layers.2": "disk",
    "gpt_neox.final_layer_norm": "cpu",
    "lm_head": "disk",
}
# float64 on one CPU either way: the same kernels run on the same weights (measured: difference 0)
RTOL, ATOL = 1e-10, 1e-12


def _make(arch: str):
    return (tiny_gpt_neox if arch == "neox" else tiny_llama)(num_hidden_layers=N_LAYERS)


@pytest.fixture(scope="module", params=["neox", "llama"])
def arch_dirs(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(f"dm_{request.param}")
    model_dir = save_model(_make(request.param), root / "model")
    saes = save_random_saes(_make(request.param), root / "saes") / "tiny"
    return request.param, model_dir, saes


def _device_map(arch: str, model_dir: Path) -> dict[str, object]:
    """neox: the explicit map; llama: ``auto`` with a CPU budget of 60% of the weights (accelerate
    puts what does not fit on disk)."""
    if arch == "neox":
        return {"device_map": NEOX_MAP}
    weights = load_file(str(model_dir / "model.safetensors"))
    nbytes = sum(t.numel() for t in weights.values()) * 8  # float64
    return {"device_map": "auto", "max_memory": {"cpu": int(0.6 * nbytes)}}


def _load_split(model_dir: Path, saes: Path, offload: Path, **placement) -> tuple[LoadedModel, dict]:
    loaded = load_model(
        model_dir, dtype=torch.float64, before_wrap=install_lrp, offload_folder=offload, **placement
    )
    dicts = load_dictionaries(loaded.sites, saes, device=loaded.device, dtype=loaded.dtype, model=loaded)
    return loaded, dicts


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


def _assert_same_effects(
    ref, ref_dicts, split, split_dicts, methods=("atp", "relp"), rtol: float = RTOL, atol: float = ATOL
) -> dict:
    """Node and edge effects of each method on both loads; returns {method: (max |node diff|, max |edge
    diff|, the split model's node effects)} after asserting they are close."""
    batch = patch_batch()
    measured = {}
    for method in methods:
        n_ref = node_effects(ref, ref_dicts, batch, method)
        n_split = node_effects(split, split_dicts, batch, method)
        assert set(n_ref.effects) == set(n_split.effects) == {s.name for s in ref.sites}
        node_diff = 0.0
        for k, v in n_ref.effects.items():
            torch.testing.assert_close(n_split.effects[k].cpu(), v, rtol=rtol, atol=atol)
            node_diff = max(node_diff, (n_split.effects[k].cpu() - v).abs().max().item())
        e_ref = edge_effects(ref, ref_dicts, batch, n_ref, node_threshold=1e-3)
        e_split = edge_effects(split, split_dicts, batch, n_split, node_threshold=1e-3)
        assert set(e_ref.edges) == set(e_split.edges)
        assert any(_dense(t).abs().sum() > 0 for k, t in e_ref.edges.items() if k[1] != "logit")
        edge_diff = 0.0
        for k, v in e_ref.edges.items():
            a, b = _dense(v), _dense(e_split.edges[k]).cpu()
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
            edge_diff = max(edge_diff, (b - a).abs().max().item() if a.numel() else 0.0)
        measured[method] = (node_diff, edge_diff, n_split)
    return measured


def test_disk_offload_matches_single_device(arch_dirs, tmp_path):
    arch, model_dir, saes = arch_dirs
    ref, ref_dicts = load_for_attribution(model_dir, saes, "cpu", torch.float64)
    placement = _device_map(arch, model_dir)
    split, split_dicts = _load_split(model_dir, saes, tmp_path / "offload", **placement)

    # the split is real: some modules on disk, their weights on meta, run through offload hooks
    assert split.device_map is not None and {"cpu", "disk"} <= set(split.device_map.values())
    assert ref.device_map is None and not ref.site_devices
    meta = [n for n, p in split.hf_model.named_parameters() if p.device.type == "meta"]
    assert meta and len(meta) < len(list(split.hf_model.parameters()))
    offloaded = [m for m in split.hf_model.modules() if getattr(m.__dict__.get("_hf_hook"), "offload", False)]
    assert offloaded
    assert not any(p.requires_grad for p in split.hf_model.parameters())
    # every site's activation is on the CPU (offloaded modules execute there), and so is its dictionary
    assert split.device == torch.device("cpu")
    assert set(split.site_devices) == {s.name for s in split.all_sites}
    for site in split.sites:
        assert split.site_device(site.name) == torch.device("cpu")
        ae = split_dicts[site.name]
        assert all(p.device == split.site_device(site.name) for p in ae.parameters())

    measured = _assert_same_effects(ref, ref_dicts, split, split_dicts)
    # the LRP rules act through accelerate's hooks: relp is not atp on the split model
    atp, relp = measured["atp"][2], measured["relp"][2]
    assert any(not torch.allclose(atp.effects[k], relp.effects[k]) for k in atp.effects)
    print(
        f"{arch} {placement}: "
        + ", ".join(f"{m} nodes {v[0]:.1e} edges {v[1]:.1e}" for m, v in measured.items())
    )
    # still where accelerate put it after the traces (the offload hooks put weights back on meta)
    assert [n for n, p in split.hf_model.named_parameters() if p.device.type == "meta"] == meta


def test_offloaded_weights_are_read_from_disk_on_every_forward(tmp_path):
    """Changing the checkpoint after loading changes the split model's effects (its disk modules read
    their weights at each forward) but not the in-memory model's: the equality above is not two
    in-memory copies agreeing."""
    model_dir = save_model(_make("neox"), tmp_path / "model")
    saes = save_random_saes(_make("neox"), tmp_path / "saes") / "tiny"
    split, split_dicts = _load_split(model_dir, saes, tmp_path / "offload", device_map=NEOX_MAP)
    ref, ref_dicts = load_for_attribution(model_dir, saes, "cpu", torch.float64)
    batch = patch_batch()
    before = node_effects(split, split_dicts, batch, "atp").effects
    ref_before = node_effects(ref, ref_dicts, batch, "atp").effects

    ckpt = model_dir / "model.safetensors"
    weights = load_file(str(ckpt))
    name = "gpt_neox.layers.2.mlp.dense_4h_to_h.weight"
    assert split.hf_model.get_parameter(name).device.type == "meta"
    weights[name] = 3.0 * weights[name]
    save_file(weights, str(ckpt), metadata={"format": "pt"})

    after = node_effects(split, split_dicts, batch, "atp").effects
    ref_after = node_effects(ref, ref_dicts, batch, "atp").effects
    assert any(not torch.allclose(before[k], after[k]) for k in before)
    for k in ref_before:
        torch.testing.assert_close(ref_after[k], ref_before[k], rtol=0, atol=0)


def test_auto_that_fits_is_the_single_device_load(tmp_path):
    """``device_map="auto"`` on a CPU-only machine, nothing offloaded: the whole model on the CPU."""
    model_dir = save_model(_make("neox"), tmp_path / "model")
    saes = save_random_saes(_make("neox"), tmp_path / "saes") / "tiny"
    split = load_model(model_dir, dtype=torch.float64, device_map="auto")
    assert split.device_map == {"": "cpu"} and split.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in split.hf_model.parameters())
    ref = load_model(model_dir, dtype=torch.float64, device="cpu")
    dicts = load_dictionaries(split.sites, saes, device=split.device, dtype=split.dtype, model=split)
    ref_dicts = load_dictionaries(ref.sites, saes, device=ref.device, dtype=ref.dtype, model=ref)
    _assert_same_effects(ref, ref_dicts, split, dicts, methods=("atp",))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_map": "fastest"}, "unknown device_map 'fastest'"),
        ({"device_map": {}}, "non-empty mapping"),
        ({"device_map": {"": "gpu7"}}, "device_map['']"),
        ({"device_map": {"": 1.5}}, "not a device"),
        ({"device_map": {"gpt_neox": "cuda:7"}}, "CUDA device(s)"),
        ({"device_map": {"": "disk"}}, "pass offload_folder"),
        ({"device_map": "auto", "device": "cpu"}, "either device"),
        ({"offload_folder": "x"}, "need a device_map"),
        ({"max_memory": {"cpu": 1000}}, "need a device_map"),
    ],
)
def test_device_map_errors(neox_dir, kwargs, message):
    with pytest.raises(ModelLoadError) as err:
        load_model(neox_dir, **kwargs)
    assert message in str(err.value)


def test_device_map_a_module_that_does_not_exist(neox_dir, tmp_path):
    """What accelerate refuses (a map that leaves parameters out) is one ModelLoadError line."""
    with pytest.raises(ModelLoadError, match="could not load model") as err:
        load_model(
            neox_dir,
            device_map={"gpt_neox.embed_in": "cpu", "gpt_neox.layers": "disk"},
            offload_folder=tmp_path,
        )
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ config and command line


def test_parse_device_map(tmp_path):
    assert PIPELINE_STRATEGIES == DEVICE_MAP_STRATEGIES
    assert parse_device_map(" auto ") == "auto"
    assert parse_device_map('{"": "cpu", "lm_head": 0}') == {"": "cpu", "lm_head": 0}
    f = tmp_path / "map.json"
    f.write_text(json.dumps(NEOX_MAP))
    assert parse_device_map(str(f)) == NEOX_MAP
    bad = [
        ("fastest", "must be one of"),
        ("{not json", "not valid JSON"),
        ('{"": true}', "a device is a GPU index or a string"),
        ('{"": [0]}', "a device is a GPU index or a string"),
        ("{}", "non-empty JSON object"),
    ]
    for text, message in bad:
        with pytest.raises(ConfigError, match="--device-map") as err:
            parse_device_map(text)
        assert message in str(err.value)
    f.write_text('["cpu"]')
    with pytest.raises(ConfigError, match="non-empty JSON object"):
        parse_device_map(str(f))
    f.write_text('{"a": ')
    with pytest.raises(ConfigError, match=rf"{f}:1: not valid JSON"):
        parse_device_map(str(f))
    # the configs parse (a JSON text becomes its object) and refuse an offload folder alone
    assert DiscoverConfig(device_map='{"": "cpu"}').device_map == {"": "cpu"}
    assert EvaluateConfig(circuits=("c.json",), device_map="sequential").device_map == "sequential"
    with pytest.raises(ConfigError, match="--offload-folder needs --device-map"):
        DiscoverConfig(offload_folder=str(tmp_path))


def test_cli_device_map_errors_and_help(neox_dir, neox_saes, tmp_path, capsys):
    assert cli.main(["discover", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--device-map" in out and "--offload-folder" in out
    base = ["discover", "--quiet", "--model", str(neox_dir), "--saes", str(neox_saes), "--out", str(tmp_path)]
    assert cli.main([*base, "--device-map", "{bad"]) == 2
    assert "--device-map: not valid JSON" in capsys.readouterr().err
    assert cli.main([*base, "--device-map", '{"": "cuda:9"}']) == 2
    assert "CUDA device(s)" in capsys.readouterr().err.strip().splitlines()[-1]


def _pairs(n: int) -> list[dict[str, str]]:
    return [
        {
            "clean_prefix": f"the w{1 + i} w{2 + 3 * i} and w{2 + i}",
            "patch_prefix": f"a w{1 + i} w{5 + 3 * i} and w{2 + i}",
            "clean_answer": " is",
            "patch_answer": " are",
        }
        for i in range(n)
    ]


def test_cli_discover_and_evaluate_with_disk_offload(tmp_path, capsys):
    """``discover`` / ``evaluate`` with ``--device-map FILE --offload-folder DIR`` write the circuit and
    the scores of the single-device runs."""
    model_dir = save_model(_make("neox"), tmp_path / "model")
    saes = save_random_saes(_make("neox"), tmp_path / "saes") / "tiny"
    data = tmp_path / "tiny_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(4)))
    (tmp_path / "tiny_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(8)[4:]))
    dmap = tmp_path / "map.json"
    dmap.write_text(json.dumps(NEOX_MAP))
    split_args = ["--device-map", str(dmap), "--offload-folder", str(tmp_path / "offload")]
    common = ["--model", str(model_dir), "--saes", str(saes), "--dataset", str(data), "--num-examples", "4"]
    common += [
        "--batch-size",
        "2",
        "--method",
        "relp",
        "--node-threshold",
        "0.01",
        "--edge-threshold",
        "0.001",
    ]
    common += ["--no-html", "--context-top-k", "0", "--no-progress", "--quiet", "--dtype", "float64"]
    circuits = {}
    for name, extra in (("single", []), ("split", split_args)):
        assert cli.main(["discover", *common, "--out", str(tmp_path / name), *extra]) == 0, (
            capsys.readouterr()
        )
        circuits[name] = json.loads((tmp_path / name / "circuit.json").read_text())
        load_circuit(tmp_path / name / "circuit.json")  # schema-valid
    a, b = circuits["single"], circuits["split"]
    assert a["nodes"] and any(e for e in a["edges"])
    assert [n["id"] for n in a["nodes"]] == [n["id"] for n in b["nodes"]]
    for x, y in zip(a["nodes"], b["nodes"], strict=True):
        assert y["effect"] == pytest.approx(x["effect"], rel=1e-9, abs=1e-12)
    assert [(e["source"], e["target"]) for e in a["edges"]] == [
        (e["source"], e["target"]) for e in b["edges"]
    ]
    for x, y in zip(a["edges"], b["edges"], strict=True):
        assert y["weight"] == pytest.approx(x["weight"], rel=1e-9, abs=1e-12)

    scores = {}
    for name, extra in (("single", []), ("split", split_args)):
        argv = ["evaluate", "--circuit", str(tmp_path / name / "circuit.json"), "--thresholds", "0.01,0.1"]
        argv += ["--bootstrap", "0", "--baseline-draws", "0", "--no-scores", "--quiet", "--no-progress"]
        assert cli.main([*argv, *extra]) == 0, capsys.readouterr()
        scores[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert scores["split"]["faithfulness"] == pytest.approx(
        scores["single"]["faithfulness"], rel=1e-6, abs=1e-9
    )
    assert scores["split"]["completeness"] == pytest.approx(
        scores["single"]["completeness"], rel=1e-6, abs=1e-9
    )


# ------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
# the CPU reference against CUDA kernels, float64 (as tests/attribution/test_cuda.py)
CUDA_RTOL, CUDA_ATOL = 1e-7, 1e-9


@pytest.mark.gpu
@cuda
def test_cuda_with_cpu_offload_matches_cpu(tmp_path):
    """Layers 1-2 mapped to "cpu" next to a GPU: accelerate keeps their weights in CPU memory and runs
    them on cuda:0 (its main device), so every site is on cuda:0."""
    model_dir = save_model(_make("neox"), tmp_path / "model")
    saes = save_random_saes(_make("neox"), tmp_path / "saes") / "tiny"
    dmap = {k: ("cpu" if v == "disk" else 0) for k, v in NEOX_MAP.items()}
    ref, ref_dicts = load_for_attribution(model_dir, saes, "cpu", torch.float64)
    split, dicts = _load_split(model_dir, saes, tmp_path / "offload", device_map=dmap)
    assert split.device == torch.device("cuda:0")
    assert {d.type for d in split.site_devices.values()} == {"cuda"}
    assert any(p.device.type == "meta" for p in split.hf_model.parameters())
    _assert_same_effects(ref, ref_dicts, split, dicts, rtol=CUDA_RTOL, atol=CUDA_ATOL)


@pytest.mark.gpu
@two_gpus
def test_two_gpu_split_matches_cpu(tmp_path):
    """Embedding and layer 0 on cuda:0, the rest on cuda:1: the dictionaries follow their sites."""
    model_dir = save_model(_make("neox"), tmp_path / "model")
    saes = save_random_saes(_make("neox"), tmp_path / "saes") / "tiny"
    dmap = {k: (1 if v == "disk" else 0) for k, v in NEOX_MAP.items()}
    ref, ref_dicts = load_for_attribution(model_dir, saes, "cpu", torch.float64)
    split, dicts = _load_split(model_dir, saes, tmp_path / "offload", device_map=dmap)
    assert split.site_device("embed") == torch.device("cuda:0")
    assert split.site_device("resid_2") == torch.device("cuda:1")
    for name, ae in dicts.items():
        assert all(p.device == split.site_device(name) for p in ae.parameters())
    _assert_same_effects(ref, ref_dicts, split, dicts, rtol=CUDA_RTOL, atol=CUDA_ATOL)
