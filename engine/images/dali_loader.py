"""The ``dali`` loader: NVIDIA DALI's ``fn.decoders.image`` fed through ``fn.external_source``
with our own file list, so every output maps back to its file. ``device="mixed"`` on a GPU (the
result stays on the GPU), ``"cpu"`` with ``device_id=None`` otherwise. Extra:
``apudae-engine[dali]``; DALI is imported when the first batch loads."""

from __future__ import annotations

import re
import threading

import numpy as np
import torch

from apudae_engine.images.fast_loader import CHUNK, DecodeFailed, FastLoader


class DaliLoader(FastLoader):
    name = "dali"

    def __init__(self, device: torch.device, workers: int = 2) -> None:
        super().__init__(device, workers)
        self._pipe = None
        self._lock = threading.Lock()  # a DALI pipeline is driven by one thread at a time

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "NVIDIA DALI is not installed; pip install 'apudae-engine[dali]'"
        return None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index or 0) if gpu else None

        @pipeline_def(batch_size=CHUNK, num_threads=self.workers, device_id=device_id,
                      prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # EXIF orientation is ignored, as Pillow's load_image does; fancy upsampling makes
            # the GPU's chroma upsampling that of libjpeg-turbo.
            extra = {"jpeg_fancy_upsampling": True} if gpu else {}
            return fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB, adjust_orientation=False, **extra)

        pipe = decode()
        pipe.build()
        return pipe

    def _decode(self, encoded):
        with self._lock:
            if self._pipe is None:
                self._pipe = self._build()
            try:
                self._pipe.feed_input("encoded", encoded)
                (out,) = self._pipe.run()
            except Exception as exc:
                self._pipe = None  # DALI declares a pipeline invalid after an error
                # DALI names the sample it could not decode; the others are retried.
                found = re.search(r"Failed to decode sample #(\d+)", str(exc))
                sample = int(found.group(1)) if found else None
                reason = found.group(0) if found else str(exc).strip().splitlines()[-1][:200]
                raise DecodeFailed(reason, sample) from exc
            # Same-size outputs (the common case) move as one tensor, others one by one.
            dense = out.is_dense_tensor()
            parts = [out.as_tensor()] if dense else [out[i] for i in range(len(out))]
            if self.device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray

                stream = torch.cuda.current_stream(self.device)
                images = []
                for t in parts:
                    dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
                    feed_ndarray(t, dst, cuda_stream=stream)  # device to device, no host copy
                    images.append(dst)
                # DALI reuses its output buffers on the next run: finish the copies first.
                stream.synchronize()
            else:
                images = [torch.from_numpy(np.array(t)) for t in parts]  # copies out of DALI
            if dense:
                return images[0].permute(0, 3, 1, 2)
            return [t.permute(2, 0, 1) for t in images]

    def close(self) -> None:
        self._pipe = None
        super().close()
