"""What the end-to-end study modules (test_pipeline.py, test_evaluation_settings.py) share:
Snakemake run on a config with every model stage on one thread, and the jobs a run (or a
dry run, its plan) printed."""

from __future__ import annotations

import re

import yaml
from conftest import MODEL_STAGE_RULES, run_snakemake

JOB = r"^(?:local)?rule (\w+):\n((?:    .*\n)+)"


def run(repo, config, name="config/config.yaml", *args, timeout=900):
    """`snakemake --cores 2 ARGS` in `repo` with `config` written to `name`."""
    (repo / name).write_text(yaml.safe_dump(config, sort_keys=False))
    threads = [f"{rule}=1" for rule in MODEL_STAGE_RULES]
    extra = [] if name == "config/config.yaml" else ["--configfile", name]
    return run_snakemake(
        repo, "--cores", "2", "--set-threads", *threads, *extra, *args, timeout=timeout
    )


def executed(output: str) -> dict[str, set[str]]:
    """{rule: first output of each job} of the jobs a Snakemake run executed."""
    jobs: dict[str, set[str]] = {}
    for rule, body in re.findall(JOB, output, re.M):
        found = re.search(r"^    output: ([^,\n]+)", body, re.M)
        jobs.setdefault(rule, set()).add(found.group(1) if found else "")
    jobs.pop("all", None)
    return jobs


def outputs(output: str, rule: str) -> set[str]:
    """Every output of the jobs of `rule` that a Snakemake run executed."""
    found = set()
    for name, body in re.findall(JOB, output, re.M):
        line = re.search(r"^    output: (.+)$", body, re.M)
        if name == rule and line:
            found |= {path.strip() for path in line.group(1).split(",")}
    return found
