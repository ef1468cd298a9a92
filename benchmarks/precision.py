"""Precision: the default's fine-tune and evaluation in float32 and in bf16 autocast.

Needs the default's plain seed-0 training set and held-out samples (`snakemake --cores 2
results/smollm2/ratio0/seed0/train.jsonl results/smollm2/heldout/context_free.jsonl`).
- The limit of each precision here (machine_limit.py) and what `auto` picks.
- A fine-tune: `cfs.train.fine_tune` with the fine_tune rule's settings for that cell (its
  forgetting curves included), once per precision per round, alternating.
- An evaluation: `cfs.evaluate.evaluate` of the base model with the evaluate_finetuned
  rule's settings, KL to base included; the two precisions' scores side by side.
Each run's share of its own precision's limit: the matrix-product FLOPs of the positions its
model computed (forward hooks; 3x a forward's for a position trained on) over its seconds.
--profile: the top operators of one bf16 run of each. --quick: a tiny random model, 2
optimizer steps, 8 items a task, one round.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import _common as common
from machine_limit import machine_limit

PRECISIONS = ("float32", "bfloat16")
STAGES = ("fine-tune", "evaluation")
# the default's plain seed-0 training set and held-out samples, under results/
DATA = {"data": "smollm2/ratio0/seed0/train.jsonl", "heldout": "smollm2/heldout/context_free.jsonl"}


class MatmulCounter:
    """Matrix-product FLOPs of every forward of `model`."""

    def __init__(self, model):
        self.body, self.head = common.matmul_weights(model)
        self.flops = 0.0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.flops += ids.numel() * 2 * (self.body + self.head) * (3 if module.training else 1)


def fine_tune_run(model_dir: Path, inputs: dict, settings: dict, precision: str, work: Path):
    """cfs.train.fine_tune; `inputs`: its training set (data), held-out samples, target test."""
    import cfs.train as train

    stamp, settings = time.monotonic_ns(), {**settings, "precision": precision}
    out, checkpoints = work / f"model-{stamp}", work / f"ckpt-{stamp}"
    with common.spy(train, "load_model", then=MatmulCounter) as loads:
        summary = train.fine_tune(
            model_dir, settings=settings, checkpoints=checkpoints, out=out, **inputs
        )
    shutil.rmtree(out, ignore_errors=True)
    return {"flops": loads[0][0].flops, "precision": summary["precision"]}


def evaluation_run(model_dir: Path, settings: dict, precision: str, heldout: Path):
    import lm_eval
    from cfs import evaluate

    settings = {**settings, "precision": precision}
    with (
        common.spy(lm_eval, "simple_evaluate") as outputs,
        common.spy(evaluate, "load_model", then=MatmulCounter) as loads,
    ):
        record = evaluate.evaluate(model_dir, settings, model_dir, heldout, None)
    # lm-eval's model (cfs-hf) runs the LM head only where a token is read
    body, head = loads[0][0].body, loads[0][0].head
    requests = record["requests"]
    flops = 2 * body * requests["layer_positions"] + 2 * head * requests["head_positions"]
    return {
        "flops": flops + sum(counter.flops for counter, _ in loads),
        "precision": record["lm_eval_settings"]["precision"],
        "parts": record["seconds"],
        "metrics": record["metrics"],
        "items": record["items"],
        "samples": {task: s for output, _ in outputs for task, s in output["samples"].items()},
    }


def main() -> None:
    parser = common.arguments(__doc__, "--rounds", "--threads")
    parser.add_argument("--profile", action="store_true", help="top operators of bf16 runs")
    args = parser.parse_args()
    threads = common.setup(args)
    from cfs.artifacts import read_jsonl, write_jsonl
    from cfs.modeling import compute_precision

    work = Path(tempfile.mkdtemp(prefix="cfs-bench-precision-"))
    stages = common.stage_settings()
    train_settings = stages.train("ratio0", 0)
    eval_settings = stages.evaluation("smollm2", "ratio0", 0)
    model_dir = common.model_folder(args, work)
    root = common.scratch_study(work) if args.quick else common.REPO
    inputs = {key: root / "results" / path for key, path in DATA.items()}
    task_data = root / "results" / "data" / stages.config["task"]["name"]
    inputs["target_test"] = task_data / "test.jsonl"
    if args.quick:
        train = read_jsonl(task_data / "train.jsonl")[:8]
        write_jsonl(inputs["data"], [{**record, "kind": "task"} for record in train])
        sample = {"prompt_token_id": 1, "token_ids": list(range(3, 19)), "finish_reason": "length"}
        write_jsonl(inputs["heldout"], [sample] * 4)
        train_settings.update(batch_size=4, micro_batch_size=4, curve_every=1)
        eval_settings["limit"] = 8
    if missing := [path for path in inputs.values() if not path.is_file()]:
        raise SystemExit(f"run the default's data first (module docstring): no {missing[0]}")
    limit = machine_limit(quick=args.quick)
    auto = compute_precision("auto", "cpu")
    print(
        f"limit on {threads} threads: float32 {limit['float32'] / 1e9:.0f}, bfloat16 "
        f"{limit['bfloat16'] / 1e9:.0f} GFLOP/s ({limit['bfloat16'] / limit['float32']:.1f}x); "
        f"precision auto here: {auto}"
    )
    runners = {
        "fine-tune": lambda p: fine_tune_run(model_dir, inputs, train_settings, p, work),
        "evaluation": lambda p: evaluation_run(model_dir, eval_settings, p, inputs["heldout"]),
    }
    variants = {
        f"{stage} {p}": partial(run, p) for p in PRECISIONS for stage, run in runners.items()
    }
    try:
        runs = common.alternate(variants, 1 if args.quick else args.rounds or 2)
        if args.profile:
            from torch.profiler import profile

            for stage in STAGES:
                with profile() as profiled:
                    variants[f"{stage} bfloat16"]()
                print(f"\n{stage} in bfloat16, top operators by self CPU time:")
                print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures, rows = {}, []
    for name, done in runs.items():
        chosen = common.best(done)
        share = chosen["flops"] / chosen["seconds"] / limit[name.split()[-1]]
        keys = ("seconds", "all_seconds", "flops", "precision", "parts")
        figures[name] = {key: chosen[key] for key in keys if key in chosen}
        figures[name]["share_of_limit"] = share
        seconds, tflop = f"{chosen['seconds']:.1f}", f"{chosen['flops'] / 1e12:.2f}"
        rows.append([name, chosen["precision"], seconds, tflop, f"{share:.0%}"])
    print(common.table(rows, ["run", "computed in", "best s", "TFLOP", "of its limit"]))
    ratios = {
        stage: common.round_ratios(runs, f"{stage} float32", f"{stage} bfloat16")
        for stage in STAGES
    }
    for stage, ratio in ratios.items():
        print(f"{stage}: bf16 {ratio['median']:.2f}x faster (rounds {ratio['per_round']})")
    fp32, bf16 = common.best(runs["evaluation float32"]), common.best(runs["evaluation bfloat16"])
    scores = common.compare_evaluations(fp32, bf16)
    for metric in ("forgetting_avg", "target"):
        scores[f"{metric}_points"] = 100 * abs(fp32["metrics"][metric] - bf16["metrics"][metric])
    scores["kl_to_base"] = abs(fp32["metrics"]["kl_to_base"] - bf16["metrics"]["kl_to_base"])
    print(f"bf16 against float32 scores: {common.listing(scores)}")
    figures = {"runs": figures, "ratios": ratios, "scores": scores, "auto": auto}
    figures["limit"] = {precision: limit[precision] for precision in PRECISIONS}
    figures |= {"threads": threads, "train_settings": train_settings}
    common.report("precision", figures, args.json)


if __name__ == "__main__":
    main()
