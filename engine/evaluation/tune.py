"""Choosing a model's purification defaults with attacks that know the defense (``tune``).

The method's settings (``PurifyConfig``'s ``TUNABLE``: steps, lr, noise_eps, noise cap) were
picked by the authors against attacks that did not know the defense. ``tune`` picks them on
the model's **calib** split (never the test split the results are reported on) by two
scores per setting:

- clean accuracy of the defended classifier on the first ``clean_limit`` calib images (the
  defense's own seed);
- robust accuracy against the defense-aware ``attack`` (by default the APGD suite) at a fixed
  L-inf eps on the first ``attack_limit`` calib images, crafted against that very setting and
  scored on held-out noise seeds no attack used (the mean over ``draws`` draws).

Rule: among the settings whose clean accuracy is at most ``max_clean_drop`` below the
method's defaults, take the highest robust accuracy (ties: correct on all draws, then clean
accuracy, then fewer steps, the cheaper). The search is coordinate-wise from the method's
defaults: each setting in ``grid`` order tries its values with the others at the best found
so far. Each scored setting is written to ``OUT/candidates/`` at once, so an interrupted run
resumes; ``--write`` stores the chosen settings in the model's JSON as ``purify_defaults``,
which ``purify``, the API and ``evaluate`` then use.

The tuning attack's budget is smaller than a reported evaluation's (it runs once per
setting), so its robust accuracies overstate; the chosen and the method's settings must then
be compared on the test split with ``evaluate``'s full budget (``--method-defaults``).

Example::

    result = tune(TuneConfig(model="fmnist", dataset="fashion-mnist", out_dir="runs/tune"))
    result["chosen"]["settings"]        # {"steps": ..., "lr": ..., ...}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from apudae_engine import Purifier, PurifyConfig, __version__
from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic
from apudae_engine.core.host import describe, resolve_device
from apudae_engine.core.progress import progress
from apudae_engine.evaluation.attacks import AttackSpec, attack_class, run_attack
from apudae_engine.evaluation.config import EPSILONS
from apudae_engine.evaluation.scoring import SEED_STRIDE, held_out_correct
from apudae_engine.evaluation.tune_report import markdown, plot
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import (
    load_checkpoint,
    load_classifier,
    resolve_checkpoint,
    update_metadata,
)
from apudae_engine.method.checkpoint_schema import TUNED_LIMITS, validate_metadata
from apudae_engine.method.config import TUNABLE

log = logging.getLogger(__name__)

# Values tried per setting, in search order; the method's defaults need not be listed.
DEFAULT_GRID: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("steps", (8, 13, 20)),
    ("lr", (1 / 255, 2 / 255, 4 / 255)),
    ("noise_eps", (0.7 / 255, 2 / 255, 4 / 255)),
    ("noise_max_scale", (4.0, 16.0)),
)



@dataclass(frozen=True)
class TuneConfig:
    """One tuning run; ``apudae-engine tune --help`` describes each field."""

    model: str = "fmnist"
    classifier: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    clean_limit: int = 1000
    attack_limit: int = 64
    eps: float | None = None
    attack: str = "aware-suite"
    attack_steps: int = 20
    eot: int = 4
    draws: int = 4
    grid: tuple[tuple[str, tuple[float, ...]], ...] = DEFAULT_GRID
    max_clean_drop: float = 0.01
    min_gain: float | None = None
    seed: int = 0
    batch_size: int = 64
    clean_batch_size: int = 250
    device: str = "cpu"
    out_dir: str = "runs/tune"
    write: bool = False
    command: str | None = None

    def __post_init__(self) -> None:
        cls = attack_class(self.attack) if self.attack else None
        if cls is None or not cls.defense_aware:
            raise UserError(f"--attack must be a defense-aware attack, got {self.attack!r}")
        for name in ("clean_limit", "attack_limit", "attack_steps", "eot", "draws",
                     "batch_size", "clean_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.max_clean_drop < 1:
            raise UserError(f"--max-clean-drop must lie in [0, 1), got {self.max_clean_drop}")
        if self.min_gain is not None and not 0 <= self.min_gain < 1:
            raise UserError(f"--min-gain must lie in [0, 1), got {self.min_gain}")
        if self.seed < 0:
            raise UserError(f"--seed must be non-negative, got {self.seed}")
        for name, values in self.grid:
            if name not in TUNABLE:
                raise UserError(f"--grid: {name!r} is not a tunable setting "
                                f"({', '.join(TUNABLE)})")
            if not values:
                raise UserError(f"--grid: no values for {name}")
            low, high = TUNED_LIMITS[name]
            for v in values:
                if not (math.isfinite(v) and low <= v <= high) or (
                        name == "steps" and v != int(v)):
                    kind = "an integer" if name == "steps" else "a number"
                    raise UserError(f"--grid: {name} must be {kind} in [{low:g}, {high:g}] "
                                    f"(what a model's JSON may hold), got {v:g}")

    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        if self.dataset not in EPSILONS:
            raise UserError(f"no epsilon convention for dataset {self.dataset!r}; give --eps")
        return EPSILONS[self.dataset][0]


@dataclass
class Candidate:
    """One setting's scores."""

    settings: dict[str, float]
    clean: float
    robust_seed: float  # on the defense's own seed (the attacker who knows it)
    robust_mean: float  # mean over the held-out draws
    robust_all: float  # correct on every held-out draw
    attack_seconds: float
    purifier_backward_per_image: float

    def rank(self) -> tuple:
        return (self.robust_mean, self.robust_all, self.clean, -self.settings["steps"])


