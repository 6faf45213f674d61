"""Data-parallel discovery (feature_circuits/distributed.py): sharding by index, merging the
streaming accumulators, and ``torchrun --nproc-per-node 2`` (gloo, 2 CPU processes on 127.0.0.1)
writing the same circuit as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from feature_circuits.circuit import EdgeAccumulator, NodeAccumulator
from feature_circuits.distributed import DataParallel, init_from_env, is_main_process
from feature_circuits.pipeline import DiscoverConfig, discover
from tests.helpers import node_batch

ROOT = Path(__file__).resolve().parents[1]


def _dp(rank: int, world: int) -> DataParallel:
    return DataParallel(rank=rank, world_size=world, local_rank=rank, backend="gloo")


def test_shard_by_index_is_a_partition():
    items = list(range(11))
    shards = [_dp(r, 3).shard(items) for r in range(3)]
    assert shards[0] == [0, 3, 6, 9] and shards[2] == [2, 5, 8]
    assert sorted(x for s in shards for x in s) == items
    assert _dp(4, 5).shard([1, 2]) == []  # more ranks than examples: an empty shard


def test_single_process_env_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert init_from_env("cpu") is None and is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


def test_device_for_rank():
    assert _dp(1, 2).device_for("cuda") == "cuda:1"
    assert _dp(1, 2).device_for("cpu") == "cpu"


def test_merged_accumulators_equal_one_accumulator():
    gen = torch.Generator().manual_seed(0)
    batches = [node_batch({"resid_0": torch.randn(b, 3, 5, generator=gen)}) for b in (2, 3, 1, 4)]
    whole = NodeAccumulator("sum")
    for b in batches:
        whole.add(b)
    parts = [NodeAccumulator("sum") for _ in range(3)]
    for i, b in enumerate(batches):
        parts[i % 3].add(b)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    a, m = whole.result(), merged.result()
    assert m.num_examples == a.num_examples == 10
    torch.testing.assert_close(m.effects["resid_0"], a.effects["resid_0"])
    assert m.total_effect == pytest.approx(a.total_effect)
    empty = NodeAccumulator("sum")
    empty.merge(parts[1])  # a rank with no examples merges into the others
    assert empty.num_examples == parts[1].num_examples
    with pytest.raises(Exception, match="aggregation"):
        NodeAccumulator("none").merge(parts[0])
    edges = EdgeAccumulator("sum")
    edges.merge(EdgeAccumulator("sum"))
    assert edges.result() == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_discover(options: dict[str, Any], out: Path, *flags: str) -> subprocess.CompletedProcess:
    """``discover`` with ``options`` (and ``flags``) in 2 torchrun CPU processes, writing to ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "-m",
        "feature_circuits",
        "discover",
        *(f"--{k.replace('_', '-')}={v}" for k, v in options.items()),
        *flags,
        "--no-progress",
        "--no-html",
        f"--out={out}",
    ]
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)


def _graph(path: Path):
    c = json.loads(path.read_text())
    nodes = [(n["id"], round(n["effect"], 5)) for n in c["nodes"]]
    edges = [(e["source"], e["target"], round(e["weight"], 5)) for e in c["edges"]]
    return nodes, edges, c["num_examples"]


def _contexts(path: Path):
    """Per node: mean activations (5 decimals) and its top contexts (tokens, index, activation)."""
    out = {}
    for n in json.loads(path.read_text())["nodes"]:
        a = n["activation"]
        ctx = sorted((tuple(c["tokens"]), c["index"], round(c["activation"], 4)) for c in a["contexts"])
        out[n["id"]] = (round(a["mean_clean"], 5), round(a["mean_patch"], 5), ctx)
    return out


