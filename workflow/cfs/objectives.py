"""What fine-tuning minimises besides the task loss: the regularisers of the study's
methods, each a term added to the Trainer's loss with its weight lambda.

Each method of cfs.study.METHODS names its objective (`Method.trains`); OBJECTIVES maps
that name to an Objective class, which says everything cfs.train, cfs.trainer,
cfs.distributed and cfs.budget need of it. A method with a loss term of its own is a
Method in cfs.study and an Objective registered here (`@objective("name")`).

- Full fine-tuning: the task loss alone. LoRA: the same, through adapters on a frozen base.

- L2 toward the original weights: sum((theta - theta0)^2), divided by n_params with
  `methods.l2.reduction: mean`.
- Weighted synthetic loss: the negative log-likelihood of a batch of synthetic samples,
  a separate term instead of mixed examples (the paper's objective with explicit lambda).
- KL to base: on synthetic samples, the token-level KL(base || model) against a frozen
  copy of the base model (memory: a second model's weights plus its logits per batch; the
  float32 log-probabilities one chunk of positions at a time, `token_kl`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cfs.cli import require
from cfs.distributed import (
    fsdp_load_device,
    gather,
    process_rank,
    reads_weights,
    world_size,
)
from cfs.errors import SettingsError
from cfs.examples import padding_collator
from cfs.modeling import autocast, load_model
from cfs.tokens import IGNORE_INDEX, batch_seed

log = logging.getLogger("cfs.objectives")
L2_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class TrainingInputs:
    """What an objective may load for its term: the cell's method settings
    (settings["method"]), the train settings, the base model's folder, the synthetic
    examples of a method with a synthetic term (cfs.study.Method.synthetic_term), the
    tokenizer, the Trainer's arguments and this process's device."""

    method: dict
    settings: dict
    model_dir: Path
    synthetic: list[dict] | None
    tokenizer: object
    args: object
    device: torch.device


class Objective:
    """What a method trains: the task loss alone (full fine-tuning), or a subclass's term
    beside it, weighted by the method's lambda.

    Declared on the class (before any model is loaded):
    - `trains_base_weights`: False where the base weights stay frozen (LoRA): they are
      loaded in bfloat16 on a GPU (cfs.distributed.weights_dtype), and the budget counts
      no weight gradients and adapter-sized checkpoints (cfs.budget);
    - `base_forwards`: forwards of a frozen base model per token of the synthetic term (its
      FLOPs and, under FSDP, its all-gathers in cfs.budget);
    - `prepare_model(model, method, seed)`: the model that trains (LoRA: with adapters);
    - `build(inputs)`: the term (an instance, with what it loaded), or None for none.
    The term (an instance):
    - `name`: its key in the training log; `separate_backward`: its own forward and
      backward after the task's (a call returns (term, share of the step)) instead of a
      term added to the task loss (a call returns the term);
    - `attach(trainer)`: once the Trainer has wrapped (sharded) the model, before a
      checkpoint is loaded;
    - `__call__(model, step, micro_step)`: the term at this micro-step;
    - `logged(value, weight, loss)`: its entries in the log, its share of the loss among
      them (cfs.trainer.term_record); `summary()`: what the run's summary records of it."""

    name: str | None = None
    separate_backward = False
    trains_base_weights = True
    base_forwards = 0

    @classmethod
    def prepare_model(cls, model, method: dict, seed: int):
        return model

    @classmethod
    def build(cls, inputs: TrainingInputs) -> Objective | None:
        return None

    def attach(self, trainer) -> None:
        pass

    def __call__(self, model, step: int, micro_step: int):
        raise NotImplementedError

    def logged(self, value: float, weight: float, loss: float) -> dict:
        weighted = weight * value
        return {
            self.name: value,
            f"{self.name}_weighted": weighted,
            f"{self.name}_share": weighted / loss if loss else 0.0,
        }

    def summary(self) -> dict:
        return {}


OBJECTIVES: dict[str, type[Objective]] = {}


def objective(name: str):
    """Registers an Objective class under `name`, the value of Method.trains that picks it."""

    def register(cls: type[Objective]) -> type[Objective]:
        OBJECTIVES[name] = cls
        return cls

    return register


def objective_for(trains: str) -> type[Objective]:
    """The Objective class a method names (cfs.study.Method.trains)."""
    if trains not in OBJECTIVES:
        raise SettingsError(
            f"objective {trains!r} is not one of {', '.join(sorted(OBJECTIVES))} "
            "(cfs.objectives.OBJECTIVES)"
        )
    return OBJECTIVES[trains]


