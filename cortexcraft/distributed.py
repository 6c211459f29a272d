"""Data-parallel training across processes: rank and world size, the collectives that keep ranks
agreeing (barrier, any, max, gather), an orderly teardown, and the torchrun command line."""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cortexcraft.errors import CortexCraftError
from cortexcraft.interrupt import exit_with_parent

log = logging.getLogger(__name__)

# How long ranks wait for each other before leaving the process group: rank 0 may still be writing
# the last checkpoint and the summary of a large model.
TEARDOWN_TIMEOUT = timedelta(minutes=10)


class Distributed:
    """Rank and world size; initialises the process group when started by torchrun."""

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world_size > 1:
            # A rank whose torchrun agent was killed gets SIGTERM and stops like on any signal.
            exit_with_parent()
        if self.world_size > 1 and not dist.is_initialized():
            if device_name in ("auto", "cuda") and torch.cuda.is_available():
                # Bound to its GPU from the start, NCCL connects eagerly and never guesses the device.
                torch.cuda.set_device(self.local_rank)
                dist.init_process_group("nccl", device_id=torch.device("cuda", self.local_rank))
            else:
                dist.init_process_group("gloo")
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        return self.max(1.0 if flag else 0.0, device) > 0

    def max(self, value: float, device: torch.device) -> float:
        """The largest ``value`` over all ranks, so that every rank takes the same decision."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self, completed: bool) -> None:
        """Leave the process group once every rank is done. A finished 2-process run once ended in
        SIGABRT on a loaded machine; the suspect (never reproduced here) is a rank tearing down its
        group while rank 0 still writes the last checkpoint. An error while tearing down a
        completed run is only a warning."""
        if not self.owns_group:
            return
        try:
            if completed:
                if dist.get_backend() == "gloo":  # gloo's barrier names the ranks that never arrived
                    dist.monitored_barrier(timeout=TEARDOWN_TIMEOUT)
                else:
                    dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:
            if not completed:
                raise
            log.warning("rank %d: training completed, but leaving the process group failed: %s", self.rank, exc)


def torchrun_command(train_args: list[str], nproc_per_node: int = 1, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "cortexcraft") -> list[str]:
    """``cortexcraft train <train_args>`` under torchrun: ``nproc_per_node`` processes on this
    machine, alone (``--standalone``) or as node ``node_rank`` of ``nnodes`` meeting at the c10d
    rendezvous ``rdzv_endpoint`` (HOST:PORT of node 0, which hosts it; every node passes the same)."""
    if nproc_per_node < 1 or nnodes < 1:
        raise CortexCraftError(f"--nproc-per-node {nproc_per_node} and --nnodes {nnodes} must be at least 1")
    if nnodes == 1:
        launch = ["--standalone"]
    else:
        host, _, port = (rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise CortexCraftError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free "
                                   f"port, the same on every node), got {rdzv_endpoint!r}")
        if not 0 <= node_rank < nnodes:
            raise CortexCraftError(f"--node-rank {node_rank} must be between 0 and {nnodes - 1} "
                                   f"(0 on the node at --rdzv-endpoint)")
        # Node 0 hosts the rendezvous store; saying so also works when all nodes share one host name.
        launch = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                  f"--rdzv-id={rdzv_id}", f"--rdzv-conf=is_host={int(node_rank == 0)}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc-per-node={nproc_per_node}",
            "-m", "cortexcraft", "train", *train_args]
