"""The purification step as a forward-only graph: per-image r(y) and dr/dy, no autograd.

Every optimized backend consumes this graph. For a frozen eval-mode :class:`REDNet` the
backward pass is written out by hand, so the graph holds only convolutions and element-wise
ops, exports to ``torch.export``/ONNX, and compiles without autograd:

- BatchNorm (after each ReLU) is folded into the preceding convolution. Because
  ``a * relu(z) = sign(a) * relu(|a| * z)``, the per-channel scale |a| moves into the conv
  weight and bias, leaving ``sign * relu(z') + shift``; a skip added before the ReLU is scaled
  by |a| as well. :func:`fold_rednet` builds the folded copy; it equals the module.
- Transposed convolutions with stride 1 run as ordinary convolutions (weights transposed and
  flipped): one algorithm family, and oneDNN's forward convolution is its fastest.
- The input gradient of a convolution is the transposed convolution with the same weights and
  vice versa; ReLU passes the gradient where its input was positive.

With e = 2 (y - D(y)) and D(y) = relu(y + head(...)), dr/dy = e - J_D(y)^T e.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from apudae_engine.method.models import REDNet


class FoldedConv(nn.Module):
    """One block after folding: ``sign * relu(conv(h) + skip_scale * skip) + shift``.

    ``weight`` is in conv2d layout (out, in, k, k) for the forward pass; ``grad_weight`` is the
    weight whose convolution (conv2d, or conv_transpose2d when ``stride > 1``) computes the
    input gradient. ``sign`` is None when every channel's BatchNorm scale is positive.
    ``skip_from`` names the encoder block whose output is added (decoder blocks only).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, grad_weight: torch.Tensor,
                 stride: int, sign: torch.Tensor | None, shift: torch.Tensor,
                 skip_scale: torch.Tensor | None = None, skip_from: int | None = None) -> None:
        super().__init__()
        self.stride, self.skip_from = stride, skip_from
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("grad_weight", grad_weight)
        self.register_buffer("sign", sign)
        self.register_buffer("shift", shift)
        self.register_buffer("skip_scale", skip_scale)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = a * x + b, computed in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - mean * a


def _flip_transpose(w: torch.Tensor) -> torch.Tensor:
    """conv2d weight <-> stride-1 conv_transpose2d weight (same map up to padding k-1-p)."""
    return w.transpose(0, 1).flip(-1, -2).contiguous()


def _fold(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d, out_dim: int, dtype):
    a, b = _bn_affine(bn)
    scale = a.abs()
    view = [1] * weight.dim()
    view[out_dim] = -1
    w = (weight.double() * scale.view(view)).to(dtype)
    bias = (bias.double() * scale).to(dtype)
    sign = None if bool((a >= 0).all()) else torch.where(a < 0, -1.0, 1.0).to(dtype).view(-1, 1, 1)
    return w, bias, sign, b.to(dtype).view(-1, 1, 1), scale.to(dtype).view(-1, 1, 1)


