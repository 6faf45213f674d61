"""Benchmark: exact patching with resumed forwards against full re-runs, in one run
(docs/algorithms.md, "Resuming from the patched site").

Exact component patching (``experiments.compare.component_exact``: every ``attn_l`` / ``mlp_l`` /
``resid_l`` output at every position, clean -> patch) on a random model of a given shape, once with
full re-runs and once resumed; the two sets of effects are compared (max |difference|) and the
speedup is the ratio of the two times measured in the same process. Each example's patch input
differs from its clean input at one random position; the positions before it have a zero delta at
every component and are not run in either mode (their effect is exactly 0).

    python -m experiments.bench_exact                   # 30 layers, d_model 256, GPT-NeoX
    python -m experiments.bench_exact --family llama --layers 30 --d-model 256 --json out.json

:func:`bench_exact_components` returns the numbers as a dict (``experiments.benchmark`` calls it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("gpt_neox", "llama")


def _tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def random_model(
    family: str, *, n_layers: int, d_model: int, n_heads: int, vocab_size: int, seed: int
) -> Any:
    """A random causal LM of the given shape (GPT-NeoX with parallel residual, or Llama)."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "intermediate_size": 4 * d_model,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    if family == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        neox: dict[str, Any] = {"rotary_pct": 0.25, "use_parallel_residual": True}
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, **neox)).eval()
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=max(1, n_heads // 2))).eval()
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def bench_exact_components(
    *,
    family: str = "gpt_neox",
    n_layers: int = 30,
    d_model: int = 256,
    n_heads: int = 4,
    vocab_size: int = 512,
    n_examples: int = 4,
    seq_len: int = 16,
    max_rows: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, Any]:
    """Time exact component patching on a random ``family`` model of ``n_layers`` x ``d_model``:
    full re-runs, then resumed forwards (the runner's one-time probe check is done before the
    clock starts). Returns times, the speedup and the max |difference| of the effects."""
    from experiments.compare import component_exact, component_sites
    from feature_circuits.data import Batch
    from feature_circuits.model.loading import load_model
    from feature_circuits.model.resume import resumable

    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(
            family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab_size=vocab_size, seed=seed
        )
        model.save_pretrained(tmp)
        _tokenizer(vocab_size).save_pretrained(tmp)
        del model
        loaded = load_model(tmp, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, vocab_size, (n_examples, seq_len), generator=gen)
    patch = clean.clone()
    cols = torch.randint(0, seq_len, (n_examples,), generator=gen)
    patch[torch.arange(n_examples), cols] = torch.randint(2, vocab_size, (n_examples,), generator=gen)
    answers = torch.randint(2, vocab_size, (2, n_examples), generator=gen)
    dev = loaded.device
    batch = Batch(
        clean=clean.to(dev),
        patch=patch.to(dev),
        clean_answer=answers[0].to(dev),
        patch_answer=answers[1].to(dev),
        pairs=(),
    )
    sites = component_sites(loaded)
    if resumable(loaded) is None:
        raise RuntimeError(f"the resumable runner does not support this {family} model")
    # warm-up (one site each way): lazy initialisation and nnsight's first compile out of the timing
    component_exact(loaded, batch, sites[:1], max_rows=max_rows, resume=False, progress=False)
    component_exact(loaded, batch, sites[:1], max_rows=max_rows, resume=True, progress=False)

    def timed(resume: bool) -> tuple[float, dict[str, torch.Tensor]]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = component_exact(loaded, batch, sites, max_rows=max_rows, resume=resume, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, out

    t_full, full = timed(False)
    t_resumed, resumed = timed(True)
    diff = max(float((full[k] - resumed[k]).abs().max()) for k in full)
    scale = max(float(full[k].abs().max()) for k in full)
    return {
        "family": family,
        "n_layers": n_layers,
        "d_model": d_model,
        "n_examples": n_examples,
        "seq_len": seq_len,
        "device": str(dev),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "patches": len(sites) * n_examples * seq_len,
        # positions before an example's changed token have a zero delta: not run (exactly 0) in
        # either mode, so both run these
        "patches_run": len(sites) * int((seq_len - cols).sum()),
        "full_rerun_s": round(t_full, 3),
        "resumed_s": round(t_resumed, 3),
        "speedup": round(t_full / t_resumed, 2),
        "max_abs_diff": diff,
        "max_abs_effect": scale,
    }


def markdown_row(r: dict[str, Any]) -> str:
    return (
        f"| exact components, {r['family']} {r['n_layers']}x{r['d_model']}, {r['n_examples']}x{r['seq_len']} "
        f"tokens, {r['device']} | {r['patches']} ({r.get('patches_run', r['patches'])} run) | "
        f"{r['full_rerun_s']:.2f} s | {r['resumed_s']:.2f} s | "
        f"{r['speedup']:.2f}x | {r['max_abs_diff']:.2g} |"
    )


MARKDOWN_HEAD = (
    "| case | patches | full re-runs | resumed | speedup | max abs diff |\n|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_exact",
        description="Exact component patching: resumed forwards vs full re-runs on a random model.",
    )
    p.add_argument("--family", choices=FAMILIES, default="gpt_neox")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--max-rows", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    r = bench_exact_components(
        family=args.family,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        vocab_size=args.vocab,
        n_examples=args.examples,
        seq_len=args.seq_len,
        max_rows=args.max_rows,
        device=args.device,
        dtype=args.dtype,
    )
    print(MARKDOWN_HEAD)
    print(markdown_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
