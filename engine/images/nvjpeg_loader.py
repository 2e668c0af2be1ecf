"""The ``nvjpeg`` loader: torchvision's ``decode_jpeg(device="cuda")``, for GPU machines without
DALI. JPEG only; other files go to Pillow."""

from __future__ import annotations

import torch

from apudae_engine.images.fast_loader import DecodeFailed, FastLoader


class NvjpegLoader(FastLoader):
    name = "nvjpeg"
    formats = ("JPEG",)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "it decodes on a CUDA device and none is in use; use --loader cpu or dali"
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError:
            return (f"torchvision is not installed; install the torchvision release built for "
                    f"your torch {torch.__version__} (an unmatched one replaces torch)")
        return None

    def _decode(self, encoded):
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.from_numpy(e) for e in encoded]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            raise DecodeFailed(str(exc).strip().splitlines()[-1][:200]) from exc
