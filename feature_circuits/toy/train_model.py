"""Train the embedded default model: a 4-layer Pythia-architecture (GPT-NeoX) LM on the project's grammar.

The corpus (feature_circuits/toy/grammar.py) mixes subject-verb agreement sentences in four structures
(simple, across a prepositional phrase, across/within a relative clause), IOI sentences and filler,
and never contains a held-out combination. Loss is next-token cross-entropy over every token, with the
agreeing verbs and the IOI indirect object upweighted (--answer-weight). Deterministic for a --seed
(single-process CPU). At the end the model is evaluated on the held-out test pairs (data splits
*_test, regenerated from the grammar) and saved with the tokenizer to --out, together with
metrics.json (written to the parent of --out: feature_circuits/toy/metrics.json by default).

Tiny run for tests:  --steps 5 --d-model 32 --n-layers 1 --n-heads 2 --d-mlp 64 --eval-n 8
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from feature_circuits.runtime import apply_threads, seed_everything
from feature_circuits.toy import MODEL_DIR as EMBEDDED_MODEL_DIR
from feature_circuits.toy import grammar
from feature_circuits.toy.datasets import build_tokenizer, encode_words, evaluate_pairs


def make_config(tok, args) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=args.d_model,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        intermediate_size=args.d_mlp,
        hidden_act="gelu",
        rope_parameters={"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"},
        max_position_embeddings=64,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        layer_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


def batches(tok, seed: int, batch_size: int, answer_weight: float):
    """Endless stream of (input_ids, loss weights) built from freshly sampled corpus sentences."""
    rng = random.Random(f"train|{seed}")
    pad = tok.pad_token_id
    while True:
        sents = [grammar.corpus_sentence(rng) for _ in range(batch_size)]
        ids = encode_words(tok, [s.text for s in sents])
        n = max(map(len, ids))
        x = torch.full((batch_size, n), pad, dtype=torch.long)
        w = torch.zeros(batch_size, n)
        for i, (s, t) in enumerate(zip(sents, ids, strict=True)):
            x[i, : len(t)] = torch.tensor(t)
            w[i, 1 : len(t)] = 1.0
            for j in s.targets:
                w[i, j] = answer_weight
        yield x, w


def evaluate(model, tok, n: int, seed: int) -> dict:
    out = {}
    for structure, name in grammar.DATASET_NAMES.items():
        out[name] = evaluate_pairs(model, tok, grammar.generate_sva_pairs(structure, n, "test", seed))
    out["ioi"] = evaluate_pairs(model, tok, grammar.generate_ioi_pairs(n, "test", seed))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults: the shipped package directories of :mod:`feature_circuits.toy`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup + cosine)")
    ap.add_argument("--answer-weight", type=float, default=4.0, help="loss weight of agreement/IOI answers")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--eval-n", type=int, default=150, help="held-out pairs per dataset for the final eval")
    ap.add_argument("--out", type=Path, default=EMBEDDED_MODEL_DIR, help="model + tokenizer directory")
    ap.add_argument(
        "--metrics", type=Path, default=None, help="metrics.json path (default: <out>/../metrics.json)"
    )
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    apply_threads(args.threads)
    seed_everything(args.seed)
    tok = build_tokenizer()
    model = GPTNeoXForCausalLM(make_config(tok, args))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warm = max(1, min(200, args.steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.time()
    stream = batches(tok, args.seed, args.batch_size, args.answer_weight)
    bar = tqdm(range(args.steps), desc="train", mininterval=2.0)
    ema = None
    for step in bar:
        x, w = next(stream)
        logits = model(input_ids=x).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        ).view_as(w[:, 1:])
        loss = (ce * w[:, 1:]).sum() / w[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    train_s = time.time() - t0
    model.eval()
    results = evaluate(model, tok, args.eval_n, args.seed)
    for name, r in results.items():
        print(
            f"{name:15s} held-out acc {r['accuracy']:.3f}  mean logit diff {r['mean_logit_diff']:.2f}  "
            f"(patch side acc {r['patch_accuracy']:.3f})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    metrics = {
        "model": {
            "train_seconds": round(train_s, 1),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "answer_weight": args.answer_weight,
            "seed": args.seed,
            "threads": args.threads,
            "n_params": n_params,
            "final_train_loss_ema": ema,
            "heldout": results,
        }
    }
    mpath = args.metrics or args.out.parent / "metrics.json"
    if mpath.exists():  # keep other sections (e.g. the SAEs') when retraining the model
        old = json.loads(mpath.read_text())
        old.update(metrics)
        metrics = old
    mpath.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"trained in {train_s:.0f} s; saved to {args.out}; metrics in {mpath}")
    return metrics


if __name__ == "__main__":
    main()
