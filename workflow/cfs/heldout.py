"""How far a model is from the base model on held-out context-free samples of the base: the
per-token KL(p_base || p_model) and the model's NLL of the sampled tokens. cfs.evaluate
measures them after fine-tuning, cfs.curves along it.

Position t of a sample predicts token t+1; only positions followed by a real token (not
padding) count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_CHUNK = 1024  # rows of float32 log-probabilities at a time (a 128k vocabulary: 0.5 GB)


def padded_batches(samples: list[dict], batch_size: int, pad_id: int = 0):
    """(input ids, attention mask) of each batch: the prompt token, then the sample."""
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        rows = [[sample["prompt_token_id"], *sample["token_ids"]] for sample in batch]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        yield ids, mask


@torch.no_grad()
def predicted_logprobs(model, ids: torch.Tensor, mask: torch.Tensor):
    """(log-probabilities, targets) at the positions followed by a real token, float32."""
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    keep = mask[:, 1:].bool().to(logits.device)
    targets = ids[:, 1:].to(logits.device)[keep]
    return F.log_softmax(logits[:, :-1][keep].float(), dim=-1), targets


def kl_and_nll_sums(base_logprobs, logprobs, targets) -> tuple[float, float, int]:
    """(sum of KL(base || model), sum of the model's NLL of `targets`, positions)."""
    kl = 0.0
    for start in range(0, logprobs.shape[0], KL_CHUNK):
        rows = slice(start, start + KL_CHUNK)
        kl += F.kl_div(logprobs[rows], base_logprobs[rows], log_target=True, reduction="sum").item()
    nll = -logprobs.gather(-1, targets[:, None]).sum().item()
    return kl, nll, int(targets.numel())


def summarise(kl: float, nll: float, count: int) -> dict[str, float]:
    if count == 0:
        raise ValueError("the held-out context-free samples hold no tokens")
    return {"kl_to_base": kl / count, "heldout_nll": nll / count, "heldout_tokens": count}
