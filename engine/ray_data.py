"""The Ray Data API under its first import path, ``apudae_engine.ray_data`` (kept so that
code written for it keeps working); it lives in ``apudae_engine.folder.ray_dataset`` and is
exported as ``apudae_engine.purify_dataset``."""

from apudae_engine.folder.ray_dataset import PurifyBatches, import_ray, purify_dataset

__all__ = ["PurifyBatches", "import_ray", "purify_dataset"]
