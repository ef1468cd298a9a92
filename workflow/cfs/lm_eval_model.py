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
the order of floating-point sums (tests/unit/test_lm_eval_model.py).
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


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own."""
    shortest = min(len(prompt) for prompt in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from its first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class SharedContext:
    """The requests of one context as one packed row: the context, then each continuation
    but its last token (which predicts nothing scored), every continuation attending to
    the context and to itself only, its positions following the context's. The first
    token of every continuation is scored at the context's last position."""

    def __init__(self, context: tuple, indices: list[int], requests):
        self.context = context
        self.tokens = list(context)
        self.segments = [0] * len(context)
        self.positions = list(range(len(context)))
        self.scored = [len(context) - 1]
        self._spans = {}
        for segment, index in enumerate(indices, start=1):
            continuation = requests[index][2]
            first = len(self.tokens)
            self.tokens += continuation[:-1]
            self.segments += [segment] * (len(continuation) - 1)
            self.positions += range(len(context), len(context) + len(continuation) - 1)
            self.scored += range(first, len(self.tokens))
            self._spans[index] = (first, continuation)
        self.length = len(self.tokens)

    def targets(self) -> dict[int, tuple[list[int], list[int]]]:
        """{request: (rows of this row's scored logits, the tokens they score)}."""
        rank = {position: row for row, position in enumerate(self.scored)}
        return {
            index: (
                [0] + [rank[p] for p in range(first, first + len(continuation) - 1)],
                list(continuation),
            )
            for index, (first, continuation) in self._spans.items()
        }


def shared_context_mask(segments: torch.Tensor, dtype) -> torch.Tensor:
    """(batch, 1, length, length) attention mask of packed SharedContext rows: causal,
    within the context (segment 0) and within each continuation, and from every
    continuation to the context. A padding position (-1) attends to itself only."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((query == key) | (key == 0)) & (query >= 0)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding: itself (no empty row)
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@register_model(NAME)
class SharedPrefixHFLM(HFLM):
    """HFLM with shared contexts and early-stopping greedy rows (the module's docstring)."""

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        fits = [
            len(context) + len(continuation) <= self.max_length + 1
            for _, context, continuation in requests
        ]
        packable = self.model.config._attn_implementation in ("sdpa", "eager")
        if self.backend != "causal" or self.batch_size == "auto" or not all(fits) or not packable:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups = defaultdict(list)  # context tokens -> indices of its requests
        for index, (_, context, _) in enumerate(requests):
            groups[tuple(context)].append(index)
        rows = [SharedContext(context, indices, requests) for context, indices in groups.items()]
        rows.sort(key=lambda row: (-row.length, row.context))  # longest first, as lm-eval
        # at most the positions of lm-eval's own largest batch: batch_size x longest request
        budget = (override_bs or self.batch_size) * max(
            len(context) + len(continuation) for _, context, continuation in requests
        )
        results: list = [None] * len(requests)
        progress = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (shared contexts)",
        )
        start = 0
        while start < len(rows):
            width = rows[start].length  # the longest row of the batch comes first
            count = max(1, min(len(rows) - start, budget // width))
            self._score_rows(rows[start : start + count], width, requests, results, progress)
            start += count
        progress.close()
        return results

    @torch.no_grad()
    def _score_rows(self, rows, width, requests, results, progress) -> None:
        """One forward of packed rows (SharedContext); the LM head at scored positions."""
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for index, row in enumerate(rows):
            ids[index, : row.length] = torch.tensor(row.tokens)
            segments[index, : row.length] = torch.tensor(row.segments)
            positions[index, : row.length] = torch.tensor(row.positions)
            scored[index, row.scored] = True
        with self._autocast():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=shared_context_mask(segments, self._mask_dtype()).to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=scored.to(self.device),
            ).logits
        logprobs = F.log_softmax(logits.float(), dim=-1).split(scored.sum(-1).tolist())
        for row, row_logprobs in zip(rows, logprobs, strict=True):
            for index, (picks, targets) in row.targets().items():
                chosen = row_logprobs[torch.tensor(picks, device=self.device)]
                targets = torch.tensor(targets, device=self.device)
                answer = (
                    float(chosen.gather(1, targets[:, None]).sum()),
                    bool((chosen.argmax(-1) == targets).all()),
                )
                results[index] = answer
                request_str = requests[index][0]
                if request_str is not None:  # loglikelihood_rolling caches per document
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                progress.update(1)

    def _mask_dtype(self):
        """SDPA takes a boolean mask; eager attention adds a float one."""
        if self.model.config._attn_implementation == "sdpa":
            return torch.bool
        return next(self.model.parameters()).dtype

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
        cache = DynamicCache()
        # the prompts' common beginning (a template's, few-shot examples) runs once
        shared = shared_prefix_length(prompts) if len(prompts) > 1 else 0
        if shared:
            with self._autocast():
                self.model(
                    input_ids=torch.tensor([prompts[0][:shared]], device=self.device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            cache.reorder_cache(torch.zeros(len(prompts), dtype=torch.long, device=self.device))
        ids, mask = left_padded([prompt[shared:] for prompt in prompts], pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        step_ids, step_positions = ids, shared + positions(mask)
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], dim=1)
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))  # the prompt of each row of the batch
        done: set[int] = set()  # stopped prompts whose rows are still in the batch
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
                if prompt in done:
                    continue
                generated[prompt].append(token)
                recent = self.tok_decode(generated[prompt][-lookback:], skip_special_tokens=False)
                stopped = (
                    token in eos_ids
                    or len(generated[prompt]) >= max_gen_toks
                    or any(term and term in recent for term in until)
                )
                if stopped:
                    done.add(prompt)
                else:
                    keep.append(row)
            if not keep:
                return generated
            # Stopped rows leave once they are a quarter of the batch: each compaction
            # copies the whole key-value cache, and a stopped row costs one position a step.
            if len(active) - len(keep) >= max(1, len(active) // 4):
                done.clear()
                index = torch.tensor(keep, device=self.device)
                cache.reorder_cache(index)
                mask, active = mask[index], [active[row] for row in keep]
                tokens = [tokens[row] for row in keep]
            else:  # stopped rows decode on, their tokens unused
                keep = list(range(len(active)))
            step_positions = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids = torch.tensor(tokens, device=self.device)[:, None]

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )
