"""Run `python -m MODULE ARGS` and count the positions the model computed.

    python benchmarks/_positions.py COUNT.json MODULE ARGS...

Wraps LlamaForCausalLM.forward (SmolLM2's class) to add up input_ids.numel() of every
call: training rows, log-likelihood batches, and each step of a KV-cache decode (its new
tokens). Written to COUNT.json at exit, with the number of calls.
"""

from __future__ import annotations

import atexit
import functools
import json
import runpy
import sys

counts = {"positions": 0, "calls": 0}


def main() -> None:
    out, module, *rest = sys.argv[1:]
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaForCausalLM.forward

    @functools.wraps(original)
    def counted(self, input_ids=None, *args, **kwargs):
        if input_ids is not None:
            counts["positions"] += int(input_ids.numel())
            counts["calls"] += 1
        return original(self, input_ids, *args, **kwargs)

    modeling_llama.LlamaForCausalLM.forward = counted
    atexit.register(lambda: open(out, "w").write(json.dumps(counts)))
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
