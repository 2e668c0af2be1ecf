"""The names a user chooses from, defined once and without importing torch.

argparse builds its ``choices`` from here and the library validates against the same tuples,
so a flag's help and the error for a bad value can never disagree. Backends and loaders are
registries: a new one is one module (see the interface each names) and one line below, which
maps its name to where it lives; nothing is imported until it is chosen.
"""

from __future__ import annotations

METHODS = ("adaptive", "iterative", "direct")

# name -> module providing ``unavailable_reason(device, precision)`` and
# ``engine_for(dae, device, dtype)`` (``reference``: the specification, no engine).
BACKEND_MODULES = {
    "reference": "apudae_engine.backends.reference",
    "compiled": "apudae_engine.backends.compiled",
    "tensorrt": "apudae_engine.backends.tensorrt",
}
BACKENDS = tuple(BACKEND_MODULES)
BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISIONS = ("fp32", "bf16", "fp16")

# name -> "module:Class" of an ``apudae_engine.images.loaders.Loader`` subclass (with
# ``unavailable_reason(device)``); ``auto`` takes the first usable one after ``cpu``, in this
# order, on a CUDA device and ``cpu`` elsewhere.
LOADER_CLASSES = {
    "cpu": "apudae_engine.images.loaders:Loader",
    "dali": "apudae_engine.images.dali_loader:DaliLoader",
    "nvjpeg": "apudae_engine.images.nvjpeg_loader:NvjpegLoader",
}
LOADERS = tuple(LOADER_CLASSES)
LOADER_CHOICES = ("auto", *LOADERS)

# What ``train-classifier --arch`` builds (``method.models.ARCHITECTURES`` holds each class).
CLASSIFIER_ARCHS = ("small_cnn", "resnet18_cifar")

# What ``evaluate`` scores: the classifier alone, then each purifying defense.
DEFENSES = ("none", "direct", "iterative", "adaptive", "adaptive-compat")
