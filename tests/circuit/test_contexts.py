"""Feature contexts (feature_circuits.circuit.contexts): every node's mean activation on clean and
patch inputs and its top activating contexts equal a brute-force reference (all activations
computed and sorted) on a tiny random model; top-k order; the --contexts file and its errors."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from feature_circuits.attribution import load_for_attribution
from feature_circuits.circuit import Circuit
from feature_circuits.circuit.contexts import read_contexts_file, record_activations
from feature_circuits.circuit.schema import Context, Node, circuit_from_dict, circuit_to_dict
from feature_circuits.data import Batch
from feature_circuits.errors import DatasetError, DatasetNotFoundError
from feature_circuits.model.sites import get_activation, save
from feature_circuits.types import Aggregation, Method
from tests.helpers import VOCAB

K, BEFORE, AFTER = 3, 2, 1


@pytest.fixture(scope="module")
def model(neox_dir, neox_saes):
    return load_for_attribution(str(neox_dir), str(neox_saes), device="cpu")


def _batches(seed: int = 0, n_batches: int = 3, rows: int = 3, length: int = 6) -> list[Batch]:
    """Random word ids (no special tokens); patch = clean with position 2 changed; one clean row
    repeats an earlier one (a prompt that several pairs share)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        clean = torch.randint(4, len(VOCAB), (rows, length), generator=g)
        if i == 1:
            clean[0] = out[0].clean[1]
        patch = clean.clone()
        patch[:, 2] = torch.randint(4, len(VOCAB), (rows,), generator=g)
        answers = torch.tensor([8] * rows)
        out.append(Batch(clean=clean, patch=patch, clean_answer=answers, patch_answer=answers + 1, pairs=()))
    return out


def _circuit(nodes: list[Node], aggregation: Aggregation = Aggregation.SUM) -> Circuit:
    return Circuit(
        model="tiny",
        saes="tiny",
        method=Method.ATP,
        dataset="d",
        split="train",
        num_examples=9,
        aggregation=aggregation,
        node_threshold=0.0,
        edge_threshold=0.0,
        total_effect=1.0,
        nodes=tuple(nodes),
        edges=(),
    )


NODES = [
    Node.feature_node("embed", 3, 0.5),
    Node.feature_node("resid_0", 0, 0.4),
    Node.feature_node("resid_0", 17, -0.3),
    Node.error_node("resid_0", 0.2),
    Node.feature_node("mlp_1", 5, 0.1),
    Node.error_node("attn_1", 0.1),
    Node.feature_node("resid_1", 63, 0.2),
]


