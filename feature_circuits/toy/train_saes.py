"""Train an SAE (dictionary_learning AutoEncoder, StandardTrainer) at every site of the embedded model.

Sites: embed (gpt_neox.embed_in output), attn_l (layers[l].attention output[0]), mlp_l (layers[l].mlp
output), resid_l (layers[l] output, a plain tensor in transformers 5). Activations come from sentences
of the training corpus (feature_circuits/toy/grammar.py, never held-out combinations), pad positions
excluded. Each site's activations are divided by a scalar c (root mean squared norm) for training, so one
--l1 works at every site; the scale is folded back into the saved weights (encoder.bias and bias times c),
so the saved AutoEncoder acts on raw activations and its features are c times the normalised ones.

Writes <root>/<model name>/<site dir>/<dict size>/ae.safetensors + config.json per site, and a "saes"
section in metrics.json (FVE, mean L0 on held-out sentences, dead fraction on training tokens).
Tiny run for tests:  --steps 20 --n-sentences 200 --dict-size 64 --out <tmp> --model <tiny model dir>
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from dictionary_learning.trainers import StandardTrainer
from tqdm import tqdm
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from feature_circuits.dictionaries.marks import save_autoencoder
from feature_circuits.model.sites import build_sites, get_submodule
from feature_circuits.runtime import apply_threads, seed_everything
from feature_circuits.toy import METRICS_PATH as EMBEDDED_METRICS_PATH
from feature_circuits.toy import MODEL_DIR as EMBEDDED_MODEL_DIR
from feature_circuits.toy import MODEL_NAME as EMBEDDED_MODEL_NAME
from feature_circuits.toy import SAE_ROOT as EMBEDDED_SAE_ROOT
from feature_circuits.toy import grammar
from feature_circuits.toy.datasets import encode_words, heldout_eval_texts


@torch.no_grad()
def collect_sites(model, tok, texts: list[str], sites, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """{site name: (n_tokens, d) activations} over ``texts`` (no padding positions), one forward pass."""
    ids = encode_words(tok, texts)
    out: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    store: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:

        def hook(_m, _i, o, site=site):
            store[site.name] = o[0] if site.output_is_tuple else o

        handles.append(get_submodule(model, site.module_path).register_forward_hook(hook))
    try:
        for i in range(0, len(ids), batch_size):
            chunk = ids[i : i + batch_size]
            n = max(map(len, chunk))
            x = torch.full((len(chunk), n), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x, dtype=torch.bool)
            for j, s in enumerate(chunk):
                x[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = True
            model(input_ids=x, attention_mask=mask.long())
            for site in sites:
                act = store[site.name]
                assert act.shape[:2] == x.shape, (site.name, act.shape)
                out[site.name].append(act[mask].float())
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def collect(model, tok, texts: list[str], site, batch_size: int = 512) -> torch.Tensor:
    """(n_tokens, d) activations of one ``site`` over ``texts`` (no padding positions)."""
    return collect_sites(model, tok, texts, [site], batch_size)[site.name]


@torch.no_grad()
def sae_stats(ae, x: torch.Tensor) -> dict:
    x_hat, f = ae(x, output_features=True)
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return {"fve": float(fve), "l0": float((f > 0).float().sum(-1).mean()), "alive": (f > 0).any(0)}


def fold_scale(ae, c: float) -> None:
    """Make an AE trained on x / c act on x: features scale by c, reconstructions by c."""
    with torch.no_grad():
        ae.bias.mul_(c)
        ae.encoder.bias.mul_(c)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults: the shipped package directories of :mod:`feature_circuits.toy`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=EMBEDDED_MODEL_DIR, help="model directory")
    ap.add_argument("--out", type=Path, default=EMBEDDED_SAE_ROOT, help="SAE root (Marks layout)")
    ap.add_argument("--model-name", default=EMBEDDED_MODEL_NAME, help="sub-directory under --out")
    ap.add_argument("--dict-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=400, help="trainer steps per site")
    ap.add_argument("--batch-size", type=int, default=512, help="activations per step")
    ap.add_argument("--l1", type=float, default=0.05, help="l1 penalty (on rms-normalised activations)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-sentences", type=int, default=3000, help="training-corpus sentences to collect")
    ap.add_argument("--sites", default=None, help="comma-separated site names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="metrics.json to update (default: <model>/../metrics.json when --model is the default)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    apply_threads(args.threads)
    seed_everything(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = GPTNeoXForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sites = build_sites(model)
    if args.sites:
        keep = set(args.sites.split(","))
        sites = [s for s in sites if s.name in keep]
    corpus = [s.text for s in grammar.generate_corpus(args.n_sentences, seed=10_000 + args.seed)]
    heldout = heldout_eval_texts(seed=0)
    results = {}
    t_all = time.time()
    for site in sites:
        t0 = time.time()
        x = collect(model, tok, corpus, site)
        c = float(x.pow(2).sum(-1).mean().sqrt())
        xn = x / c
        trainer = StandardTrainer(
            steps=args.steps,
            activation_dim=x.shape[1],
            dict_size=args.dict_size,
            layer=max(site.layer, 0),
            lm_name=args.model_name,
            lr=args.lr,
            l1_penalty=args.l1,
            warmup_steps=max(1, args.steps // 20),
            sparsity_warmup_steps=max(1, args.steps // 5) if args.steps > 5 else None,
            resample_steps=None,
            seed=args.seed,
            device="cpu",
            submodule_name=site.module_path,
        )
        g = torch.Generator().manual_seed(args.seed)
        for step in tqdm(range(args.steps), desc=site.name, mininterval=5.0, leave=False):
            idx = torch.randint(0, xn.shape[0], (min(args.batch_size, xn.shape[0]),), generator=g)
            trainer.update(step, xn[idx])
        ae = trainer.ae.eval()
        fold_scale(ae, c)
        train_stats = sae_stats(ae, x)
        test_stats = sae_stats(ae, collect(model, tok, heldout, site))
        dead = 1 - float(train_stats["alive"].float().mean())
        rec = {
            "activation_dim": x.shape[1],
            "dict_size": args.dict_size,
            "site": site.name,
            "module_path": site.module_path,
            "trainer": "dictionary_learning.trainers.StandardTrainer",
            "l1_penalty": args.l1,
            "activation_scale": c,
            "lr": args.lr,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "n_train_tokens": int(x.shape[0]),
            "fve": round(test_stats["fve"], 4),
            "mean_l0": round(test_stats["l0"], 2),
            "train_fve": round(train_stats["fve"], 4),
            "dead_fraction": round(dead, 4),
            "eval_set": "held-out sentences (feature_circuits.toy.datasets.heldout_eval_texts(seed=0))",
            "train_seconds": round(time.time() - t0, 1),
        }
        ddir = args.out / args.model_name / site.marks_dir / str(args.dict_size)
        save_autoencoder(ae, ddir / "ae.safetensors")
        (ddir / "config.json").write_text(json.dumps(rec, indent=2) + "\n")
        results[site.name] = rec
        print(
            f"{site.name:8s} FVE {rec['fve']:.3f}  L0 {rec['mean_l0']:6.1f}  dead {dead:.3f}  "
            f"({rec['train_seconds']:.0f} s)"
        )
    total = time.time() - t_all
    print(f"all sites in {total:.0f} s")
    mpath = args.metrics
    if mpath is None and args.model.resolve() == EMBEDDED_MODEL_DIR.resolve():
        mpath = EMBEDDED_METRICS_PATH
    if mpath is not None:
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        metrics["saes"] = {"total_seconds": round(total, 1), "sites": results}
        mpath.write_text(json.dumps(metrics, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
