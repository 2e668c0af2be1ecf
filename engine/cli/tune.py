"""``apudae-engine tune``: choose a model's purification defaults with defense-aware attacks."""

from __future__ import annotations

import argparse

_TUNABLE = ("steps", "lr", "noise_eps", "noise_max_scale")  # mirrors method.config.TUNABLE


def _grid(text: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``steps=8,13,20;lr=1/255,2/255`` -> (("steps", (8, 13, 20)), ("lr", (...)))."""
    out = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        name, _, values = part.partition("=")
        name = name.strip().replace("-", "_")
        if name == "noise_cap":
            name = "noise_max_scale"
        if name not in _TUNABLE or not values.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=V1,V2 with NAME one of steps, lr, "
                                             f"noise_eps, noise_cap; got {part!r}")
        try:
            out.append((name, tuple(_number(v) for v in values.split(",") if v.strip())))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: values must be numbers or a/b "
                                             "fractions") from None
    return tuple(out)


def _number(text: str) -> float:
    num, _, den = text.strip().partition("/")
    try:
        return float(num) / float(den) if den else float(num)
    except ZeroDivisionError:
        raise ValueError(text) from None


def _cmd_tune(a: argparse.Namespace) -> int:
    import torch

    from apudae_engine.evaluation.tune import DEFAULT_GRID, TuneConfig, tune

    if a.threads:
        torch.set_num_threads(a.threads)
    config = TuneConfig(
        model=a.model, classifier=a.classifier, dataset=a.dataset, data_dir=a.data_dir,
        clean_limit=a.clean_limit, attack_limit=a.attack_limit, eps=a.eps, attack=a.attack,
        attack_steps=a.attack_steps, eot=a.eot, draws=a.draws,
        grid=a.grid or DEFAULT_GRID, max_clean_drop=a.max_clean_drop / 100,
        min_gain=None if a.min_gain is None else a.min_gain / 100, seed=a.seed,
        batch_size=a.batch, device=a.device, out_dir=a.out, write=a.write)
    doc = tune(config)
    chosen, base = doc["chosen"], doc["method_defaults"]
    print(f"method defaults {base['settings']}: clean {100 * base['clean']:.1f} %, robust "
          f"{100 * base['robust_mean']:.2f} %")
    print(f"chosen          {chosen['settings']}: clean {100 * chosen['clean']:.1f} %, robust "
          f"{100 * chosen['robust_mean']:.2f} %")
    print(f"-> {a.out}/tune.md" + ("; written to the model's JSON as purify_defaults"
                                   if a.write else "; --write stores them in the model"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from apudae_engine.cli.options import add_model_data_options

    p = sub.add_parser(
        "tune", help="choose the model's purification defaults with defense-aware attacks",
        description="Score settings of the adaptive method (steps, lr, noise_eps, noise cap) "
                    "on the calib split by clean accuracy and by robust accuracy against a "
                    "defense-aware attack crafted against each setting; take the most robust "
                    "one whose clean accuracy stays within --max-clean-drop of the method's "
                    "defaults, when it gains at least --min-gain. Coordinate-wise search "
                    "from the method's defaults; each scored "
                    "setting is saved, so rerunning resumes. Writes tune.json, tune.md and "
                    "tune.png to --out; --write stores the choice in the model's JSON as "
                    "purify_defaults (used by purify, the API and evaluate unless "
                    "--method-defaults).")
    add_model_data_options(p, " (its calib split is used)")
    p.add_argument("--clean-limit", type=int, default=1000, help="calib images for clean "
                   "accuracy (default 1000)")
    p.add_argument("--attack-limit", type=int, default=64, help="calib images attacked per "
                   "setting (default 64)")
    p.add_argument("--eps", type=float, default=None, help="L-inf eps (default: the dataset's "
                   "convention, 0.1 for 28x28 data)")
    p.add_argument("--attack", default="aware-suite", help="defense-aware attack (default "
                   "aware-suite, the APGD cascade)")
    p.add_argument("--attack-steps", type=int, default=20, help="attack steps (default 20)")
    p.add_argument("--eot", type=int, default=4, help="noise draws per gradient (default 4)")
    p.add_argument("--draws", type=int, default=4, help="held-out noise draws robust accuracy "
                   "is scored on (default 4)")
    p.add_argument("--grid", type=_grid, default=None, help="values to try, e.g. "
                   "'steps=8,13,20;lr=1/255,2/255,4/255;noise_eps=0.7/255,2/255;noise_cap=4,16'"
                   " (default: that, with noise_eps 0.7/255,2/255,4/255)")
    p.add_argument("--max-clean-drop", type=float, default=1.0, help="largest clean-accuracy "
                   "loss against the method's defaults, in points (default 1)")
    p.add_argument("--min-gain", type=float, default=None, help="points of robust accuracy "
                   "a setting must gain over the current one to replace it (default: one "
                   "standard error of the method's robust accuracy on --attack-limit images)")
    p.add_argument("--seed", type=int, default=0, help="the defense's seed while tuning and "
                   "the attacks' base seed")
    p.add_argument("--batch", type=int, default=64, help="images per attack batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default="runs/tune", help="output folder (default runs/tune)")
    p.add_argument("--write", action="store_true", help="store the chosen settings in the "
                   "model's JSON as purify_defaults")
    p.set_defaults(func=_cmd_tune)
