"""fedsea-hpc: federated split learning of Llama models (FedSEA) on MPI/Slurm with DeepSpeed servers."""
import time as _time

# When this process imported the package, before torch: the start of the set-up clock
# (summary.json's setup_s: imports, model load, DeepSpeed engine, probes, checkpoint load).
STARTED = _time.perf_counter()
