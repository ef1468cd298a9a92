"""The conda envs (envs/*.yaml) and pip's dependencies (pyproject.toml): every env and
extra holds what the rules that run in it import.

Each rule's shell line names its stage (`python -m cfs.<stage>`) and its `conda:` line its
env (`backend_env(...)`: envs/cfs.yaml for the HF backend, envs/vllm.yaml for vLLM). The
stage's imports are followed through the cfs package (every import, also those inside
functions: a rule may reach any of them) down to third-party packages, which must be
listed in that env, and in the pip install (pyproject dependencies, plus the `vllm` extra
for the vLLM env)."""

from __future__ import annotations

import ast
import re
import sys

import tomllib
import yaml
from conftest import PACKAGE_DIR, REPO, copy_repo, jobs, run_snakemake, snakemake_env

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "lm_eval": "lm-eval", "huggingface_hub": "huggingface-hub"}
# lm-eval's extras that a config's tasks need (math_verify for minerva_math500)
TRANSITIVE = {"huggingface-hub": "transformers"}  # comes with transformers
# modules that only the vLLM backend imports: not needed in envs/cfs.yaml
VLLM_ONLY = {"vllm"}


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!\[ ;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def env_packages(path) -> set[str]:
    spec = yaml.safe_load(path.read_text())
    names = set()
    for entry in spec["dependencies"]:
        for line in entry["pip"] if isinstance(entry, dict) else [entry]:
            names.add(requirement_name(line))
    return names


def module_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level third-party imports of cfs.<module> and every cfs module it imports."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    tree = ast.parse((PACKAGE_DIR / "cfs" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "cfs":
                names = [f"cfs.{alias.name}" for alias in node.names]
        for name in names:
            top = name.split(".")[0]
            if top == "cfs" and "." in name:
                found |= module_imports(name.split(".")[1], seen)
            elif top not in sys.stdlib_module_names and top not in ("cfs", "__future__"):
                found.add(top)
    return found


def rule_stages() -> dict[str, tuple[str, str]]:
    """rule -> (stage module, conda line) from workflow/rules/*.smk."""
    rules = {}
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        blocks = re.split(r"^(?=rule |use rule )", path.read_text(), flags=re.M)
        conda_of = {}
        for block in blocks:
            name = re.match(r"use rule \w+ as (\w+)", block) or re.match(r"rule (\w+)", block)
            if not name:
                continue
            conda = re.search(r"conda:\n\s+(.+)", block)
            parent = re.match(r"use rule (\w+) as", block)
            stage = re.search(r"-m cfs\.(\w+)", block)
            if parent:
                conda_line, stage_name = conda_of[parent.group(1)]
            else:
                conda_line = conda.group(1) if conda else ""
                stage_name = stage and stage.group(1)
            conda_of[name.group(1)] = (conda_line, stage_name)
            if stage_name:
                rules[name.group(1)] = (stage_name, conda_line)
    return rules


def distribution(import_name: str) -> str:
    return DISTRIBUTIONS.get(import_name, import_name).lower()


def test_rules_and_stages_are_found():
    rules = rule_stages()
    assert rules["fine_tune"][0] == "train"
    assert rules["generate_heldout"] == rules["generate_context_free"]
    assert "backend_env" in rules["evaluate_base"][1], rules["evaluate_base"]
    missing = {"torch", "transformers", "peft"} - module_imports("train")
    assert missing == set(), "imports of cfs.train not found"


def test_every_env_holds_its_rules_imports():
    cfs_env = env_packages(REPO / "envs" / "cfs.yaml")
    vllm_env = env_packages(REPO / "envs" / "vllm.yaml") | {"torch", "transformers"}
    missing = []
    for rule, (stage, conda) in sorted(rule_stages().items()):
        needed = {distribution(name) for name in module_imports(stage)}
        needed = {TRANSITIVE.get(name, name) for name in needed}
        envs = {"cfs.yaml": cfs_env}
        if "backend_env" in conda:
            envs["vllm.yaml"] = vllm_env
        for env_name, packages in envs.items():
            wanted = needed - (VLLM_ONLY if env_name == "cfs.yaml" else set())
            missing += [f"{env_name} lacks {p} ({rule})" for p in sorted(wanted - packages)]
    assert missing == []


def test_pip_install_holds_every_stages_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {requirement_name(line) for line in project["dependencies"]}
    extra = {requirement_name(line) for line in project["optional-dependencies"]["vllm"]}
    missing = []
    for rule, (stage, _) in sorted(rule_stages().items()):
        for name in sorted(module_imports(stage)):
            package = TRANSITIVE.get(distribution(name), distribution(name))
            available = base | (extra if name in VLLM_ONLY else set())
            if package not in available:
                missing.append(f"pyproject lacks {package} ({rule})")
    assert missing == []


def test_the_vllm_extra_brings_math_verify_and_the_env_brings_peft():
    """lm-eval's math extra (math_verify) scores minerva_math500 of config/reasoning.yaml;
    the LoRA method needs peft in the env of the fine-tunes."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    math = [spec for spec in extras["vllm"] if spec.startswith("lm-eval[math]")]
    assert len(math) == 1, f"no lm-eval[math] in the vllm extra: {extras['vllm']}"
    pip = yaml.safe_load((REPO / "envs" / "cfs.yaml").read_text())["dependencies"][-1]["pip"]
    assert "peft" in {requirement_name(spec) for spec in pip}, f"envs/cfs.yaml pip: {pip}"


def test_a_virtual_environment_named_by_cfs_env_vllm_runs_the_vllm_stages(tmp_path):
    """Without conda, CFS_ENV_VLLM names a virtual environment standing in for
    envs/vllm.yaml: the stages of vLLM's env run its python, the others Snakemake's; a
    folder without bin/python stops the run by the variable's name."""
    repo = copy_repo(tmp_path / "repo")
    venv = tmp_path / "vllm-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = snakemake_env({"CFS_ENV_VLLM": str(venv)})
    result = run_snakemake(
        repo, "-n", "-p", "all", "--configfile", "config/reasoning.yaml", env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:]
    stage = re.compile(r"(\S*python) -m cfs\.(?!timing )(\w+)")  # the stage, not its timing
    stages = {
        (rule, found.groups())
        for rule, block in jobs(result.stdout)
        if (found := stage.search(block))
    }
    interpreters = {rule: python for rule, (python, _) in stages}
    vllm_python = str(venv / "bin" / "python")
    for rule in ("generate_context_free", "generate_heldout", "evaluate_base"):
        assert interpreters[rule] == vllm_python, (rule, interpreters[rule])
    assert interpreters["interpolate_wiseft"] == "python"
    (venv / "bin" / "python").unlink()
    result = run_snakemake(repo, "-n", "all", "--configfile", "config/reasoning.yaml", env=env)
    assert result.returncode != 0
    assert f"CFS_ENV_VLLM={venv}: no bin/python there" in result.stdout, result.stdout[-2000:]