class FoldedREDNet(nn.Module):
    """A REDNet with BatchNorm folded away; ``forward`` equals the module in eval mode."""

    def __init__(self, encoder: list[FoldedConv], decoder: list[FoldedConv],
                 head_weight: torch.Tensor, head_bias: torch.Tensor) -> None:
        super().__init__()
        # Keep feature maps channels-last (NHWC): oneDNN's native layout on CPU, so compiled
        # graphs neither transpose nor reorder between convolutions. Values are unchanged.
        self.channels_last = False
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        # conv_transpose2d layout (in, out, k, k), stride 2, padding 1
        self.register_buffer("head_weight", head_weight)
        self.register_buffer("head_bias", head_bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """D(y) for (N, C, H, W) inputs (the same values as the REDNet in eval mode)."""
        return forward_saved(self, y, with_grad_state=False)[0]


def fold_rednet(dae: REDNet, dtype: torch.dtype | None = None) -> FoldedREDNet:
    """Fold an eval-mode REDNet's BatchNorms into its convolutions (a new object; ``dae`` is
    untouched). ``dtype`` casts the folded weights (default: the module's)."""
    if not isinstance(dae, REDNet):
        raise TypeError(f"the step graph is written for REDNet; got {type(dae).__name__}")
    if dae.training:
        raise ValueError("fold_rednet needs the DAE in eval mode (BatchNorm statistics frozen)")
    dtype = dtype or next(dae.parameters()).dtype
    # In reduced precision the first conv and the head (1-3 image channels, ~1 % of the work)
    # stay float32: for the fmnist DAE in bf16 this cuts the median error of r by a third.
    edge = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    encoder, skips = [], []
    for i, (conv, _relu, bn) in enumerate(dae.encoder):
        w, b, sign, shift, _ = _fold(conv.weight, conv.bias, bn, 0, edge if i == 0 else dtype)
        grad_w = w if conv.stride[0] > 1 else _flip_transpose(w)
        encoder.append(FoldedConv(w, b, grad_w, conv.stride[0], sign, shift))
        if i % 2 == 1 and i < dae.layers - 1:
            skips.append(i)
    decoder = []
    for j, (deconv, bn) in enumerate(dae.decoder):
        w, b, sign, shift, scale = _fold(deconv.weight, deconv.bias, bn, 1, dtype)
        mirror = dae.layers - 2 - j
        skip_from = skips.pop() if mirror % 2 == 1 and skips else None
        decoder.append(FoldedConv(_flip_transpose(w), b, w, 1, sign, shift,
                                  scale if skip_from is not None else None, skip_from))
    head = dae.head
    return FoldedREDNet(encoder, decoder, head.weight.detach().to(edge).clone(),
                        head.bias.detach().to(edge).clone()).eval()


def _block_out(z: torch.Tensor, blk: FoldedConv) -> torch.Tensor:
    p = torch.relu(z)
    return (p if blk.sign is None else p * blk.sign) + blk.shift


def forward_saved(net: FoldedREDNet, y: torch.Tensor, with_grad_state: bool = True):
    """D(y), and what the input gradient needs: pre-activations of every block.

    Returns (D(y), r, e, go, pre) where e = 2 (y - D), go = dr/d(y + head) and ``pre`` lists
    the pre-ReLU tensors of the encoder then the decoder blocks. Each convolution runs in its
    folded weights' dtype; r, e and go are float32 (or float64 for float64 inputs).
    """
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y
    outs, pre = [], []
    for blk in net.encoder:
        h = h.to(blk.weight.dtype)
        z = _layout(net, F.conv2d(h, blk.weight, blk.bias, stride=blk.stride, padding=1))
        h = _block_out(z, blk)
        pre.append(z)
        outs.append(h)
    for blk in net.decoder:
        h = h.to(blk.weight.dtype)
        z = _layout(net, F.conv2d(h, blk.weight, blk.bias, padding=1))
        if blk.skip_from is not None:
            z = z + blk.skip_scale * outs[blk.skip_from]
        h = _block_out(z, blk)
        pre.append(z)
    o = F.conv_transpose2d(h.to(net.head_weight.dtype), net.head_weight, net.head_bias,
                           stride=2, padding=1,
                           output_padding=_output_padding(y.shape[-2:], h.shape[-2:]))
    yo = y.to(acc) + o.to(acc)
    recon = torch.relu(yo)
    if not with_grad_state:
        return recon, None, None, None, None
    d = y.to(acc) - recon
    r = (d * d).flatten(1).sum(1)
    e = 2.0 * d
    go = torch.where(yo > 0, -e, torch.zeros_like(e))
    return recon, r, e, go, pre


def _layout(net: FoldedREDNet, z: torch.Tensor) -> torch.Tensor:
    return z.contiguous(memory_format=torch.channels_last) if net.channels_last else z


def _output_padding(full: torch.Size, half: torch.Size) -> tuple[int, int]:
    """output_padding making a stride-2, k=3, p=1 transposed conv map ``half`` to ``full``."""
    return full[0] - (2 * half[0] - 1), full[1] - (2 * half[1] - 1)


def input_gradient(net: FoldedREDNet, e: torch.Tensor, go: torch.Tensor,
                   pre: list[torch.Tensor]) -> torch.Tensor:
    """dr/dy from the state :func:`forward_saved` returns (any subset of its rows)."""
    n_enc = len(net.encoder)
    g = F.conv2d(go.to(net.head_weight.dtype), net.head_weight, stride=2, padding=1)
    skip_grads: dict[int, torch.Tensor] = {}
    for k in range(len(net.decoder) - 1, -1, -1):
        blk = net.decoder[k]
        g = _relu_back(g.to(blk.weight.dtype), pre[n_enc + k], blk)
        if blk.skip_from is not None:
            sg = g * blk.skip_scale
            prev = skip_grads.get(blk.skip_from)
            skip_grads[blk.skip_from] = sg if prev is None else prev + sg
        g = F.conv2d(g, blk.grad_weight, padding=1)
    for i in range(n_enc - 1, -1, -1):
        blk = net.encoder[i]
        if i in skip_grads:
            g = g + skip_grads.pop(i)
        g = _relu_back(g.to(blk.weight.dtype), pre[i], blk)
        if blk.stride > 1:
            g = F.conv_transpose2d(g, blk.grad_weight, stride=blk.stride, padding=1,
                                   output_padding=_output_padding(e.shape[-2:], g.shape[-2:]))
        else:
            g = F.conv2d(g, blk.grad_weight, padding=1)
    return e + go + g.to(e.dtype)


def _relu_back(g: torch.Tensor, z: torch.Tensor, blk: FoldedConv) -> torch.Tensor:
    if blk.sign is not None:
        g = g * blk.sign
    return torch.where(z > 0, g, torch.zeros_like(g))


class StepGraph(nn.Module):
    """Per-image reconstruction error r(y) (N,) and its input gradient dr/dy (N, C, H, W).

    A frozen copy of ``dae`` with BatchNorm folded, written without autograd (see module doc),
    so it can be exported and compiled. ``dtype`` sets the convolutions' precision (float32,
    bfloat16, float16 or float64); r and dr/dy are float32 (float64 for float64 inputs).

    Example::

        graph = StepGraph(dae).eval()
        r, grad = graph(torch.rand(8, 1, 28, 28))
    """

    def __init__(self, dae: REDNet, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.net = fold_rednet(dae, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the body's convolutions."""
        return self.net.encoder[-1].weight.dtype

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, r, e, go, pre = forward_saved(self.net, y)
        return r, input_gradient(self.net, e, go, pre)

    def residual(self, y: torch.Tensor):
        """r and the state for :meth:`gradient` (to take gradients of a subset of rows)."""
        _, r, e, go, pre = forward_saved(self.net, y)
        return r, e, go, pre

    def gradient(self, e: torch.Tensor, go: torch.Tensor, pre: list[torch.Tensor]):
        return input_gradient(self.net, e, go, pre)


def autograd_step(dae: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r(y) and dr/dy by autograd: what :class:`StepGraph` must equal (tests use it)."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        d = (y - dae(y)).flatten(1)
        r = (d * d).sum(1)
        (g,) = torch.autograd.grad(r.sum(), y)
    return r.detach(), g
