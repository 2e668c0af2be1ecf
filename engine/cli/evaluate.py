"""``apudae-engine evaluate``: accuracy under standard and defense-aware attacks."""

from __future__ import annotations

import argparse

# Building the parser (and --version, --help) never imports torch, so the attack names are
# not listed here: they live in the attack registry, which EvalConfig checks and
# --list-attacks prints. The defense names come from the torch-free core.choices.
from apudae_engine.core.choices import BACKEND_CHOICES, DEFENSES


def _names(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() in ("", "none") else tuple(
        t.strip() for t in text.split(",") if t.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _list_attacks() -> int:
    from apudae_engine.evaluation.attacks import attack_class, attack_names

    names = attack_names(defense_aware=False) + attack_names(defense_aware=True)
    width = max(len(n) for n in names) + 1
    print(f"{'attack':<{width}} {'family':<14} {'norm':<5} {'steps':>5}  {'default':<7}  label")
    for name in names:
        c = attack_class(name)
        family = "defense-aware" if c.defense_aware else "oblivious"
        print(f"{name:<{width}} {family:<14} {c.norm:<5} {c.default_steps:>5}  "
              f"{'yes' if c.in_default_run else 'no':<7}  {c.label}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    if a.list_attacks:
        return _list_attacks()
    import torch

    from apudae_engine.evaluation.config import EvalConfig
    from apudae_engine.evaluation.run import evaluate

    if a.threads:
        torch.set_num_threads(a.threads)
    kw = {} if a.attacks is None else {"attacks": _names(a.attacks)}
    if a.aware_attacks is not None:
        kw["aware_attacks"] = _names(a.aware_attacks)
    if a.defenses is not None:  # here "none" is a defense (the bare classifier), not nothing
        kw["defenses"] = tuple(t.strip() for t in a.defenses.split(",") if t.strip())
    if a.aware_targets is not None:  # "none" is a target too: the bare classifier
        kw["aware_targets"] = tuple(t.strip() for t in a.aware_targets.split(",") if t.strip())
    if a.aware_sweep is not None:
        kw["aware_sweep"] = a.aware_sweep
    config = EvalConfig(
        model=a.model, classifier=a.classifier, dataset=a.dataset, data_dir=a.data_dir,
        split=a.split, limit=a.limit, offset=a.offset, aware_limit=a.aware_limit,
        aware_target=a.aware_target,
        eps=a.eps, eps_l2=a.eps_l2, sweep=a.sweep, sweep_limit=a.sweep_limit, steps=a.steps,
        aware_steps=a.aware_steps, eot=a.eot, draws=a.draws, restarts=a.restarts,
        square_queries=a.square_queries,
        batch_size=a.batch, aware_batch_size=a.aware_batch, seed=a.seed, quick=a.quick,
        device=a.device, backend=a.backend, method_defaults=a.method_defaults, out_dir=a.out,
        examples=a.examples, **kw)
    results = evaluate(config, fresh=a.fresh, wait=not a.no_wait)
    if results is None:
        print(f"this worker's batches are done; another worker writes {a.out}/results.md")
        return 0
    s = results["settings"]
    print(f"evaluated {s['n']} images of {s['data']} in {s['wall_seconds']:.0f} s -> "
          f"{a.out}/results.md")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from apudae_engine.cli.options import add_model_data_options

    p = sub.add_parser(
        "evaluate", help="accuracy under attack with and without purification",
        description="Attack the classifier (oblivious) and the purifier (defense-aware), then "
                    "score every defense on every attack. Writes results.json, results.md, "
                    "per_image.npz and plots to --out. Each batch is kept in --out/parts as "
                    "it is done: rerun the same command to resume an interrupted run, and run "
                    "it in several processes (or on several machines sharing --out) to share "
                    "the work; each takes batches no one else holds, and the one that finds "
                    "every batch done writes the report. A run whose settings change results "
                    "(weights, data, eps, attacks, defenses, seeds, batch sizes, steps...) "
                    "refuses parts of another; --limit, --offset, --threads, --device and "
                    "--backend may differ.")
    add_model_data_options(p)
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--offset", type=int, default=0, help="skip the split's first N images "
                   "(a multiple of the batch sizes), to split a long run into parts; each "
                   "image gets the seeds a single run would give it")
    p.add_argument("--limit", type=int, default=None, help="first N images (default: all; "
                   "32 with --quick)")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--fresh", action="store_true", help="delete --out/parts first, whatever "
                   "run they belong to, and start over (refused while a live worker holds a "
                   "batch there; give it to the first worker only)")
    p.add_argument("--no-wait", action="store_true", help="when no batch is left to take, "
                   "exit instead of waiting for the batches other workers hold; the last of "
                   "them writes the report")
    p.add_argument("--quick", action="store_true", help="32 images and small budgets: a "
                   "smoke run of every attack in about two minutes on 2 CPU cores")
    p.add_argument("--attacks", default=None, help="oblivious attacks, comma-separated or "
                   "'none' (default: every registered one; see --list-attacks)")
    p.add_argument("--aware-attacks", default=None, help="defense-aware attacks or 'none' "
                   "(default: every registered one; see --list-attacks)")
    p.add_argument("--list-attacks", action="store_true", help="print the registered attacks "
                   "(name, family, norm, default steps) and exit")
    p.add_argument("--aware-limit", type=int, default=None, help="images for defense-aware "
                   "attacks (default 500; 8 with --quick)")
    p.add_argument("--aware-target", default="adaptive", choices=DEFENSES[1:],
                   help="defense the defense-aware attacks are crafted against")
    p.add_argument("--defenses", default=None, help=f"columns (default: {','.join(DEFENSES)})")
    p.add_argument("--aware-sweep", type=_floats, default=None, help="defense-aware curve: "
                   "L-inf eps values, comma-separated; at each, the defense-aware attacks run "
                   "against each --aware-targets defense in turn (never by transfer), and "
                   "results.md gets robust accuracy against eps with and without rejecting "
                   "flagged inputs, plus aware_vs_eps.png. Replaces the single-eps "
                   "defense-aware table")
    p.add_argument("--aware-targets", default=None, help="defenses the --aware-sweep attacks "
                   "craft against, each in turn (default: none,direct,adaptive; "
                   "--method-defaults makes adaptive the method's own settings)")
    p.add_argument("--eps", type=float, default=None, help="L-inf eps (default: dataset "
                   "convention, 0.1 for 28x28 data, 8/255 for CIFAR-10)")
    p.add_argument("--eps-l2", type=float, default=None, help="L2 eps (default 1.5 for 28x28 "
                   "data, 0.5 for CIFAR-10)")
    p.add_argument("--sweep", type=_floats, default=None, help="L-inf eps values for the PGD "
                   "sweep plot, comma-separated or 'none'")
    p.add_argument("--sweep-limit", type=int, default=None, help="images for the sweep "
                   "(default 1000; 32 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps of iterative library attacks "
                   "(default: PGD 40, C&W 100, DeepFool 50, AutoAttack 100)")
    p.add_argument("--aware-steps", type=int, default=None, help="steps of defense-aware "
                   "attacks (default: PGD-EOT 20, BPDA 40, below-mu 100)")
    p.add_argument("--eot", type=int, default=None, help="noise draws per gradient (default 4)")
    p.add_argument("--draws", type=int, default=4, help="noise draws: defense-aware rows are "
                   "scored on this many held-out seeds of the target (mean and all-correct), and "
                   "APGD attacks check each iterate on as many other seeds (default 4)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts of the APGD "
                   "attacks (default 1: no restart)")
    p.add_argument("--square-queries", type=int, default=None, help="AutoAttack Square queries "
                   "(default 5000)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--aware-batch", type=int, default=32, help="batch for defense-aware attacks "
                   "(the unrolled graph holds every step)")
    p.add_argument("--examples", type=int, default=8, help="images in examples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--backend", default="reference", choices=BACKEND_CHOICES,
                   help="purification backend for scoring "
                   "the defenses: reference (default, the specification), auto, compiled, ...; "
                   "attacks always differentiate through the reference")
    p.add_argument("--method-defaults", action="store_true", help="score the purifying "
                   "defenses with the method's own settings (docs/method.md) instead of the "
                   "model's tuned purify_defaults (apudae-engine tune)")
    p.set_defaults(func=_cmd_evaluate)
