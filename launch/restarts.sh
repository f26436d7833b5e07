# Sourced by launch/local.sh and slurm/job.sh: run_with_restarts MAX_RESTARTS FIRST_ATTEMPT CMD [ARGS...]
#
# Runs CMD; when it fails, runs it again with run.resume=auto (from the last checkpoint) up to
# MAX_RESTARTS times (run.max_restarts). Not after success (0), bad input (2) or a stop by signal
# (75: the checkpoint is saved, the job was asked to end). FEDSEA_ATTEMPT tells the ranks which
# attempt they are (debug.fail_* faults fire in attempt 0 only); FIRST_ATTEMPT > 0 (a requeued
# Slurm job) starts with run.resume=auto. Returns CMD's last exit code.
run_with_restarts() {
  local max="$1" attempt="$2"
  shift 2
  local done_restarts=0 rc
  local resume=()
  if [ "$attempt" -gt 0 ]; then resume=(run.resume=auto); fi
  while true; do
    rc=0
    FEDSEA_ATTEMPT=$attempt "$@" "${resume[@]}" || rc=$?
    if [ "$rc" = 0 ] || [ "$rc" = 2 ] || [ "$rc" = 75 ] || [ "$done_restarts" -ge "$max" ]; then return "$rc"; fi
    attempt=$((attempt + 1))
    done_restarts=$((done_restarts + 1))
    echo "[fedsea] the job failed (exit $rc): restart $done_restarts of $max from the last checkpoint" >&2
    resume=(run.resume=auto)
  done
}
