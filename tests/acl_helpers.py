"""ACL models with a hand-computable output, for tests of training, evaluation and engines."""

from __future__ import annotations

import torch


def constant_decoder_logits(model: torch.nn.Module, logit: float, w: float, b: float) -> None:
    """Make the CLIPSeg decoder output ``logit`` at every pixel (last transposed convolution: zero weights, bias
    ``logit``) and set the masker's scalars: the heatmap is then ``sigmoid(logit + b / w)`` everywhere and the
    hard training mask ``[w * logit + b + logistic noise > 0]`` is all ones (or zeros) when ``|w logit + b|`` is
    above the noise's float32 range (|log(u / (1 - u))| < 17)."""
    conv = model.av_grounder.decoder.transposed_convolution
    last = conv[-1] if isinstance(conv, torch.nn.Sequential) else conv
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)
        model.masker_i.w.fill_(w)
        model.masker_i.b.fill_(b)