@pytest.fixture(scope="module")
def dp_data(tmp_path_factory) -> Path:
    # two token lengths, 9 examples: the ranks get different batch layouts (5 and 4 examples)
    rows = [
        {
            "clean_prefix": f"the w{i} and w{i + 1}" + (" w3" if i % 3 == 0 else ""),
            "patch_prefix": f"the w{i + 2} and w{i + 1}" + (" w3" if i % 3 == 0 else ""),
            "clean_answer": " is",
            "patch_answer": " are",
        }
        for i in range(9)
    ]
    path = tmp_path_factory.mktemp("dp") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_torchrun_two_processes_same_circuit(tmp_path, neox_dir, neox_saes, dp_data):
    common: dict[str, Any] = dict(
        method="relp",
        model=str(neox_dir),
        saes=str(neox_saes),
        dataset=str(dp_data),
        num_examples=9,
        batch_size=2,
        node_threshold=1e-3,
        edge_threshold=1e-5,
        seed=1,
    )
    discover(DiscoverConfig(**common, progress=False, html=False, out=str(tmp_path / "one")))
    res = _torchrun_discover(common, tmp_path / "two")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 of 2 (gloo)" in res.stderr
    assert res.stdout.count("wrote ") == 1  # only rank 0 reports (and writes)
    one, two = _graph(tmp_path / "one" / "circuit.json"), _graph(tmp_path / "two" / "circuit.json")
    assert one[2] == two[2] == 9
    assert one[0] and one[1], "the test circuit should have nodes and edges"
    assert one == two
    # contexts come from every rank's shard (merged), not from rank 0's only
    c1, c2 = _contexts(tmp_path / "one" / "circuit.json"), _contexts(tmp_path / "two" / "circuit.json")
    assert sum(len(v[2]) for v in c1.values()) > 0
    assert c1.keys() == c2.keys()
    for k, (mc, mp, ctx) in c1.items():
        mc2, mp2, ctx2 = c2[k]
        assert (mc, mp) == (mc2, mp2), k
        # the same top activations; which of several equal ones is kept is a tie (e.g. position 0,
        # the same token in every prompt), so places are compared above the last kept value only
        assert sorted(c[2] for c in ctx) == sorted(c[2] for c in ctx2), k
        if ctx:
            last = min(c[2] for c in ctx)
            assert {c for c in ctx if c[2] > last} == {c for c in ctx2 if c[2] > last}, k


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_torchrun_tensor_parallel_same_circuit(tmp_path, family, neox_dir, neox_saes, llama_dir, dp_data):
    """``discover --tensor-parallel`` under torchrun with 2 CPU processes: the weights are sharded
    (transformers tensor parallelism, gloo), every rank runs every example, rank 0 writes; nodes,
    edges and every effect equal one process's (float64)."""
    from safetensors.torch import load_file

    from tests.helpers import save_random_saes, tiny_llama

    model, saes = (
        (neox_dir, neox_saes)
        if family == "neox"
        else (llama_dir, save_random_saes(tiny_llama(), tmp_path / "saes"))
    )
    common: dict[str, Any] = dict(
        method="relp",
        model=str(model),
        saes=str(saes),
        dataset=str(dp_data),
        num_examples=9,
        batch_size=3,
        node_threshold=1e-3,
        edge_threshold=1e-5,
        dtype="float64",
    )
    discover(DiscoverConfig(**common, progress=False, html=False, out=str(tmp_path / "one")))
    res = _torchrun_discover(common, tmp_path / "tp", "--tensor-parallel")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tensor parallel: rank 0 of 2 (gloo)" in res.stderr
    assert res.stdout.count("wrote ") == 1
    one, tp = _graph(tmp_path / "one" / "circuit.json"), _graph(tmp_path / "tp" / "circuit.json")
    assert one[2] == tp[2] == 9 and one[0] and one[1]
    assert one == tp
    a, b = (
        load_file(tmp_path / "one" / "effects.safetensors"),
        load_file(tmp_path / "tp" / "effects.safetensors"),
    )
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-12, rtol=1e-9, msg=k)


def test_tensor_parallel_needs_torchrun(neox_dir, neox_saes, dp_data, monkeypatch):
    from feature_circuits.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = DiscoverConfig(
        model=str(neox_dir), saes=str(neox_saes), dataset=str(dp_data), tensor_parallel=True, html=False
    )
    with pytest.raises(ConfigError, match="torchrun"):
        discover(cfg)
