"""lm-eval's Hugging Face model, computing each position once (registered as `cfs-hf`).

lm-eval stays the harness (task YAMLs, metrics, filters, logged samples); this subclass of
its HFLM changes only how the numbers are computed, for a decoder-only model:

- Log-likelihoods: the requests that share a context (the choices of one multiple-choice
  item) run the context once, keeping its keys and values, and then only each choice's
  tokens; the LM head and its log-softmax run only where a continuation token is scored.
  The stock model runs every (context, choice) pair whole, with the head at every position.
- Greedy generation: a row leaves the batch as soon as it has stopped (a stop sequence,
  the end-of-sequence token or max_gen_toks), instead of decoding until the batch's
  longest row stops; the text is cut at the stop sequences as lm-eval cuts it.

Anything else (sampled generation, seq2seq models, generation settings that HF generate
would apply beyond greedy decoding) goes to HFLM unchanged. The results are lm-eval's up to
the order of floating-point sums (tests/test_lm_eval_model.py).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm
from transformers import DynamicCache

NAME = "cfs-hf"
# generation_config settings HF generate would apply on top of greedy decoding
NOT_GREEDY = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


class PositionCounter:
    """Counts what a model computes, padding included: the positions its layers run
    (batch x length of every forward) and the rows its LM head scores."""

    def __init__(self, model):
        self.layers = 0
        self.head = 0
        body = getattr(model, model.base_model_prefix, model)
        self._hooks = [
            body.register_forward_pre_hook(self._count_layers, with_kwargs=True),
            model.get_output_embeddings().register_forward_hook(self._count_head),
        ]

    def _count_layers(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"][..., 0]
        self.layers += int(tokens.numel())

    def _count_head(self, module, args, output):
        self.head += int(output.shape[:-1].numel())

    def remove(self) -> dict[str, int]:
        for hook in self._hooks:
            hook.remove()
        return {"layer_positions": self.layers, "head_positions": self.head}


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from its first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@register_model(NAME)
class SharedPrefixHFLM(HFLM):
    """HFLM with shared contexts and early-stopping greedy rows (the module's docstring)."""

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        fits = [
            len(context) + len(continuation) <= self.max_length + 1
            for _, context, continuation in requests
        ]
        if self.backend != "causal" or self.batch_size == "auto" or not all(fits):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups = defaultdict(list)  # context tokens -> indices of its requests
        for index, (_, context, _) in enumerate(requests):
            groups[tuple(context)].append(index)
        # longest contexts first, as lm-eval orders its batches
        order = sorted(groups, key=lambda context: (-len(context), context))
        rows_per_batch = override_bs or self.batch_size
        results: list = [None] * len(requests)
        progress = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (shared contexts)",
        )
        batch: list[tuple] = []
        rows = 0
        for context in order:
            members = groups[context]
            if batch and rows + len(members) > rows_per_batch:
                self._score_contexts(batch, requests, results, progress)
                batch, rows = [], 0
            batch.append((context, members))
            rows += len(members)
        if batch:
            self._score_contexts(batch, requests, results, progress)
        progress.close()
        return results

    @torch.no_grad()
    def _score_contexts(self, batch, requests, results, progress) -> None:
        """Contexts once (left-padded, the head at the last position only), then every
        continuation on its context's keys and values (right-padded after it)."""
        pad_id = self.tokenizer.pad_token_id or 0
        ids, mask = left_padded([list(context) for context, _ in batch], pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        with self._autocast():
            last = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions(mask),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        members = [(group, index) for group, (_, indices) in enumerate(batch) for index in indices]
        owner = torch.tensor([group for group, _ in members], device=self.device)
        continuations = [requests[index][2] for _, index in members]
        # each continuation's first token is scored at its context's last position, the
        # others at the continuation's own positions (the head at those positions only)
        first = F.log_softmax(last[owner].float(), dim=-1)
        rest = [first.new_zeros((0, first.shape[-1])) for _ in members]
        width = max(len(continuation) for continuation in continuations) - 1
        if width:
            cache.reorder_cache(owner)
            tail = torch.full((len(members), width), pad_id, dtype=torch.long)
            tail_mask = torch.zeros((len(members), width), dtype=torch.bool)
            for row, continuation in enumerate(continuations):
                tail[row, : len(continuation) - 1] = torch.tensor(continuation[:-1])
                tail_mask[row, : len(continuation) - 1] = True
            tail, tail_mask = tail.to(self.device), tail_mask.to(self.device)
            start = mask.sum(-1)[owner, None]  # each row's context length
            with self._autocast():
                logits = self.model(
                    input_ids=tail,
                    attention_mask=torch.cat([mask[owner], tail_mask.long()], dim=1),
                    position_ids=start + torch.arange(width, device=self.device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=tail_mask,
                ).logits
            scored = F.log_softmax(logits.float(), dim=-1).split(tail_mask.sum(-1).tolist())
            rest = list(scored)
        for row, (_, index) in enumerate(members):
            continuation = continuations[row]
            logprobs = torch.cat([first[row, None], rest[row]])
            targets = torch.tensor(continuation, device=self.device)
            answer = (
                float(logprobs.gather(1, targets[:, None]).sum()),
                bool((logprobs.argmax(-1) == targets).all()),
            )
            results[index] = answer
            request_str = requests[index][0]
            if request_str is not None:  # loglikelihood_rolling caches per document
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            progress.update(1)

    # ------------------------------------------------------------------ greedy generation

    def _greedy_only(self) -> bool:
        config = self.model.generation_config
        return self.backend == "causal" and all(
            getattr(config, key, default) in (default, None, [], 1.0)
            for key, default in NOT_GREEDY.items()
        )

    def generate_until(self, requests, disable_tqdm=False):
        greedy = [
            not normalize_gen_kwargs(dict(request.args[1]), self.max_gen_toks)["do_sample"]
            for request in requests
        ]
        if not all(greedy) or not self._greedy_only() or self.batch_size == "auto":
            return super().generate_until(requests, disable_tqdm)
        by_settings = defaultdict(list)
        for index, request in enumerate(requests):
            by_settings[repr(sorted(request.args[1].items()))].append(index)
        results: list = [None] * len(requests)
        progress = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running generate_until requests (early stop)",
        )
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        think_end = self.think_end_token if isinstance(self.think_end_token, str) else None
        for indices in by_settings.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            contexts = {i: requests[i].args[0] for i in indices}
            # longest first, in batches tokenized as lm-eval tokenizes them
            lengths = {i: len(self.tok_encode(contexts[i])) for i in indices}
            ordered = sorted(indices, key=lambda i: (-lengths[i], contexts[i]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                ids, mask = self.tok_batch_encode(
                    [contexts[i] for i in chunk],
                    left_truncate_len=self.max_length - max_gen_toks,
                    truncation=self.truncation,
                )
                prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, mask, strict=True)]
                outputs = self._decode(prompts, until, max_gen_toks)
                for i, tokens in zip(chunk, outputs, strict=True):
                    text = postprocess_generated_text(
                        self.tok_decode(tokens), stop=until, think_end_token=think_end
                    )
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    progress.update(1)
        progress.close()
        return results

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], until: list[str], max_gen_toks: int):
        """Greedy continuations of the prompts; a row leaves the batch when it stops: at an
        end-of-sequence id of the model's generation config, after max_gen_toks tokens, or
        once a stop sequence is in its last tokens (lm-eval's MultiTokenEOSCriteria)."""
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        lookback = max(len(self.tok_encode(t, add_special_tokens=False)) for t in until) + 2
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = left_padded(prompts, pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))  # the prompt of each row of the batch
        step_ids, step_positions = ids, positions(mask)
        while True:
            with self._autocast():
                logits = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
            tokens = logits.argmax(-1).tolist()
            keep = []
            for row, (prompt, token) in enumerate(zip(active, tokens, strict=True)):
                generated[prompt].append(token)
                recent = self.tok_decode(generated[prompt][-lookback:], skip_special_tokens=False)
                stopped = (
                    token in eos_ids
                    or len(generated[prompt]) >= max_gen_toks
                    or any(term and term in recent for term in until)
                )
                if not stopped:
                    keep.append(row)
            if not keep:
                return generated
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.reorder_cache(index)
                mask, active = mask[index], [active[row] for row in keep]
                tokens = [tokens[row] for row in keep]
            step_positions = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids = torch.tensor(tokens, device=self.device)[:, None]

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )
