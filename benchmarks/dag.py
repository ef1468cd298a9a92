"""The DAG: dry-run time of the full paper grid, its job count against the minimum, and the
jobs scheduled when one temperature is added to a finished grid.

    .venv/bin/python benchmarks/dag.py [--quick] [CONFIG ...]   # default: the paper configs

For each config file (merged over config/config.yaml, as `--configfile` does), in a
throw-away copy of the workflow's files (no results/):

1. the grid is widened to the full paper grid: every method the schema knows, and 4
   temperatures x 4 ratios (the config's own where it has 4 of each);
2. `snakemake -n` is timed (best and median of several runs; goal: under 5 s);
3. the jobs per rule are counted from its "Job stats" table and set against the minimum
   derived from the config alone: generation once per (model, temperature), base eval
   and held-out samples once per model, the ratio-0 set and fine-tune once per model,
   one mix / fine-tune / eval per grid cell, one table and one set of figures;
4. the grid is marked finished without running a model (every output of the dry run
   created as a placeholder, newer than its inputs, as a finished run leaves them), a dry
   run checks that nothing is scheduled, and one temperature is added: the jobs scheduled
   are set against the jobs that value needs (the minimum of the wider grid less the
   minimum of the finished one, plus the table, figures and `all` that read every cell).

--quick: config/quick.yaml's grid as it is (not widened), one timed dry run, steps 1-3.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from _common import (
    REPO,
    goal,
    load_config,
    merged,
    quick_mode,
    report,
    stall_seconds,
    table,
    wait_for_quiet,
)
from cfs.study import METHODS, Study, fmt, parse_cell, replay_sources

GOAL_SECONDS = 5.0
PAPER_TEMPERATURES = [0.5, 0.7, 1.0, 1.3]
PAPER_RATIOS = [0.0, 0.25, 0.5, 1.0]
AGGREGATORS = ("summary_table", "figures", "all")

# --------------------------------------------------------------------------- config


def all_methods(config: dict) -> list[str]:
    """Every method but plain fine-tuning (always run), and replay only where the config
    names a corpus to replay (a model whose pretraining data is not public has none)."""
    replayable = bool(replay_sources(config))
    return [name for name in METHODS if name != "plain" and (name != "replay" or replayable)]


def paper_grid(config: dict) -> dict:
    """The override that widens a config to the paper grid: every method, 4 x 4."""
    study = config["study"]
    temperatures = study["temperatures"] if len(study["temperatures"]) == 4 else PAPER_TEMPERATURES
    ratios = study["ratios"] if len(study["ratios"]) == 4 else PAPER_RATIOS
    if 0 not in ratios and 0.0 not in ratios:
        ratios = [0.0, *ratios[1:]]
    return {
        "study": {"temperatures": temperatures, "ratios": ratios, "methods": all_methods(config)}
    }


# --------------------------------------------------------------------------- minimum


def minimum_jobs(config: dict) -> Counter:
    """Jobs per rule a grid needs at least: each sample set, training set, model and eval
    once per seed, from the study's cells (cfs.study), not from the DAG."""
    config = validated(config)
    study = Study(config)
    cells = [parse_cell(cell) for cell in study.cells()]
    methods = [METHODS[cell["method"]] for cell in cells]
    samples = {
        (method.samples, cell.get("temperature"))
        for method, cell in zip(methods, cells, strict=True)
        if method.samples
    }
    per_seed = {
        "generate_context_free": sum(kind == "context_free" for kind, _ in samples),
        "generate_contextual": sum(kind == "contextual" for kind, _ in samples),
        "replay_chunks": int(any(kind == "replay" for kind, _ in samples)),
        "mix_at_ratio": sum(m.mixes for m in methods)
        + int(any(m.trains and not m.mixes for m in methods)),
        "fine_tune": sum(bool(m.trains) for m in methods),
        "interpolate_wiseft": sum(not m.trains for m in methods),
        "evaluate_finetuned": len(cells),
    }
    per_model = {rule: n * len(study.seeds) for rule, n in per_seed.items()}
    per_model.update(
        prepare_model=1, evaluate_base=1, generate_heldout=1, summarise_seeds=len(cells)
    )
    need = Counter({rule: n * len(study.study["models"]) for rule, n in per_model.items() if n})
    need["prepare_task_data"] = need["check_evaluation_tasks"] = 1
    for rule in AGGREGATORS:
        need[rule] = 1
    return need


def validated(config: dict) -> dict:
    from snakemake.utils import validate

    config = copy.deepcopy(config)
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config


# --------------------------------------------------------------------------- snakemake


