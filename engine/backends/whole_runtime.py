"""Run an exported whole purification (``export --whole``) in Python, in one of three runtimes.

``torch`` loads ``<stem>.pt2`` (``torch.export.load``), ``onnxruntime`` loads ``<stem>.onnx``
on the CPU, ``aoti`` loads ``<stem>.aoti.pt2`` (an AOTInductor package). All three take the
graph signature of ``apudae_engine.backends.whole_graph`` and return the same named outputs
(the C++ runner loads the AOTI package itself).

Example::

    art = WholeArtifact("out/fmnist_whole.json", runtime="onnxruntime")
    out = art.run(images)                 # fingerprint ids, the exported seed
    purified, flagged = out["purified"], out["flagged"]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from apudae_engine.backends.whole_graph import default_inputs
from apudae_engine.core.errors import UserError

RUNTIMES = ("torch", "onnxruntime", "aoti")


class WholeArtifact:
    """An exported whole purification, loaded once.

    Args:
        sidecar: the ``<stem>.json`` that ``export_whole`` wrote (the graph files sit beside it).
        runtime: ``torch``, ``onnxruntime`` or ``aoti``.
    """

    def __init__(self, sidecar: str | Path, runtime: str = "onnxruntime") -> None:
        from apudae_engine.backends.export import WHOLE_FORMAT

        self.sidecar = Path(sidecar)
        if runtime not in RUNTIMES:
            raise UserError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        try:
            self.meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the sidecar {self.sidecar}: {exc}") from None
        if self.meta.get("format") != WHOLE_FORMAT:
            raise UserError(f"{self.sidecar} is not a whole-purification export (format "
                            f"{self.meta.get('format')!r}); run `apudae-engine export --whole`")
        self.runtime = runtime
        self.output_names: list[str] = list(self.meta["outputs"])
        i = self.meta["input"]
        self.input_shape = (int(i["channels"]), int(i["height"]), int(i["width"]))
        self._run = self._load()

    def _file(self, key: str, suffix: str) -> Path:
        name = self.meta["files"].get(key) or self.sidecar.with_suffix(suffix).name
        path = self.sidecar.parent / name
        if not path.is_file():
            raise UserError(f"{path} is missing; export it with `apudae-engine export --whole`"
                            + (" --aoti" if key == "aoti" else ""))
        return path

    def _load(self):
        if self.runtime == "torch":
            module = torch.export.load(self._file("pt2", ".pt2")).module()
            return lambda *inputs: module(*inputs)
        if self.runtime == "aoti":
            from torch._inductor import aoti_load_package

            runner = aoti_load_package(str(self._file("aoti", ".aoti.pt2")))
            return lambda *inputs: runner(*inputs)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the onnxruntime runtime needs onnxruntime; pip install "
                            "'apudae-engine[onnx]'") from None
        session = ort.InferenceSession(str(self._file("onnx", ".onnx")),
                                       providers=["CPUExecutionProvider"])

        def run(images, ids, seed):
            feeds = {"images": images.numpy(), "image_ids": ids.numpy(), "seed": seed.numpy()}
            return [torch.from_numpy(np.asarray(a)) for a in session.run(None, feeds)]

        return run

    def run(self, images: torch.Tensor, image_ids: torch.Tensor | None = None,
            seed: int | None = None) -> dict[str, torch.Tensor]:
        """Purify (N, C, H, W) float images in [0, 1]; ``image_ids`` None keys the noise by
        each image's pixel fingerprint and ``seed`` None takes the exported seed (as
        ``Purifier.purify``). Returns the outputs by name, on the CPU."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise ValueError(f"expected images of shape (N, {c}, {h}, {w}), got "
                             f"{tuple(images.shape)}")
        inputs = default_inputs(images.detach().cpu().contiguous(),
                                None if image_ids is None else image_ids.cpu(), seed)
        with torch.no_grad():
            outs = self._run(*inputs)
        return dict(zip(self.output_names, outs))
