"""apudae-engine: adversarial purification with adaptive denoising autoencoders (APuDAE).

Public API (imported lazily, so ``import apudae_engine`` stays cheap)::

    from apudae_engine import Purifier, PurifyConfig, load_classifier, purify_folder
    purifier = Purifier.from_pretrained("fmnist")      # an nn.Module in eval mode
    clean = purifier(images)                           # NCHW float in [0, 1]
    classifier = load_classifier("fmnist").model       # the bundled model's classifier
"""

from __future__ import annotations

from typing import Any

from apudae_engine._version import __version__

_LAZY = {
    "Purifier": ("apudae_engine.backends.purifier", "Purifier"),
    "PurifyConfig": ("apudae_engine.method.config", "PurifyConfig"),
    "PurifyResult": ("apudae_engine.method.loop", "PurifyResult"),  # what Purifier.purify returns
    "purify_folder": ("apudae_engine.folder.local", "purify_folder"),
    "FolderJob": ("apudae_engine.folder.local", "FolderJob"),
    "load_classifier": ("apudae_engine.method.checkpoint", "load_classifier"),
    # r(x) of a DAE, differentiable (attacks on the detector); Purifier.reconstruction_error
    # is its no-grad form for a purifier's own DAE.
    "reconstruction_error": ("apudae_engine.method.purification", "reconstruction_error"),
    "purify_dataset": ("apudae_engine.folder.ray_dataset", "purify_dataset"),
    "PurifyBatches": ("apudae_engine.folder.ray_dataset", "PurifyBatches"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'apudae_engine' has no attribute {name!r}")
