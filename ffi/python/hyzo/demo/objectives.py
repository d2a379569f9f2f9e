"""The unlearning objectives: GradDiff and NPO, each with a retain term."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import answer_logits


def _answers(model: nn.Module, forget: torch.Tensor, retain: torch.Tensor) -> tuple:
    """Answer logits of the forget set and a retain batch, in one forward pass."""
    logits = answer_logits(model, torch.cat([forget, retain]))
    return logits[: len(forget)], logits[len(forget):]


def graddiff_loss(model, forget, retain, ref_logprob):
    lf, lr = _answers(model, forget, retain)
    return -F.cross_entropy(lf, forget[:, 4]) + F.cross_entropy(lr, retain[:, 4])


def npo_loss(model, forget, retain, ref_logprob, beta: float = 0.5):
    lf, lr = _answers(model, forget, retain)
    ratio = F.log_softmax(lf, -1).gather(1, forget[:, 4:5]).squeeze(1) - ref_logprob
    npo = -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()
    return npo + F.cross_entropy(lr, retain[:, 4])


OBJECTIVES = {"GradDiff": graddiff_loss, "NPO": npo_loss}
