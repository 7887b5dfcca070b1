"""Knowledge distillation (Hinton; DeLVM's kd_config), masked to valid positions.

loss = w_gt * CE(student, labels) + w_kd * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The KL is averaged over the positions that have a label (DeLVM's code also averaged padding);
the teacher runs in eval mode without gradients on the same batch (not at all when w_kd = 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from delvm.errors import DelvmError
from delvm.model.checkpoint import load_model, read_checkpoint_config
from delvm.model.hf import is_hf_folder
from delvm.model.transformer import VisualLM

IGNORE = -100  # the label of a position without one (cross_entropy's ignore_index)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    w_gt: float = 1.0,
    w_kd: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (total, loss_gt, loss_kd); logits [..., V], labels [...] (ignore_index = no label).
    Without teacher logits (w_kd = 0) loss_kd is 0."""
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).float()
    labels = labels.reshape(-1)
    loss_gt = F.cross_entropy(student, labels, ignore_index=ignore_index)
    if teacher_logits is None:
        return w_gt * loss_gt, loss_gt, torch.zeros_like(loss_gt)
    teacher = teacher_logits.reshape(-1, vocab).float()
    valid = labels != ignore_index
    log_p_student = F.log_softmax(student[valid] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher[valid] / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    loss_kd = temperature**2 * kl
    return w_gt * loss_gt + w_kd * loss_kd, loss_gt, loss_kd


def load_teacher(
    path: str, student: VisualLM, device: torch.device, fingerprint: str | None
) -> VisualLM:
    """Load the teacher strictly, frozen in eval mode; it must speak the student's token ids.

    Checked: the number of codes; the tokenizer fingerprint when both sides record one (delvm
    checkpoints do; Hugging Face folders don't); the frozen codebooks when both embed with one.
    """
    teacher = load_model(path, device)
    problem = None
    if teacher.config.codes != student.config.codes:
        problem = f"{teacher.config.codes} codes vs the student's {student.config.codes}"
    elif not is_hf_folder(Path(path)):
        theirs = read_checkpoint_config(path)[1]["tokenizer"]["fingerprint"]
        if theirs and fingerprint and theirs != fingerprint:
            problem = f"tokenizer {theirs[:12]} vs this run's {fingerprint[:12]}"
    both_codebook = student.config.embedding == teacher.config.embedding == "codebook"
    same_codebook = not both_codebook or torch.equal(
        teacher.embed.codebook.cpu(), student.embed.codebook.cpu()
    )
    if problem is None and not same_codebook:
        problem = "a different frozen codebook"
    if problem:
        raise DelvmError(f"{path}: teacher and student must share the tokenizer ({problem})")
    teacher.eval().requires_grad_(False)
    return teacher
