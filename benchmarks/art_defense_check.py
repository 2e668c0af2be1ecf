"""The same attacks through ART (APuDAE as an ART defense) and through the engine's suite.

    python benchmarks/art_defense_check.py [--limit 64] [--steps 10] [--out DIR]

On the first ``--limit`` Fashion-MNIST test images with the bundled ``fmnist`` models:

1. ART's loss gradient through :class:`PurificationDefense` against the engine's
   ``eot_gradient`` (exact through the loop, BPDA identity, BPDA DAE; 2 EOT draws): the largest
   difference relative to the gradient's largest entry.
2. L-inf eps 0.1 PGD with the identity BPDA (``bpda``, 1 draw per step) and with the exact
   gradient (``pgd-eot``, a third of the steps) crafted both ways, with the same step size
   rule and a random start; each scored on the deployed adaptive purifier (seed 0) and the
   classifier. Writes results.json and results.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.host import describe
from apudae_engine.evaluation.art_defense import PurificationDefense, defended_classifier
from apudae_engine.evaluation.attacks import AttackSpec, run_attack
from apudae_engine.evaluation.attacks.aware import eot_gradient
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/eval/fmnist-art-defense")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    purifier = Purifier.from_pretrained(
        "fmnist", PurifyConfig(seed=0, defaults="method"))  # the records' seed and settings
    classifier = load_classifier("fmnist").model
    data = load_dataset("fashion-mnist", "test", None, (1, 28, 28)).subset(a.limit)
    x, y = data.images.float() / 255, data.labels
    k = int(classifier(x[:1]).shape[1])

    def accuracy(images: torch.Tensor) -> float:
        with torch.no_grad():
            return (classifier(purifier(images)).argmax(1) == y).float().mean().item()

    gradients = {}
    for mode in ("full", "bpda", "bpda-dae"):
        xs, ys = x[:16], y[:16]
        defense = PurificationDefense(purifier, gradient=mode, eot_samples=2, seed=3)
        est = defended_classifier(classifier, defense, (1, 28, 28), k,
                                  loss=torch.nn.CrossEntropyLoss(reduction="sum"))
        art_grad = torch.from_numpy(est.loss_gradient(
            xs.numpy(), torch.nn.functional.one_hot(ys, k).float().numpy())) / 2
        ours = eot_gradient(mode, classifier, purifier, xs, ys, defense.seeds_for_call(0))
        gradients[mode] = {"images": 16, "eot": 2, "max_relative_difference": (
            (art_grad - ours).abs().max() / ours.abs().max()).item()}

    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    attacks = {}
    for name, mode, steps in (("bpda", "bpda", a.steps), ("pgd-eot", "full", max(a.steps // 3, 1))):
        t0 = time.perf_counter()
        ours = run_attack(AttackSpec(name, eps=a.eps, steps=steps, eot=1), classifier, x, y,
                          purifier=purifier).images
        t_ours = time.perf_counter() - t0
        defense = PurificationDefense(purifier, gradient=mode, eot_samples=1, seed=11)
        pgd = ProjectedGradientDescentPyTorch(
            defended_classifier(classifier, defense, (1, 28, 28), k), eps=a.eps,
            eps_step=2.5 * a.eps / steps, max_iter=steps, num_random_init=1,
            batch_size=len(x), verbose=False)
        np.random.seed(0)
        t0 = time.perf_counter()
        through_art = torch.from_numpy(pgd.generate(x.numpy(), y.numpy()))
        t_art = time.perf_counter() - t0
        attacks[name] = {"steps": steps, "eot": 1, "eps": a.eps,
                         "suite": {"accuracy": accuracy(ours), "seconds": round(t_ours, 1)},
                         "art": {"accuracy": accuracy(through_art), "seconds": round(t_art, 1),
                                 "linf_max": (through_art - x).abs().max().item()}}
    results = {"command": f"python benchmarks/art_defense_check.py --limit {a.limit} "
                          f"--steps {a.steps} --eps {a.eps} --threads {a.threads}",
               "data": data.source, "n": len(x), "clean_accuracy": accuracy(x),
               "gradients": gradients, "attacks": attacks,
               "wall_seconds": round(time.perf_counter() - t_start, 1),
               "hardware": describe("cpu", packages=("art",))}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    n = len(x)
    se = lambda p: 100 * (p * (1 - p) / n) ** 0.5  # noqa: E731
    lines = [f"# APuDAE as an ART defense: ART vs the engine's suite, {data.source}", "",
             f"Command: `{results['command']}` ({results['wall_seconds']:.0f} s, "
             f"{results['hardware']['cpu']}, {a.threads} torch thread(s), "
             f"ART {results['hardware'].get('art')}).  ",
             f"Scored on the adaptive purifier (seed 0) + classifier; clean accuracy "
             f"{100 * results['clean_accuracy']:.2f} % on these {n} images.", "",
             "| gradient (16 images, EOT 2) | max abs difference / max abs gradient |",
             "|---|---|"]
    lines += [f"| {m} | {g['max_relative_difference']:.2e} |" for m, g in gradients.items()]
    lines += ["", f"| attack (L∞ {a.eps}) | steps | suite accuracy (%) | through ART (%) | "
              "one standard error (pp) |", "|---|---|---|---|---|"]
    for name, r in attacks.items():
        p = r["suite"]["accuracy"]
        lines.append(f"| {name} | {r['steps']} | {100 * p:.2f} | "
                     f"{100 * r['art']['accuracy']:.2f} | {se(p):.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