def _all_activations(loaded, dicts, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """(rows, s, F+1) per site: every feature and the error norm, from a plain forward."""
    acts = {}
    with torch.no_grad(), loaded.lm.trace(ids):
        for s in loaded.sites:
            acts[s.name] = save(get_activation(loaded.lm, s))
    out = {}
    for name, x in acts.items():
        f = dicts[name].encode(x)
        err = x - dicts[name].decode(f)
        out[name] = torch.cat([f, err.norm(dim=-1, keepdim=True)], dim=-1)
    return out


def _reference(loaded, dicts, batches, docs: Sequence[list[int]] = ()):
    """Per node: (mean clean, mean patch, {source: [(activation, seq, pos), ...] sorted, top K})."""
    clean_sum: dict[str, torch.Tensor] = {}
    patch_sum: dict[str, torch.Tensor] = {}
    count = 0
    candidates: dict[str, list] = {n.id: [] for n in NODES}
    seen: set[tuple[int, ...]] = set()
    for batch in batches:
        for side, ids in (("clean", batch.clean), ("patch", batch.patch)):
            acts = _all_activations(loaded, dicts, ids)
            for name, a in acts.items():
                sums = clean_sum if side == "clean" else patch_sum
                sums[name] = sums.get(name, 0) + a.sum((0, 1))
            for r, row in enumerate(ids.tolist()):
                if tuple(row) in seen:
                    continue
                seen.add(tuple(row))
                for node in NODES:
                    j = dicts[node.site].dict_size if node.feature is None else node.feature
                    for pos in range(len(row)):
                        v = float(acts[node.site][r, pos, j])
                        if v > 0:
                            candidates[node.id].append((v, "discovery", tuple(row), pos))
        count += batch.clean.numel()
    for doc in docs:  # each document alone, no padding
        acts = _all_activations(loaded, dicts, torch.tensor([doc]))
        for node in NODES:
            j = dicts[node.site].dict_size if node.feature is None else node.feature
            for pos in range(len(doc)):
                v = float(acts[node.site][0, pos, j])
                if v > 0:
                    candidates[node.id].append((v, "contexts", tuple(doc), pos))
    ref = {}
    for node in NODES:
        j = dicts[node.site].dict_size if node.feature is None else node.feature
        top = []
        for source in ("discovery", "contexts"):
            mine = sorted((c for c in candidates[node.id] if c[1] == source), key=lambda c: -c[0])
            top += mine[:K]
        top.sort(key=lambda c: -c[0])
        ref[node.id] = (
            float(clean_sum[node.site][j]) / count,
            float(patch_sum[node.site][j]) / count,
            top,
            candidates[node.id],
        )
    return ref


def _window(tokenizer, row: tuple[int, ...], pos: int) -> tuple[tuple[str, ...], int]:
    start = max(0, pos - BEFORE)
    return tuple(tokenizer.decode([i]) for i in row[start : pos + AFTER + 1]), pos - start


def _check_against_reference(circuit, ref, tokenizer):
    for node in circuit.nodes:
        mean_clean, mean_patch, top, candidates = ref[node.id]
        act = node.activation
        assert act is not None, node.id
        assert act.mean_clean == pytest.approx(mean_clean, rel=1e-4, abs=1e-6)
        assert act.mean_patch == pytest.approx(mean_patch, rel=1e-4, abs=1e-6)
        assert [c.activation for c in act.contexts] == pytest.approx([t[0] for t in top], rel=1e-4)
        for ctx, (_, source, _, _) in zip(act.contexts, top, strict=True):
            assert ctx.source == source
            # the window of a place with this activation (equal values: any of them, e.g. two
            # prompts that share their first tokens have the same activations there)
            places = {
                _window(tokenizer, row, pos)
                for value, src, row, pos in candidates
                if src == source and math.isclose(value, ctx.activation, rel_tol=1e-5)
            }
            assert (ctx.tokens, ctx.index) in places, node.id


def test_contexts_equal_the_brute_force_reference(model):
    loaded, dicts = model
    batches = _batches()
    circuit = record_activations(
        _circuit(NODES), loaded, dicts, batches, top_k=K, before=BEFORE, after=AFTER, enabled=False
    )
    _check_against_reference(circuit, _reference(loaded, dicts, batches), loaded.tokenizer)
    assert "contexts" in circuit.timing_s and circuit.timing_s["contexts"] >= 0
    for node in circuit.nodes:  # top-k order, at most K per source, only where the node fires
        assert node.activation is not None
        values = [c.activation for c in node.activation.contexts]
        assert values == sorted(values, reverse=True) and all(v > 0 for v in values)
        assert sum(c.source == "discovery" for c in node.activation.contexts) <= K
    err = next(n for n in circuit.nodes if n.id == "resid_0/err")
    assert err.activation is not None and err.activation.mean_clean > 0 and len(err.activation.contexts) == K


def test_the_shared_prompt_is_one_candidate(model):
    """A prompt that two pairs share is one context candidate: no two contexts are the same place
    (windows as long as the prompts, so equal windows would be the same prompt and position)."""
    loaded, dicts = model
    batches = _batches()
    circuit = record_activations(
        _circuit(NODES), loaded, dicts, batches, top_k=8, before=8, after=8, enabled=False
    )
    for node in circuit.nodes:
        assert node.activation is not None
        places = [(c.tokens, c.index, c.activation) for c in node.activation.contexts]
        assert len(places) == len(set(places)), node.id


def test_contexts_file_documents_are_searched_too(model, tmp_path):
    loaded, dicts = model
    batches = _batches(n_batches=1)
    words = VOCAB[4:]
    docs_words = [words[0:9], words[5:8], words[20:40]]
    path = tmp_path / "extra.txt"
    path.write_text("\n".join(" ".join(d) for d in docs_words) + "\n\n")
    docs = [loaded.tokenizer(" ".join(d), add_special_tokens=False)["input_ids"] for d in docs_words]
    circuit = record_activations(
        _circuit(NODES),
        loaded,
        dicts,
        batches,
        top_k=K,
        before=BEFORE,
        after=AFTER,
        contexts=path,
        batch_size=2,
        enabled=False,
    )
    _check_against_reference(circuit, _reference(loaded, dicts, batches, docs), loaded.tokenizer)
    sources = {c.source for n in circuit.nodes for c in (n.activation.contexts if n.activation else ())}
    assert sources == {"discovery", "contexts"}


def test_aggregation_none_means_at_the_node_position(model):
    loaded, dicts = model
    batches = _batches(n_batches=2)
    nodes = [Node.feature_node("resid_0", 0, 0.4, position=p) for p in (1, 4)] + [
        Node.error_node("resid_0", 0.2, position=3)
    ]
    circuit = record_activations(
        _circuit(nodes, Aggregation.NONE),
        loaded,
        dicts,
        batches,
        top_k=K,
        before=BEFORE,
        after=AFTER,
        enabled=False,
    )
    clean = torch.cat([b.clean for b in batches])
    patch = torch.cat([b.patch for b in batches])
    a_clean = _all_activations(loaded, dicts, clean)["resid_0"]
    a_patch = _all_activations(loaded, dicts, patch)["resid_0"]
    for node in circuit.nodes:
        j = dicts["resid_0"].dict_size if node.feature is None else node.feature
        assert node.activation is not None and node.position is not None
        assert node.activation.mean_clean == pytest.approx(
            float(a_clean[:, node.position, j].mean()), rel=1e-4
        )
        assert node.activation.mean_patch == pytest.approx(
            float(a_patch[:, node.position, j].mean()), rel=1e-4
        )
    a, b = circuit.nodes[0].activation, circuit.nodes[1].activation
    assert a is not None and b is not None and a.contexts == b.contexts  # the feature at any position


def test_top_k_zero_and_empty_circuit_are_unchanged(model):
    loaded, dicts = model
    circuit = _circuit(NODES)
    assert record_activations(circuit, loaded, dicts, _batches(), top_k=0, enabled=False) is circuit
    empty = _circuit([])
    assert record_activations(empty, loaded, dicts, _batches(), enabled=False) is empty


def test_raw_text_round_trips(model):
    """Contexts are stored as the tokenizer decodes them; escaping is the page's job."""
    loaded, dicts = model
    circuit = record_activations(
        _circuit(NODES[:2]), loaded, dicts, _batches(n_batches=1), top_k=2, enabled=False
    )
    node = circuit.nodes[0]
    assert node.activation is not None and node.activation.contexts
    first = node.activation.contexts[0]
    ctx = Context(
        tokens=("<script>alert(1)</script>", "&amp;"), index=1, activation=first.activation, source="contexts"
    )
    act = node.activation.model_copy(update={"contexts": (ctx, *node.activation.contexts[1:])})
    edited = circuit.model_copy(
        update={"nodes": (node.model_copy(update={"activation": act}), circuit.nodes[1])}
    )
    again = circuit_from_dict(json.loads(json.dumps(circuit_to_dict(edited))))
    assert again.nodes[0].activation is not None
    assert again.nodes[0].activation.contexts[0].tokens == ("<script>alert(1)</script>", "&amp;")
    assert again.nodes[0].activation == act


# --------------------------------------------------------------------------------------------------
# The --contexts file


def _write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_read_plain_text_and_jsonl(tmp_path):
    txt = _write(tmp_path, "a.txt", "first doc\n\n  \nsecond <b>doc</b>\r\n")
    assert read_contexts_file(txt) == ["first doc", "second <b>doc</b>"]
    jl = _write(tmp_path, "a.jsonl", '{"text": "one", "id": 1}\n\n{"text": "two & three"}\n')
    assert read_contexts_file(jl) == ["one", "two & three"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("b.jsonl", '{"text": "ok"}\n{"txt": "x"}\n', r"b\.jsonl:2: missing key \"text\" \(keys: txt\)"),
        ("b.jsonl", '{"text": "ok"}\n\n{"text": 3}\n', r"b\.jsonl:3: \"text\" must be a string, got int"),
        ("b.jsonl", '["text"]\n', r"b\.jsonl:1: expected a JSON object"),
        ("b.jsonl", '{"text": "ok"}\n{"text": \n', r"b\.jsonl:2: invalid JSON"),
        ("b.txt", b"fine\n\xff\xfe\n", r"b\.txt:2: not valid UTF-8"),
        ("b.txt", "\n \n", r"b\.txt:1: no documents"),
    ],
)
def test_contexts_file_errors_name_file_and_line(tmp_path, name, content, match):
    with pytest.raises(DatasetError, match=match):
        read_contexts_file(_write(tmp_path, name, content))


