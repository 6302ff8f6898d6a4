#!/bin/bash
# One rank per SLURM task, started by srun, and how they ended: the job scripts here call it.
#
#   bash launch/slurm/run_ranks.sh STOP_DIR [srun options] -- command [args]
#
# Each task gets the variables torch.distributed reads (RANK, LOCAL_RANK, WORLD_SIZE and
# LOCAL_WORLD_SIZE: $TASKS_PER_NODE, else the step's task count) and runs the command. Exit
# status: 75 when the ranks stopped on a signal after saving a checkpoint together (the job script
# then requeues), else srun's. STOP_DIR must be on a file system every node sees.
#
# Why a rank's 75 does not reach srun: --kill-on-bad-exit (which ends the step as soon as one rank
# dies, instead of leaving the others blocked in a collective) counts any non-zero exit as a death.
# The ranks save together and then exit 75 one by one, so the first one out got srun to kill the
# others while they were still finishing: under load rank 0 ended with SIGTERM (143) and the job
# FAILED instead of requeueing. So a task that ends with 75 leaves a file in STOP_DIR and exits 0,
# and the stop is read back from those files once srun returns; which rank exits first no longer
# matters.
set -uo pipefail

if [ "${1:-}" = "--task" ]; then  # inside srun: one rank
    stop_dir=$2
    shift 3  # --task STOP_DIR --
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
           LOCAL_WORLD_SIZE=${TASKS_PER_NODE:-$SLURM_NTASKS}
    # SLURM signals every process of the task, this shell too: a no-op trap keeps it alive to read
    # the rank's exit status (a trap, not an ignore, so the rank still starts with the default
    # dispositions and installs its own handlers).
    trap : TERM INT USR1
    "$@"
    rc=$?
    if [ "$rc" -eq 75 ]; then
        : > "$stop_dir/rank$RANK"
        exit 0
    fi
    exit "$rc"
fi

stop_dir=${1:?usage: run_ranks.sh STOP_DIR [srun options] -- command [args]}
shift
srun_opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    srun_opts+=("$1")
    shift
done
shift  # --
rm -rf "$stop_dir" && mkdir -p "$stop_dir" || exit 1
srun --kill-on-bad-exit=1 "${srun_opts[@]}" bash "$0" --task "$stop_dir" -- "$@"
rc=$?
stopped=$(find "$stop_dir" -name 'rank*' | wc -l)
rm -rf "$stop_dir"
if [ "$rc" -eq 0 ] && [ "$stopped" -gt 0 ]; then
    echo "[$(date -Is)] $stopped rank(s) stopped on a signal after saving a checkpoint"
    exit 75
fi
exit "$rc"