def copy_workflow(dest: Path) -> Path:
    """What Snakemake reads (the Snakefile, workflow/, config/, tasks/, envs/), nothing built."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("workflow", "config", "tasks", "envs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> tuple[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}")
    return result.stdout, seconds


def job_stats(output: str) -> Counter:
    if "Nothing to be done" in output:
        return Counter()
    match = re.search(r"Job stats:\n(.*?)\n\s*\n", output + "\n\n", re.S)
    if not match:
        raise SystemExit(f"no 'Job stats' table in:\n{output[-3000:]}")
    counts = Counter()
    for line in match.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def jobs(output: str) -> list[dict]:
    """Each job of a dry run: rule, inputs, outputs."""
    found, current = [], None
    for line in output.splitlines():
        head = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if head:
            current = {"rule": head.group(1), "input": [], "output": []}
            found.append(current)
            continue
        if current is None:
            continue
        field = re.match(r"^\s+(input|output): (.*)$", line)
        if field:
            current[field.group(1)] = [p.strip() for p in field.group(2).split(",") if p.strip()]
    return found


def mark_finished(workdir: Path, dry_jobs: list[dict], files: list[str]) -> int:
    """Make the grid look run to completion without running a model: every output of the
    dry run is created as a placeholder, then `snakemake --touch -F` touches them in DAG
    order and records the per-file metadata (inputs, params, code) a real run leaves, which
    the input/params triggers of the next dry run compare against."""
    created = 0
    for job in dry_jobs:
        for name in job["output"]:
            path = workdir / name
            if Path(name).suffix:  # a file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder\n")
            else:  # a directory output (a model folder)
                path.mkdir(parents=True, exist_ok=True)
            created += 1
    snakemake(workdir, "--touch", "-F", "--cores", "1", *files)
    return created


# --------------------------------------------------------------------------- one config


def bench_config(config_file: Path, repeats: int, quick: bool) -> dict:
    base = load_config(REPO / "config" / "config.yaml")
    own = yaml.safe_load(config_file.read_text())
    if quick:  # the config's own grid
        study = merged(base, own)["study"]
        override = {"study": {k: study[k] for k in ("temperatures", "ratios", "methods")}}
    else:
        override = paper_grid(merged(base, own))
    config = merged(base, own, override)
    workdir = Path(tempfile.mkdtemp(prefix="cfs-bench-dag-"))
    try:
        copy_workflow(workdir)
        inside = workdir / "bench_grid.yaml"
        inside.write_text(yaml.safe_dump(override, sort_keys=False))
        own_copy = workdir / "bench_config.yaml"
        shutil.copy2(config_file, own_copy)
        files = ["--configfile", own_copy.name, inside.name]
        if not quick:
            snakemake(workdir, "-n", *files)  # warm-up: byte-compile, file-system caches
        times, stalls, output = [], [], ""
        for _ in range(repeats):
            wait_for_quiet(120)
            before = stall_seconds()
            output, seconds = snakemake(workdir, "-n", *files)
            times.append(seconds)
            if before is not None:
                stalls.append(round((stall_seconds() - before) / seconds, 3))
        # floors, same run: starting Snakemake, and parsing the workflow without a DAG
        startup = parse = None
        if not quick:
            startup = min(snakemake(workdir, "--version")[1] for _ in range(3))
            parse = min(snakemake(workdir, "--list-rules", *files)[1] for _ in range(3))
        counts = job_stats(output)
        dry_jobs = jobs(output)
        need = minimum_jobs(config)
        result = {
            "config": str(
                config_file.relative_to(REPO) if config_file.is_relative_to(REPO) else config_file
            ),
            "grid": override["study"],
            "dry_run_seconds": times,
            "dry_run_best": min(times),
            "dry_run_median": statistics.median(times),
            "dry_run_cpu_stall_share": stalls,
            "snakemake_startup_best": startup,
            "parse_only_best": parse,
            "jobs": dict(counts),
            "minimum": dict(need),
            "total_jobs": sum(counts.values()),
            "total_minimum": sum(need.values()),
        }
        if quick:
            return result
        # a finished grid, then one temperature more
        created = mark_finished(workdir, dry_jobs, files)
        again, _ = snakemake(workdir, "-n", *files)
        result["finished_grid_placeholders"] = created
        result["finished_grid_rescheduled"] = dict(job_stats(again))
        temperatures = override["study"]["temperatures"]
        new_temperature = round(max(temperatures) + 0.2, 2)
        plus = copy.deepcopy(override)
        plus["study"]["temperatures"] = [*temperatures, new_temperature]
        (workdir / "bench_plus.yaml").write_text(yaml.safe_dump(plus, sort_keys=False))
        wait_for_quiet(120)
        plus_output, plus_seconds = snakemake(
            workdir, "-n", "--configfile", own_copy.name, "bench_plus.yaml"
        )
        scheduled = job_stats(plus_output)
        needed = minimum_jobs(merged(base, own, plus)) - minimum_jobs(config)
        for rule in AGGREGATORS:
            needed[rule] = 1
        result.update(
            new_temperature=new_temperature,
            plus_dry_run_seconds=plus_seconds,
            plus_scheduled=dict(scheduled),
            plus_needed=dict(needed),
            plus_scheduled_total=sum(scheduled.values()),
            plus_needed_total=sum(needed.values()),
            plus_outputs_without_new_temperature=[
                output
                for job in jobs(plus_output)
                if job["rule"] not in AGGREGATORS
                for output in job["output"]
                if f"temp{fmt(new_temperature)}" not in output
            ],
        )
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_result(result: dict) -> None:
    grid = result["grid"]
    print(
        f"\n{result['config']}: temperatures {grid['temperatures']}, ratios {grid['ratios']}, "
        f"methods {', '.join(grid['methods'])}"
    )
    times = ", ".join(f"{t:.2f}" for t in result["dry_run_seconds"])
    stalls = ", ".join(f"{x:.0%}" for x in result["dry_run_cpu_stall_share"]) or "n/a"
    print(
        f"dry run: best {result['dry_run_best']:.2f} s, median {result['dry_run_median']:.2f} s "
        f"({times}; CPU contended {stalls}"
        f"); goal < {GOAL_SECONDS:g} s: {goal(result['dry_run_best'] < GOAL_SECONDS)}"
    )
    if result["snakemake_startup_best"] is not None:
        print(
            f"floors: `snakemake --version` {result['snakemake_startup_best']:.2f} s, "
            f"`--list-rules` (parse, no DAG) {result['parse_only_best']:.2f} s: the dry run "
            f"is {result['dry_run_best'] / result['snakemake_startup_best']:.2f}x bare "
            f"start-up, {result['dry_run_best'] / result['parse_only_best']:.2f}x parsing"
        )
    rules = sorted(set(result["jobs"]) | set(result["minimum"]))
    rows = []
    for rule in rules:
        jobs_, need = result["jobs"].get(rule, 0), result["minimum"].get(rule)
        extra = "" if need is None else ("" if jobs_ == need else f"{jobs_ - need:+d}")
        row = [rule, jobs_, "?" if need is None else need, extra or "="]
        if "plus_scheduled" in result:
            row += [result["plus_scheduled"].get(rule, 0), result["plus_needed"].get(rule, 0)]
        rows.append(row)
    rows.append(
        ["total", result["total_jobs"], result["total_minimum"], ""]
        + (
            [result["plus_scheduled_total"], result["plus_needed_total"]]
            if "plus_scheduled" in result
            else []
        )
    )
    header = ["rule", "jobs", "minimum", "excess"]
    if "plus_scheduled" in result:
        header += [f"+T={result['new_temperature']:g} run", "needed"]
    print(table(rows, header))
    print(
        f"job count vs minimum: {result['total_jobs']} / {result['total_minimum']}: "
        f"{goal(result['total_jobs'] == result['total_minimum'])}"
    )
    if "plus_scheduled" in result:
        print(
            f"finished grid ({result['finished_grid_placeholders']} placeholder outputs) "
            f"re-scheduled: {result['finished_grid_rescheduled'] or 'nothing'}"
        )
        same = result["plus_scheduled"] == result["plus_needed"]
        print(
            f"adding T={result['new_temperature']:g}: {result['plus_scheduled_total']} jobs run, "
            f"{result['plus_needed_total']} needed: {goal(same)}"
            + (
                "; outputs without the new temperature: "
                + ", ".join(result["plus_outputs_without_new_temperature"])
                if result["plus_outputs_without_new_temperature"]
                else ""
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: paper)")
    parser.add_argument(
        "--quick", action="store_true", help="config/quick.yaml's own grid, one timed run"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed dry runs per config")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        quick_mode()
        args.configs = args.configs or [REPO / "config" / "quick.yaml"]
    configs = args.configs or [
        path
        for path in (REPO / "config" / "olmo.yaml", REPO / "config" / "reasoning.yaml")
        if path.is_file()
    ]
    if not configs:
        print(
            "no paper configs (config/olmo.yaml, config/reasoning.yaml): using config/config.yaml"
        )
        configs = [REPO / "config" / "config.yaml"]
    repeats = args.repeats or (1 if args.quick else 5)
    print(f"DAG: snakemake -n on {os.cpu_count()} CPU cores, {repeats} timed runs per config")
    results = []
    for config_file in configs:
        result = bench_config(config_file.resolve(), repeats, args.quick)
        print_result(result)
        results.append(result)
    report("dag", {"results": results}, args.json)


if __name__ == "__main__":
    main()
