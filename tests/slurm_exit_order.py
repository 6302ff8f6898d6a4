"""A stand-in rank for the exit-order test of launch/slurm/run_ranks.sh: on the job's first start
rank 1 leaves at once (75 = stopped after a checkpoint, or 1 = crashed, per EXIT_ORDER) while
rank 0 is still finishing for 3 s, as a loaded rank 0 would be; on a requeued start both finish."""

import os
import sys
import time

rank, start = int(os.environ["RANK"]), int(os.environ.get("SLURM_RESTART_COUNT", "0"))
print(f"rank {rank} of {os.environ['WORLD_SIZE']}, start {start}", flush=True)
if start > 0:
    sys.exit(0)
if rank == 0:
    time.sleep(3)
    print("rank 0 finished", flush=True)
    sys.exit(75)
sys.exit(75 if os.environ["EXIT_ORDER"] == "stop" else 1)