def settings_key(settings: dict[str, float]) -> str:
    """A file-name-safe key of one setting (its values to 6 significant digits)."""
    return "_".join(f"{k}={settings[k]:.6g}" for k in TUNABLE)


class Tuner:
    """Loads the model, classifier and calib data of a :class:`TuneConfig` and scores settings."""

    def __init__(self, config: TuneConfig) -> None:
        self.config = c = config
        self.device = resolve_device(c.device)
        self.dae = load_checkpoint(c.model, "dae")
        cal = self.dae.calibration or {}
        self.mu, self.sigma = cal.get("mu"), cal.get("sigma")
        if self.mu is None:
            raise UserError(f"{c.model}: the DAE has no calibration; run `apudae-engine "
                            f"calibrate --model {c.model}` first")
        clf = load_classifier(c.model, c.classifier, self.device)
        if clf is None:
            raise UserError(f"no classifier beside {c.model}; pass --classifier PATH")
        self.classifier, self.classifier_sha = clf.model.eval(), clf.weights_sha256
        self.model = self.dae.model.to(self.device)
        data = load_dataset(c.dataset, "calib", c.data_dir, self.dae.input_shape)
        self.data = data.subset(max(c.clean_limit, c.attack_limit))
        self.eps = c.resolved_eps()
        self.identity = {
            "engine": __version__, "dae_sha256": self.dae.weights_sha256,
            "classifier_sha256": self.classifier_sha, "mu": self.mu, "sigma": self.sigma,
            "data": self.data.source, "clean_limit": c.clean_limit,
            "attack_limit": c.attack_limit, "eps": self.eps, "attack": c.attack,
            "attack_steps": c.attack_steps, "eot": c.eot, "draws": c.draws, "seed": c.seed,
            "batch_size": c.batch_size}
        self.fingerprint = hashlib.sha256(
            json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.parts = Path(c.out_dir) / "candidates"

    def purify_config(self, settings: dict[str, float], seed: int) -> PurifyConfig:
        return PurifyConfig(seed=seed, defaults="method", **settings)

    def score(self, settings: dict[str, float]) -> Candidate:
        """Clean and robust accuracy of one setting (read back when already scored)."""
        path = self.parts / f"{settings_key(settings)}.json"
        try:
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                return Candidate(**saved["candidate"])
            log.warning("%s: scored under other tuning settings; scoring again", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s: unreadable (%s); scoring again", path, exc)
        cand = self._score(settings)
        doc = {"fingerprint": self.fingerprint, "candidate": asdict(cand)}
        self.parts.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
        return cand

    def _score(self, settings: dict[str, float]) -> Candidate:
        c = self.config
        # One purifier per setting: the attack crafts against it, the scores are its own.
        purifier = Purifier(self.model, self.mu, self.sigma, self.purify_config(settings, c.seed))
        clean_correct = 0
        n_clean = min(c.clean_limit, len(self.data))
        for start in range(0, n_clean, c.clean_batch_size):
            x, y = self._batch(start, min(start + c.clean_batch_size, n_clean))
            clean_correct += int(self._correct(x, y, purifier).sum())
        n_attack = min(c.attack_limit, len(self.data))
        seed_ok = mean_ok = all_ok = 0.0
        backward, t0 = 0, time.perf_counter()
        bar = progress(total=n_attack, desc=f"tune {settings_key(settings)}", unit="img")
        try:
            for b, start in enumerate(range(0, n_attack, c.batch_size)):
                x, y = self._batch(start, min(start + c.batch_size, n_attack))
                spec = AttackSpec(c.attack, eps=self.eps, steps=c.attack_steps, eot=c.eot,
                                  seed=c.seed + SEED_STRIDE * b, draws=c.draws)
                result = run_attack(spec, self.classifier, x, y, purifier)
                backward += result.budget.purifier_backward
                seed_ok += float(self._correct(result.images, y, purifier).sum())
                counts = held_out_correct(purifier, self.classifier, result.images, y,
                                          c.draws).float()
                mean_ok += float((counts / c.draws).sum())
                all_ok += float((counts == c.draws).sum())
                bar.update(y.shape[0])
        finally:
            bar.close()
        n = max(n_attack, 1)
        cand = Candidate(settings=dict(settings), clean=round(clean_correct / max(n_clean, 1), 4),
                         robust_seed=round(seed_ok / n, 4), robust_mean=round(mean_ok / n, 4),
                         robust_all=round(all_ok / n, 4),
                         attack_seconds=round(time.perf_counter() - t0, 1),
                         purifier_backward_per_image=round(backward / n, 1))
        log.info("tune %s: clean %.2f%%, robust %.2f%% (held-out mean; %.2f%% on all %d "
                 "draws), attack %.0f s", settings_key(settings), 100 * cand.clean,
                 100 * cand.robust_mean, 100 * cand.robust_all, c.draws, cand.attack_seconds)
        return cand

    def _batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data.images[start:stop].to(self.device).float() / 255
        return x, self.data.labels[start:stop].to(self.device)

    @torch.no_grad()
    def _correct(self, x: torch.Tensor, y: torch.Tensor, purifier: Purifier) -> torch.Tensor:
        xp = purifier.purify(x).images  # the reference, on the defense's own seed
        return (self.classifier(xp).argmax(1) == y).cpu()


def method_settings() -> dict[str, float]:
    """The method's own defaults of the tunable settings (adaptive, docs/method.md)."""
    config = PurifyConfig(defaults="method")
    return {k: getattr(config, k) for k in TUNABLE}


def standard_error(p: float, n: int) -> float:
    """The binomial standard error of an accuracy p measured on n images (p kept at least
    1/n, so that a score of 0 still asks for about one image's worth of gain)."""
    p = min(max(p, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    return math.sqrt(p * (1 - p) / max(n, 1))


def choose(candidates: list[Candidate], current: Candidate, baseline: Candidate,
           max_clean_drop: float, min_gain: float) -> Candidate:
    """The candidate the module's rule keeps: the best eligible one (clean accuracy within
    ``max_clean_drop`` of the baseline; by robust mean, all-draws, clean, fewer steps), but
    only when its robust mean beats ``current``'s by at least ``min_gain``; else ``current``.
    The margin keeps a difference of an image or two on a small sample from moving the
    defaults."""
    eligible = [c for c in candidates if c.clean >= baseline.clean - max_clean_drop - 1e-9]
    best = max(eligible or [current], key=Candidate.rank)
    return best if best.robust_mean >= current.robust_mean + min_gain - 1e-9 else current


def tune(config: TuneConfig) -> dict[str, Any]:
    """Run the search, write tune.json, tune.md and tune.png to ``config.out_dir`` (and the
    chosen settings into the model's JSON with ``config.write``); returns tune.json's content."""
    c = config
    command = c.command or " ".join(shlex.quote(a) for a in ["apudae-engine", *sys.argv[1:]])
    tuner = Tuner(c)
    t_start = time.perf_counter()
    scored: dict[str, Candidate] = {}

    def score(settings: dict[str, float]) -> Candidate:
        key = settings_key(settings)
        if key not in scored:
            scored[key] = tuner.score(settings)
        return scored[key]

    baseline = score(method_settings())
    n_attack = min(c.attack_limit, len(tuner.data))
    min_gain = (c.min_gain if c.min_gain is not None
                else standard_error(baseline.robust_mean, n_attack))
    current = baseline
    path: list[dict[str, Any]] = []
    for name, values in c.grid:
        tried = [current] + [score({**current.settings, name: _typed(name, v)}) for v in values]
        current = choose(tried, current, baseline, c.max_clean_drop, min_gain)
        path.append({"setting": name, "values": list(values), "kept": current.settings[name]})
        log.info("tune: %s -> %g", name, current.settings[name])
    chosen = current
    doc = {
        "command": command, "engine": __version__, "identity": tuner.identity,
        "data": tuner.data.source, "eps_linf": tuner.eps,
        "rule": (f"highest robust accuracy (mean over {c.draws} held-out draws) among the "
                 f"settings whose clean accuracy is at most {100 * c.max_clean_drop:g} points "
                 "below the method's defaults (ties: all-draws, clean, fewer steps), taken "
                 f"only when it beats the current setting by at least {100 * min_gain:.2f} "
                 "points" + (" (one standard error of the method's robust accuracy)"
                             if c.min_gain is None else "")),
        "min_gain": round(min_gain, 6),
        "search": path, "grid": {k: list(v) for k, v in c.grid},
        "method_defaults": asdict(baseline), "chosen": asdict(chosen),
        "candidates": [asdict(v) for v in scored.values()],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "attack_seconds": round(sum(v.attack_seconds for v in scored.values()), 1),
        "hardware": describe(tuner.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tune.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_atomic(out / "tune.md", (markdown(doc) + "\n").encode())
    try:
        plot(doc, out / "tune.png")
    except ImportError as exc:
        log.warning("tune.png skipped: %s", exc)
    if c.write:
        write_defaults(c.model, doc, out / "tune.json")
    return doc


def _typed(name: str, value: float) -> float:
    return int(value) if name == "steps" else float(value)  # steps checked integral above


def write_defaults(model: str, doc: dict[str, Any], record: Path) -> Path:
    """Store the chosen settings in the model's DAE JSON as ``purify_defaults``."""
    jpath = resolve_checkpoint(model, "dae")
    meta = json.loads(jpath.read_text())
    if meta.get("weights_sha256") != doc["identity"]["dae_sha256"]:
        raise UserError(f"{jpath}: the weights changed since they were tuned; tune again")
    chosen, base = doc["chosen"], doc["method_defaults"]
    tuning = {"command": doc["command"], "date": doc["date"], "data": doc["data"],
              "dae_sha256": doc["identity"]["dae_sha256"], "mu": doc["identity"]["mu"],
              "sigma": doc["identity"]["sigma"], "min_gain": doc["min_gain"],
              "eps_linf": doc["eps_linf"], "attack": {k: doc["identity"][k] for k in (
                  "attack", "attack_steps", "eot", "draws", "attack_limit", "clean_limit")},
              "rule": doc["rule"], "record": str(record),
              "chosen": {k: chosen[k] for k in ("clean", "robust_mean", "robust_all")},
              "method_defaults": {"settings": base["settings"], **{
                  k: base[k] for k in ("clean", "robust_mean", "robust_all")}}}
    defaults = {"adaptive": chosen["settings"], "tuning": tuning}
    validate_metadata({**meta, "purify_defaults": defaults}, jpath, "dae")  # before writing
    update_metadata(jpath, purify_defaults=defaults)
    load_checkpoint(model, "dae")  # the written JSON loads (schema, hash)
    log.info("wrote purify_defaults to %s", jpath)
    return jpath
