"""The per-step phase names every run reports (``metrics.jsonl`` ``phase_s``, seconds, max over
ranks) and every study reads back. Torch-free, so the report tooling can import it."""

PHASES = ("client_compute_s", "wait_server_s", "server_compute_s", "wait_clients_s", "sync_s", "optim_s",
          "emulated_compute_s", "emulated_link_s")  # the last two: EMULATION (fedsea_hpc.adapt.emulate), 0 when off
