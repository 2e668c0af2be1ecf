"""Paired check of the switch from torchattacks 3.5.1 to ART 1.20.1, on the same images.

    python benchmarks/library_switch_check.py --limit 500 --attacks fgsm,rfgsm,pgd,pgd-l2

Crafts each oblivious attack on the first ``--limit`` Fashion-MNIST test images twice: with
torchattacks configured as the engine configured it before the switch (commit a8c11dc), and
with ART through the engine (``run_attack``). Seeds as ``evaluate`` uses them (seed + 7919 *
batch index, batches of ``--batch``). Both are scored on the bare classifier, the direct DAE
and adaptive purification (reference backend, seed 0); per column it reports both accuracies,
the difference, the discordant images (fooled by one library only) and McNemar's exact
two-sided p-value. Needs torchattacks (``pip install --no-deps torchattacks==3.5.1``), which
the engine no longer uses. Writes results.json and results.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.host import describe
from apudae_engine.evaluation.attacks import AttackSpec, project, run_attack
from apudae_engine.evaluation.tables import mcnemar_p
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import purify

SEED_STRIDE = 7919


def torchattacks_attack(spec: AttackSpec, model, num_classes: int):
    """The torchattacks object the engine built for ``spec`` before the switch."""
    import torchattacks as ta

    s, eps, a = spec.steps, spec.eps, spec.step_size
    if spec.name == "fgsm":
        return ta.FGSM(model, eps=eps)
    if spec.name == "rfgsm":
        return ta.RFGSM(model, eps=eps, alpha=eps / 2, steps=1)
    if spec.name == "pgd":
        return ta.PGD(model, eps=eps, alpha=a, steps=s, random_start=True)
    if spec.name == "pgd-l2":
        return ta.PGDL2(model, eps=eps, alpha=a, steps=s, random_start=True)
    if spec.name == "cw-l2":
        return ta.CW(model, c=spec.cw_c, kappa=0, steps=s, lr=0.01)
    if spec.name == "deepfool":
        return ta.DeepFool(model, steps=s, overshoot=0.02)
    common = dict(norm="Linf", eps=eps, seed=spec.seed, n_restarts=1)
    return ta.MultiAttack([
        ta.APGD(model, steps=s, loss="ce", **common),
        ta.APGDT(model, steps=s, n_classes=num_classes, **common),
        ta.FAB(model, steps=s, multi_targeted=True, n_classes=num_classes, **common),
        ta.Square(model, n_queries=spec.square_queries, **common)])


def craft_torchattacks(spec: AttackSpec, model, x, y, num_classes: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        raw = torchattacks_attack(spec, model, num_classes)(x, y).detach()
    if spec.name == "deepfool":  # the engine's overshoot on the total perturbation
        raw = (x + 1.02 * (raw - x)).clamp(0, 1)
    return project(raw, x, spec.norm, spec.eps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--attacks", default="fgsm,rfgsm,pgd,pgd-l2")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/eval/fmnist-500-library-switch")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    base = Purifier.from_pretrained(
        "fmnist", PurifyConfig(seed=0, defaults="method"))  # the records' seed and settings
    defenses = {"none": None, "direct": PurifyConfig(method="direct", seed=0),
                "adaptive": PurifyConfig(seed=0)}
    classifier = load_classifier("fmnist").model
    data = load_dataset("fashion-mnist", "test", None, (1, 28, 28)).subset(a.limit)
    eps = {"Linf": 0.1, "L2": 1.5}
    num_classes = int(classifier(data.images[:1].float() / 255).shape[1])

    @torch.no_grad()
    def correct(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for d, cfg in defenses.items():
            shown = images if cfg is None else purify(base.dae, images, cfg, base.mu,
                                                      base.sigma).images
            out[d] = classifier(shown).argmax(1) == labels
        return out

    results = {}
    for name in a.attacks.split(","):
        per = {"torchattacks": {d: [] for d in defenses}, "art": {d: [] for d in defenses}}
        seconds = {"torchattacks": 0.0, "art": 0.0}
        for b, start in enumerate(range(0, len(data), a.batch)):
            x = data.images[start:start + a.batch].float() / 255
            y = data.labels[start:start + a.batch]
            norm = AttackSpec(name, eps=1.0).norm
            spec = AttackSpec(name, eps=eps[norm], seed=SEED_STRIDE * b)
            t0 = time.perf_counter()
            old = craft_torchattacks(spec, classifier, x, y, num_classes)
            seconds["torchattacks"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            new = run_attack(spec, classifier, x, y).images
            seconds["art"] += time.perf_counter() - t0
            for lib, adv in (("torchattacks", old), ("art", new)):
                for d, v in correct(adv, y).items():
                    per[lib][d].append(v)
        row = {"steps": spec.steps, "norm": spec.norm, "eps": spec.eps,
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "columns": {}}
        for d in defenses:
            old_c, new_c = torch.cat(per["torchattacks"][d]), torch.cat(per["art"][d])
            only_old = int((old_c & ~new_c).sum())  # survived torchattacks, fooled by ART
            only_new = int((new_c & ~old_c).sum())
            row["columns"][d] = {"torchattacks": round(old_c.float().mean().item(), 4),
                                 "art": round(new_c.float().mean().item(), 4),
                                 "correct_only_under_torchattacks": only_old,
                                 "correct_only_under_art": only_new,
                                 "mcnemar_p": round(mcnemar_p(only_old, only_new), 4)}
        results[name] = row
        print(name, json.dumps(row["columns"]), flush=True)
    record = {"command": f"python benchmarks/library_switch_check.py --limit {a.limit} "
                         f"--attacks {a.attacks} --batch {a.batch} --threads {a.threads}",
              "data": data.source, "n": len(data), "seed": "7919 * batch index",
              "defense_seed": 0, "eps": eps, "attacks": results,
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              "hardware": describe("cpu", packages=("art", "torchattacks"))}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    hw = record["hardware"]
    lines = [f"# Oblivious attacks: torchattacks {hw.get('torchattacks')} vs ART {hw.get('art')}"
             f" on the same images ({data.source})", "",
             f"Command: `{record['command']}` ({record['wall_seconds']:.0f} s, {hw['cpu']}, "
             f"{a.threads} torch thread(s), load average "
             f"{' / '.join(f'{v:.1f}' for v in hw.get('load_average') or [])}).  ",
             "Accuracy (%) per column, both libraries attacking the same source images; "
             "*only T* / *only A*: images classified correctly under torchattacks' / ART's "
             "attack only; p: exact McNemar test of those counts.", "",
             "| attack | column | torchattacks | ART | only T | only A | p |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for d, c in row["columns"].items():
            lines.append(f"| {name} ({row['norm']} {row['eps']:g}, {row['steps']} steps) | {d} | "
                         f"{100 * c['torchattacks']:.2f} | {100 * c['art']:.2f} | "
                         f"{c['correct_only_under_torchattacks']} | "
                         f"{c['correct_only_under_art']} | {c['mcnemar_p']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