@objective("full")
class TaskLoss(Objective):
    """Full fine-tuning: the task loss alone, every weight trains."""


def add_lora(model, method: dict, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(seed)  # the adapters' random init: the same in every process and every run
    rank = require(method, "rank")
    config = LoraConfig(
        r=rank,
        lora_alpha=method["alpha"] or rank,  # null: alpha = rank
        lora_dropout=method["dropout"],
        target_modules=require(method, "target_modules"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@objective("lora")
class LoRA(Objective):
    """The task loss through low-rank adapters (methods.lora); the base weights stay frozen."""

    trains_base_weights = False

    @classmethod
    def prepare_model(cls, model, method: dict, seed: int):
        return add_lora(model, method, seed)


@objective("l2")
class L2ToInitial(Objective):
    """sum((theta - theta0)^2) over the parameters that train, divided by their number
    when `reduction` is 'mean' (methods.l2.reduction).

    The reference is taken by `setup` on the parameters the optimizer updates, after the
    Trainer has wrapped the model and before a checkpoint is loaded: under FSDP2 these are
    the sharded parameters (`fully_shard` replaces every parameter object), so each process
    keeps only its own shard of theta0 and computes its shard's part of the sum. The value
    is summed over the processes (one scalar all-reduce) while the gradient stays local:
    each process's shard gets exactly d/dtheta of the global term. Under DDP (or one
    process) every process holds whole parameters and computes the whole term."""

    name = "l2"
    separate_backward = False

    def __init__(self, reduction: str):
        if reduction not in L2_REDUCTIONS:
            raise SettingsError(
                f"methods.l2.reduction {reduction!r} is not one of {', '.join(L2_REDUCTIONS)}"
            )
        self.reduction = reduction
        self.pairs: list | None = None
        self.num_params = 0
        self.sharded = False

    @classmethod
    def build(cls, inputs: TrainingInputs) -> L2ToInitial:
        # the reference is taken once the model is wrapped (attach)
        return cls(require(inputs.method, "reduction"))

    def attach(self, trainer) -> None:
        """The reference: the base weights, on the parameters that train."""
        if not self.ready:
            self.setup(trainer.trainable_parameters())

    @property
    def ready(self) -> bool:
        return self.pairs is not None

    def setup(self, parameters) -> None:
        self.pairs = []
        for parameter in parameters:
            if not parameter.requires_grad:
                continue
            self.sharded = self.sharded or _is_dtensor(parameter)
            self.pairs.append((parameter, _local(parameter).detach().clone()))
            self.num_params += parameter.numel()  # a DTensor's numel is the whole tensor's
        if not self.pairs:
            raise ValueError("L2 toward the original weights: no parameter trains")

    def __call__(self, model, step: int, micro_step: int) -> torch.Tensor:
        if self.pairs is None:
            raise RuntimeError("L2ToInitial.setup was not called before training")
        local = sum(
            ((_local(parameter).float() - reference.float()) ** 2).sum()
            for parameter, reference in self.pairs
        )
        if self.sharded and dist.is_available() and dist.is_initialized():
            total = local.detach().clone()
            dist.all_reduce(total)
            local = local + (total - local.detach())  # value: the global sum; gradient: local
        return local / self.num_params if self.reduction == "mean" else local


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(tensor, DTensor)


def _local(tensor):
    """This process's shard of a DTensor (differentiable), the tensor itself otherwise."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


class SyntheticBatches:
    """The synthetic samples of each optimizer step, for the weighted-synthetic and
    KL-to-base terms: `per_step` samples per optimizer step (round(ratio x train.batch_size):
    the ratio holds for the global batch), split evenly over the processes, each process
    taking its own disjoint slice and spreading it over its `accumulation` micro-steps (a
    micro-step may get none when the slice is smaller than the accumulation steps; it is
    then the same micro-step on every process, so no process runs a forward the others do
    not). Positions in training map to the pool through a seeded permutation per pass over
    the pool, so a resumed run draws the same samples as an uninterrupted one and the
    samples of one step are distinct (unless the pool is smaller than a step)."""

    def __init__(
        self,
        examples: list[dict],
        per_step: int,
        accumulation: int,
        seed: int,
        collator,
        rank: int = 0,
        world: int = 1,
    ):
        if not examples:
            raise ValueError("no synthetic examples for the synthetic loss term")
        if per_step < 1 or per_step % world:
            raise ValueError(
                f"{per_step} synthetic samples per optimizer step cannot be split evenly over "
                f"{world} processes"
            )
        self.examples = examples
        self.per_step = per_step
        self.per_process = per_step // world
        self.accumulation = accumulation
        self.seed = seed
        self.collator = collator
        self.rank = rank
        self._order: tuple[int, list[int]] | None = None

    def _pool_index(self, position: int) -> int:
        cycle, offset = divmod(position, len(self.examples))
        if self._order is None or self._order[0] != cycle:
            order = list(range(len(self.examples)))
            random.Random(batch_seed(self.seed, cycle)).shuffle(order)
            self._order = (cycle, order)
        return self._order[1][offset]

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Pool indices of this process's samples at (optimizer step, micro-step)."""
        low = self.per_process * micro_step // self.accumulation
        high = self.per_process * (micro_step + 1) // self.accumulation
        start = step * self.per_step + self.rank * self.per_process
        return [self._pool_index(start + k) for k in range(low, high)]

    def share(self, step: int, micro_step: int) -> float:
        """This micro-step's share of the process's samples in the step (sums to 1)."""
        return len(self.indices(step, micro_step)) / self.per_process

    def batch(self, indices: list[int], device) -> dict:
        batch = self.collator([self.examples[i] for i in indices])
        return {key: value.to(device) for key, value in batch.items()}


@objective("weighted_synthetic")
class WeightedSyntheticLoss(Objective):
    """NLL of the step's synthetic samples: each micro-step's mean token NLL weighted by
    its share of the step's samples, so the gradient over a step (averaged over the
    processes by DDP/FSDP) is that of the mean over all `per_step` samples. Run as its own
    forward and backward after the task's (the two graphs never coexist)."""

    name = "synthetic_nll"
    separate_backward = True

    def __init__(self, batches: SyntheticBatches):
        self.batches = batches
        self.drawn: dict[int, list[int]] = {}

    @classmethod
    def build(cls, inputs: TrainingInputs) -> WeightedSyntheticLoss:
        return cls(synthetic_batches(inputs))

    def summary(self) -> dict:
        return {"synthetic_term": synthetic_draws(self)}

    def draw(self, step: int, micro_step: int) -> list[int]:
        indices = self.batches.indices(step, micro_step)
        self.drawn.setdefault(step, []).extend(indices)
        return indices

    def __call__(self, model, step: int, micro_step: int):
        """(term, share of the step), or (None, 0) for a micro-step without samples."""
        indices = self.draw(step, micro_step)
        if not indices:
            return None, 0.0
        batch = self.batches.batch(indices, _device(model))
        return model(**batch).loss, len(indices) / self.batches.per_process


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _chunk_kl(base_logits: torch.Tensor, model_logits: torch.Tensor, weight: torch.Tensor):
    """Sum over positions of weight x KL(base || model), in float32."""
    target = F.log_softmax(base_logits.float(), dim=-1)
    current = F.log_softmax(model_logits.float(), dim=-1)
    per_position = F.kl_div(current, target, log_target=True, reduction="none").sum(-1)
    return (per_position * weight).sum()


def token_kl(
    base_logits, model_logits, labels, chunk: int = 1024, reduction: str = "mean"
) -> torch.Tensor:
    """Mean (or, with reduction="sum", sum) over trained positions of KL(base || model) of
    the next-token distributions: position t predicts token t+1, and counts where the label
    of t+1 is not IGNORE_INDEX.

    In chunks of `chunk` positions of one sequence, each checkpointed when a gradient is
    wanted: a chunk's float32 log-probabilities (for 8192 positions of a 128k vocabulary,
    4 GB each over the whole sequence) exist only while that chunk is computed, in the
    forward pass and again, one chunk at a time, in the backward pass. The backward pass
    keeps only the two logits tensors themselves (slices of them, never copies), not one
    float32 tensor per chunk: the same values and gradients as without chunks."""
    from torch.utils.checkpoint import checkpoint

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    weights = (labels[:, 1:] != IGNORE_INDEX).to(torch.float32)
    recompute = torch.is_grad_enabled() and model_logits.requires_grad
    total = model_logits.new_zeros((), dtype=torch.float32)
    positions = weights.shape[1]
    for row in range(weights.shape[0]):
        for start in range(0, positions, chunk):
            end = min(start + chunk, positions)
            pieces = (
                base_logits[row, start:end],
                model_logits[row, start:end],
                weights[row, start:end],
            )
            if recompute:
                part = checkpoint(_chunk_kl, *pieces, use_reentrant=False)
            else:
                part = _chunk_kl(*pieces)
            total = total + part
    return total if reduction == "sum" else total / weights.sum().clamp(min=1)


@objective("kl_to_base")
class KLToBase(WeightedSyntheticLoss):
    """Token-level KL(base || model) on the step's synthetic samples against a frozen base
    model; drawn, weighted and back-propagated like WeightedSyntheticLoss. Under FSDP the
    base model is sharded like the model that trains (`setup`), so no process holds a
    whole second copy of the weights."""

    name = "kl_to_base"
    base_forwards = 1

    def __init__(self, batches: SyntheticBatches, base_model, precision: str = "float32"):
        super().__init__(batches)
        self.base_model = base_model.eval().requires_grad_(False)
        self.sharded = False
        # the model that trains computes under accelerate's autocast; the frozen base,
        # which accelerate never wraps, computes in the same precision
        self.precision = precision

    @classmethod
    def build(cls, inputs: TrainingInputs) -> KLToBase:
        batches = synthetic_batches(inputs)
        args, device = inputs.args, inputs.device
        # Under FSDP the base model is loaded on the CPU and sharded with the model that
        # trains (attach), never whole on one GPU.
        if not reads_weights(args):
            log.info(
                "process %d: the model without its weights (rank 0 reads them)", process_rank()
            )
        base = load_model(
            inputs.model_dir,
            "float32" if device.type == "cpu" else "bfloat16",
            fsdp_load_device(args, device),
            weights=reads_weights(args),
        )
        return cls(batches, base, "bfloat16" if args.bf16 else "float32")

    def attach(self, trainer) -> None:
        if trainer.is_fsdp_enabled:
            self.shard_base(trainer.accelerator)

    def shard_base(self, accelerator) -> None:
        """Shard the frozen base model over the processes as accelerate shards the model
        that trains (FSDP2: one unit per decoder layer, weights loaded once by rank 0 when
        cpu_ram_efficient_loading is on). Once: a second call leaves it as it is."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if self.sharded:
            return
        self.base_model = fsdp2_prepare_model(accelerator, self.base_model).eval()
        self.sharded = True

    def __call__(self, model, step: int, micro_step: int):
        indices = self.draw(step, micro_step)
        if not indices:
            return None, 0.0
        device = _device(model)
        batch = self.batches.batch(indices, device)
        labels = batch.pop("labels")
        with torch.no_grad(), autocast(self.precision, device):
            base_logits = self.base_model(**batch).logits
        # both logits are cast to float32 before their log-softmax (_chunk_kl)
        term = token_kl(base_logits, model(**batch).logits, labels)
        return term, len(indices) / self.batches.per_process


def synthetic_draws(term: WeightedSyntheticLoss) -> dict:
    """What the synthetic term drew in this run, over all processes: samples per optimizer
    step (configured: round(ratio x train.batch_size)) and how many of them were distinct."""
    steps: dict[int, list[int]] = {}
    for part in gather(term.drawn):
        for step, indices in part.items():
            steps.setdefault(int(step), []).extend(indices)
    counts = sorted({len(indices) for indices in steps.values()})
    distinct = sorted({len(set(indices)) for indices in steps.values()})
    return {
        "samples_per_step": term.batches.per_step,
        "steps": len(steps),
        "drawn_per_step": counts,
        "distinct_per_step": distinct,
    }


def synthetic_batches(inputs: TrainingInputs) -> SyntheticBatches:
    """The synthetic samples each optimizer step draws: round(ratio x train.batch_size)."""
    method, settings = inputs.method, inputs.settings
    ratio, batch_size = require(method, "ratio"), require(settings, "batch_size")
    per_step = round(ratio * batch_size)
    if per_step < 1 or per_step % world_size():
        raise SettingsError(
            f"methods.{method['name']}: ratio {ratio} x train.batch_size {batch_size} gives "
            f"{per_step} synthetic samples per optimizer step; it must be at least 1 and "
            f"a multiple of the {world_size()} processes (each draws its own share)"
        )
    return SyntheticBatches(
        inputs.synthetic,
        per_step=per_step,
        accumulation=inputs.args.gradient_accumulation_steps,
        seed=require(settings, "seed"),
        collator=padding_collator(inputs.tokenizer),
        rank=process_rank(),
        world=world_size(),
    )
