"""What fine-tuning minimises besides the task loss: the regularisers of the study's
methods, each a term added to the Trainer's loss with its weight lambda.

- L2 toward the original weights: sum((theta - theta0)^2) / n_params.
- Weighted synthetic loss: the negative log-likelihood of a batch of synthetic samples,
  a separate term instead of mixed examples (the paper's objective with explicit lambda).
- KL to base: on synthetic samples, the token-level KL(base || model) against a frozen
  copy of the base model (memory: a second model's weights plus its logits per batch).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class L2ToInitial:
    name = "l2"

    def __init__(self, model):
        # Parameter objects stay the same when a wrapper (DDP) is put around the model.
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
        self.num_params = sum(reference.numel() for _, reference in self.pairs)

    def __call__(self, model, step: int, micro_step: int) -> torch.Tensor:
        total = sum(((p - reference) ** 2).sum() for p, reference in self.pairs)
        return total / self.num_params


class SyntheticBatches:
    """Batches drawn from a pool in a seeded order that depends only on the position in
    training, so a resumed run draws the same batches as an uninterrupted one."""

    def __init__(self, examples: list[dict], batch_size: int, seed: int, collator):
        if not examples:
            raise ValueError("no synthetic examples for the synthetic loss term")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.collator = collator

    def indices(self, position: int) -> list[int]:
        size = len(self.examples)
        out = []
        for slot in range(position * self.batch_size, (position + 1) * self.batch_size):
            cycle, offset = divmod(slot, size)
            order = list(range(size))
            random.Random(self.seed * 1_000_003 + cycle).shuffle(order)
            out.append(order[offset])
        return out

    def batch(self, position: int, device) -> dict:
        batch = self.collator([self.examples[i] for i in self.indices(position)])
        return {key: value.to(device) for key, value in batch.items()}


class WeightedSyntheticLoss:
    name = "synthetic_nll"

    def __init__(self, batches: SyntheticBatches, accumulation: int):
        self.batches = batches
        self.accumulation = accumulation

    def __call__(self, model, step: int, micro_step: int) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = self.batches.batch(step * self.accumulation + micro_step, device)
        return model(**batch).loss


def token_kl(base_logits, model_logits, labels) -> torch.Tensor:
    """Mean over trained positions of KL(base || model) of the next-token distributions."""
    mask = labels[:, 1:] != IGNORE_INDEX
    base = F.log_softmax(base_logits[:, :-1][mask].float(), dim=-1)
    current = F.log_softmax(model_logits[:, :-1][mask].float(), dim=-1)
    return F.kl_div(current, base, log_target=True, reduction="batchmean")


class KLToBase:
    name = "kl_to_base"

    def __init__(self, batches: SyntheticBatches, accumulation: int, base_model):
        self.batches = batches
        self.accumulation = accumulation
        self.base_model = base_model.eval().requires_grad_(False)

    def __call__(self, model, step: int, micro_step: int) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = self.batches.batch(step * self.accumulation + micro_step, device)
        labels = batch.pop("labels")
        with torch.no_grad():
            base_logits = self.base_model(**batch).logits
        return token_kl(base_logits, model(**batch).logits, labels)
