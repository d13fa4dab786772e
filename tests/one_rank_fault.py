"""`python -m torch.distributed.run ... tests/one_rank_fault.py ARGS`: `lenx ARGS` with a fault on rank 1 only,
as one process or node of a job meets it (the tests in test_distributed.py start it). LENX_TEST_FAULT:
  oom:K       the model's K-th forward on rank 1 runs out of memory (MemoryError);
  empty-out   rank 1 reads the results directory as empty (--out on a disk of its own);
  text:PATH   rank 1 reads --dataset PATH instead of the command's (its node's copy differs)."""

import os
import sys

from lenx.cli import main

fault = os.environ.get("LENX_TEST_FAULT", "")
if fault != "empty-out" and not fault.startswith(("oom:", "text:")):
    raise SystemExit(f"unknown LENX_TEST_FAULT {fault!r}")
if os.environ.get("RANK") == "1" and fault.startswith("oom:"):
    import lenx.model

    forward, calls, fail_at = lenx.model.LenxForCausalLM.forward, [0], int(fault.split(":")[1])

    def forward_once_out_of_memory(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise MemoryError
        return forward(self, *args, **kwargs)

    lenx.model.LenxForCausalLM.forward = forward_once_out_of_memory
elif os.environ.get("RANK") == "1" and fault == "empty-out":
    from lenx.store import Table

    read = Table.read
    Table.read = lambda table, out: read(table, out / "elsewhere")
elif os.environ.get("RANK") == "1" and fault.startswith("text:"):
    sys.argv[sys.argv.index("--dataset") + 1] = fault.split(":", 1)[1]

sys.exit(main())
