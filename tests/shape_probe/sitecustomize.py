"""Test-only probe that makes any dependence on batch shape visible, on any machine.

When MRPO_SHAPE_PROBE is set to a number s, every linear layer of every model loaded through transformers'
from_pretrained (the base weights, not the LoRA layers peft adds later) adds to row t of its output, out of M rows
multiplied at once, the offset s * frac(0.618 M + 0.414 t), plus s inside a layer that torch.compile compiled.
Real kernels may round a row differently when the number of rows or the row's place in the matrix changes, or when
inductor fuses them; this probe always does, and by far more than rounding. Two computations of a response's
log-prob then agree bit for bit only if they gave every linear layer the same matrix, compiled or eager alike,
which is what the design promises. Python imports this file at start-up when its folder is on PYTHONPATH.
A `python -c` process is left alone: inductor's check of the CPU's vector instructions runs one that must not import
torch, and importing transformers there costs seconds for each of its checks.
"""

import os
import sys

if os.environ.get("MRPO_SHAPE_PROBE") and sys.argv[0] != "-c":
    import torch
    import transformers

    SCALE = float(os.environ["MRPO_SHAPE_PROBE"])

    def _probe(module, inputs, output):
        rows = output.shape[:-1].numel()
        t = torch.arange(rows, device=output.device, dtype=torch.float64)
        offset = ((0.6180339887 * rows + 0.4142135624 * t) % 1.0 + torch.compiler.is_compiling()) * SCALE  # (M,)
        return output + offset.to(output.dtype).view(*output.shape[:-1], 1)

    _from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__

    def _from_pretrained_with_probe(cls, *args, **kwargs):
        model = _from_pretrained(cls, *args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(_probe)
        return model

    transformers.PreTrainedModel.from_pretrained = classmethod(_from_pretrained_with_probe)