def test_missing_contexts_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--contexts: file not found"):
        read_contexts_file(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------------------------
# In discover()


def test_discover_records_contexts_for_every_node(tmp_path, neox_dir, neox_saes):
    from feature_circuits.circuit import load_circuit
    from feature_circuits.errors import ConfigError
    from feature_circuits.pipeline import DiscoverConfig, discover

    rows = [
        {"clean_prefix": f"the w{i} and w{i + 1}", "patch_prefix": f"the w{i + 2} and w{i + 1}"}
        | {"clean_answer": " is", "patch_answer": " are"}
        for i in range(6)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = _write(tmp_path, "extra.jsonl", '{"text": "then w7 and w9 is w3"}\n{"text": "a w1 to w2"}\n')
    common = {"model": str(neox_dir), "saes": str(neox_saes), "dataset": str(data), "progress": False}
    cfg = DiscoverConfig(
        **common,
        num_examples=6,
        batch_size=4,
        node_threshold=1e-3,
        nodes_only=True,
        method=Method.ATP,
        contexts=str(extra),
        context_top_k=2,
        out=str(tmp_path / "out"),
    )
    circuit = discover(cfg)
    assert circuit.nodes and all(n.activation is not None for n in circuit.nodes)
    assert {c.source for n in circuit.nodes for c in (n.activation.contexts if n.activation else ())} == {
        "discovery",
        "contexts",
    }
    assert all(
        sum(c.source == "contexts" for c in n.activation.contexts) <= 2 for n in circuit.nodes if n.activation
    )
    stored = load_circuit(tmp_path / "out" / "circuit.json")
    assert stored.nodes == circuit.nodes and "contexts" in stored.timing_s
    # a malformed --contexts file fails when the config is made, before any forward
    bad = _write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: missing key"):
        DiscoverConfig(**common, contexts=str(bad))
    with pytest.raises(ConfigError, match="--context-top-k must be >= 0"):
        DiscoverConfig(**common, context_top_k=-1)


def test_ranks_merged_equal_one_process(model, tmp_path):
    """Data parallel: two "ranks" each see half of the batches and half of the contexts file's
    chunks (``shard``), their tallies are merged (``merge``, as ``DataParallel.merge`` does in rank
    order), and the contexts equal one process over everything -- including a prompt both ranks
    saw, which is one candidate, not two."""
    from feature_circuits.circuit.contexts import ContextTally

    loaded, dicts = model
    batches = _batches(n_batches=4)
    batches.append(batches[0])  # rank 0 gets batches 0, 2, 4 (= 0 again), rank 1 gets 1 and 3
    words = VOCAB[4:]
    path = tmp_path / "extra.txt"
    path.write_text("\n".join(" ".join(words[i : i + 7]) for i in range(0, 40, 5)) + "\n")
    kw = {"top_k": K, "before": BEFORE, "after": AFTER, "contexts": path, "batch_size": 1, "enabled": False}
    one = record_activations(_circuit(NODES), loaded, dicts, batches, **kw)

    tallies: dict[int, ContextTally] = {}

    def shard_of(rank: int):
        return lambda items: list(items[rank::2])

    def keep(rank: int):
        def merge(t: ContextTally) -> ContextTally:
            tallies[rank] = t
            if rank == 0:
                return t
            total = tallies[0]
            total.merge(t)
            return total

        return merge

    # rank 0 first (its merge just keeps its tally), then rank 1's merge adds it to rank 0's
    record_activations(_circuit(NODES), loaded, dicts, batches[0::2], shard=shard_of(0), merge=keep(0), **kw)
    two = record_activations(
        _circuit(NODES), loaded, dicts, batches[1::2], shard=shard_of(1), merge=keep(1), **kw
    )

    def view(c):
        out = {}
        for n in c.nodes:
            a = n.activation
            ctx = sorted((c.tokens, c.index, round(c.activation, 5), c.source) for c in a.contexts)
            out[n.id] = (round(a.mean_clean, 5), round(a.mean_patch, 5), ctx)
        return out

    v1, v2 = view(one), view(two)
    assert sum(len(x[2]) for x in v1.values()) > 0
    assert {s for x in v1.values() for *_, s in x[2]} == {"discovery", "contexts"}
    assert v1 == v2
