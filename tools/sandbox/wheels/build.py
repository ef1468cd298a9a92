"""Build the wheels benchmarks/gpu_check.sh carries to a GPU machine that has torch,
transformers, accelerate, peft, numpy, pandas, pyarrow, scipy, matplotlib and tqdm but no
network.

    python tools/sandbox/wheels/build.py     # rewrites tools/sandbox/wheels/*.whl

The wheels are git-ignored (`make sandbox-wheels` builds them); a GPU call carries them as
an ignored path (tools/sandbox/wheels).

Every wheel is pure Python, for CPython 3.12 (the GPU machine's).
- The versions cfs pins (pyproject.toml) of transformers, accelerate and peft, because cfs
  needs transformers 5.25's API (`cache=` in a model's forward, the Trainer's
  `loss_is_scaled_for_ga`), with huggingface_hub 2.x and the HTTP client it imports (and
  that client's dependencies at the versions it asks for).
- lm-eval 0.4.13 without its built-in task folders (15,000 YAML files; cfs evaluates the
  local tasks/ folder only), renamed 0.4.13+notasks, and what its import path needs
  (sacrebleu, dill, sqlitedict, requests and their pure-Python dependencies).
- datasets, which the stages read local files and parquet folders with (replay's corpus),
  with multiprocess and the fsspec it allows; its binary dependency, pyarrow, is there.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PURE = [
    "transformers==5.25.0",
    "huggingface_hub==2.4.0",
    "httpx2==2.17.0",
    "httpcore2==2.17.0",
    "truststore==0.10.5",
    "anyio==4.16.0",
    "idna==3.20",
    "h11==0.16.0",
    "certifi==2026.10.19.post1",
    "click==8.5.1",
    "typing_extensions==4.16.0",
    "accelerate==1.16.0",
    "peft==0.21.2",
    "lm-eval==0.4.13",
    "sacrebleu==2.6.0",
    "portalocker==4.4.2",
    "tabulate==0.10.0",
    "colorama==0.4.6",
    "dill==0.4.1",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "charset_normalizer==3.5.3",
    "datasets==5.2.0",
    "multiprocess==0.70.19",
    "fsspec==2026.9.0",
]
FROM_SOURCE = ["sqlitedict==2.1.0"]  # published as a source archive only
LM_EVAL = "lm_eval-0.4.13-py3-none-any.whl"
TRIMMED_VERSION = "0.4.13+notasks"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--no-deps"], check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_lm_eval(source: Path, dest_dir: Path) -> Path:
    """lm-eval's wheel without lm_eval/tasks/<folder>/ (the task registry code stays)."""
    old_info = "lm_eval-0.4.13.dist-info/"
    new_info = f"lm_eval-{TRIMMED_VERSION}.dist-info/"
    dest = dest_dir / f"lm_eval-{TRIMMED_VERSION}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(source) as whole, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for item in whole.infolist():
            name = item.filename
            if name.startswith("lm_eval/tasks/") and name.count("/") > 2:
                continue
            if name == old_info + "RECORD":
                continue
            data = whole.read(name)
            if name == old_info + "METADATA":
                data = data.replace(
                    b"\nVersion: 0.4.13\n", f"\nVersion: {TRIMMED_VERSION}\n".encode()
                )
            name = name.replace(old_info, new_info)
            out.writestr(name, data)
            records.append(record_line(name, data))
        out.writestr(new_info + "RECORD", "\n".join([*records, new_info + "RECORD,,"]) + "\n")
    return dest


def main() -> None:
    for old in HERE.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        pip(
            "download",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--platform",
            "any",
            "-d",
            tmp,
            *PURE,
        )
        pip("wheel", "-w", tmp, *FROM_SOURCE)
        for wheel in Path(tmp).glob("*.whl"):
            if wheel.name == LM_EVAL:
                trim_lm_eval(wheel, HERE)
            else:
                (HERE / wheel.name).write_bytes(wheel.read_bytes())
    wheels = sorted(HERE.glob("*.whl"))
    total = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels")


if __name__ == "__main__":
    main()
