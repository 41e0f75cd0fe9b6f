"""Device check, not part of the CPU test suite: the training cases of ``ddp_train.py`` on GPUs under a given
accelerate config (FSDP2 or DeepSpeed), through the real Trainer path that CPU runs cannot reach.

    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes <GPUs> \\
        tests/helpers/ddp_gpu_check.py --workdir /tmp/sst-check

Each rank writes ``<workdir>/gpu-<case>-rank<r>.json``: how the model was wrapped, whether its parameters were
sharded, the per-step losses and kept counts, or the error the case stopped with (history 'ema' must refuse
sharded parameters with a ConfigError when its configuration is built).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ddp_train  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", default=",".join(ddp_train.CASES))
    ns = parser.parse_args(argv)
    os.makedirs(ns.workdir, exist_ok=True)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process and not os.path.exists(os.path.join(ns.workdir, "cache", "index.json")):
        ddp_train.build_cache(ns.workdir)
    state.wait_for_everyone()
    from sstoken.errors import ConfigError

    for case in ns.cases.split(","):
        report = {"case": case, "rank": state.process_index, "num_processes": state.num_processes}
        try:
            result = ddp_train.run_case(case, ns.workdir, grad_accum=1, use_cpu=False)
            report.update(
                distributed_type=result["distributed_type"], wrapper=result["wrapper"],
                losses=[r["loss"] for r in result["records"]], kept=[r["kept"] for r in result["records"]],
                denominators=[r["denominator"] for r in result["records"]], error=None)
        except ConfigError as exc:  # the expected refusal (EMA under sharding); anything else is a failure
            report.update(error=f"ConfigError: {exc}")
        with open(os.path.join(ns.workdir, f"gpu-{case}-rank{state.process_index}.json"), "w") as handle:
            json.dump(report, handle, indent=1)
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
