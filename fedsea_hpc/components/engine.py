"""Part B as a DeepSpeed engine over the server group: the one place both jobs build it.

Training gives it an optimizer (ZeRO 0-3 shard optimizer state, gradients, parameters);
generation only needs it under ZeRO-3, where the parameters themselves are sharded and every
forward gathers them collectively.
"""
from __future__ import annotations

import torch

from fedsea_hpc.config import DeepSpeedConfig
from fedsea_hpc.distributed.topology import ServerMPU, Topology


def deepspeed_config(ds: DeepSpeedConfig, dtype: torch.dtype) -> dict:
    """The DeepSpeed config dict for Part B, from the ``deepspeed.*`` section and the model dtype."""
    conf = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed 0.19.8 clips at 1.0 unless told otherwise; clipping only the server's share
        # of the gradient would silently change the optimisation problem.
        "gradient_clipping": 0.0,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in ds.extra.items():  # checked against an allow-list in config.validate
        conf[key] = {**conf[key], **value} if isinstance(conf.get(key), dict) else value
    return conf


def server_engine(model: torch.nn.Module, topo: Topology, ds: DeepSpeedConfig, dtype: torch.dtype,
                  optimizer: torch.optim.Optimizer | None = None):
    """``deepspeed.initialize`` on the server group only (client ranks never enter DeepSpeed)."""
    import deepspeed  # imported on server ranks only

    from fedsea_hpc.distributed.deepspeed_glue import confine_to_group

    confine_to_group(topo.server_group, topo.server_ranks)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=ServerMPU(topo),
                                      config=deepspeed_config(ds, dtype))
    return engine
