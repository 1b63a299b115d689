"""Multi-process training on torch.distributed, launched by torchrun: process groups, DDP / FSDP2
wrapping, each rank's slice of the data, reductions, rank-0 I/O and a shutdown that cannot hang.

``peftcli train RECIPE --nproc-per-node N`` re-executes itself through ``torch.distributed.run``
(:func:`launch`); ``torchrun --nproc-per-node N -m peftcli train RECIPE`` is the same run. Each
process then calls :func:`init` and gets a :class:`Dist`; a plain single-process run gets one too
(world size 1), so the loop has one code path.

How N ranks compute what one process computes (with the same global batch):

* every optimizer step reads one *global* window of example indices (the single-process window of
  micro-batch × world examples per micro-batch); rank r takes the r-th contiguous slice of each
  micro-batch (:meth:`Dist.rank_slice`), so the global order is the single-process order;
* the loss is token-weighted over the whole global window: the target count is all-reduced
  (:meth:`Dist.sum_int`) before any micro-batch's summed loss is divided by it;
* DDP and FSDP average gradients over ranks, so the loss a rank backpropagates is multiplied by the
  world size (:attr:`Dist.grad_scale`): the average of N scaled rank losses is their sum, which is the
  single-process loss. Gradients are synchronised on the last micro-batch of a window only.

``ddp`` wraps the tuned model in ``DistributedDataParallel``; the frozen base has
``requires_grad=False`` so DDP neither buckets nor all-reduces it. ``fsdp`` applies FSDP2's
``fully_shard`` to every decoder layer and then to the root: base and adapter are sharded, the
adapter trains, and checkpoints and the adapter gather full tensors (:func:`full_tree`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftcli.recipe import RecipeError


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a torchrun job (usable before :func:`init`)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    """This process's place in the job. ``mode`` is ``none`` for a single process, else ddp/fsdp."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def grad_scale(self) -> int:
        """DDP/FSDP average gradients over ranks; scaling each rank's loss by this makes it the sum."""
        return self.world_size

    @property
    def backend(self) -> str:
        return dist.get_backend() if dist.is_initialized() else "none"

    # -- data ----------------------------------------------------------------------------------
    def rank_slice(self, window: list[list[int]]) -> list[list[int]]:
        """This rank's part of a global window: the r-th contiguous slice of every micro-batch (sizes
        differ by at most one). A rank whose slice of a short last batch is empty gets the batch's first
        example to keep the collectives in step; :meth:`mask_padding` zeroes its loss."""
        if not self.enabled:
            return window
        mine = []
        for batch in window:
            start, size = self.share(len(batch))
            part = batch[start : start + size]
            mine.append(part if len(part) else batch[:1])
        return mine

    def share(self, size: int) -> tuple[int, int]:
        """(start, length) of this rank's contiguous part of a micro-batch of ``size`` examples."""
        base, extra = divmod(size, self.world_size)
        return self.rank * base + min(self.rank, extra), base + (1 if self.rank < extra else 0)

    def slice_offsets(self, window: list[list[int]]) -> list[int]:
        """Where this rank's part of each micro-batch starts in the whole global window, counted in
        examples (grpo seeds its samples by their place in the window, not on the rank)."""
        offsets, before = [], 0
        for batch in window:
            offsets.append(before + self.share(len(batch))[0])
            before += len(batch)
        return offsets

    def padding_flags(self, window: list[list[int]]) -> list[bool]:
        """Which of this rank's micro-batches are stand-ins (see :meth:`rank_slice`)."""
        if not self.enabled:
            return [False] * len(window)
        return [len(batch) <= self.rank for batch in window]

    def mask_padding(self, micro: list[dict[str, torch.Tensor]], flags: list[bool]) -> None:
        """A stand-in micro-batch scores nothing: its labels become the ignore index."""
        for batch, pad in zip(micro, flags, strict=True):
            if pad:
                batch["labels"] = torch.full_like(batch["labels"], -100)

    # -- reductions ----------------------------------------------------------------------------
    def sum_int(self, value: int) -> int:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def sum_floats(self, values: list[float]) -> list[float]:
        """``values`` summed over ranks, element by element, in float64 (one all-reduce)."""
        if not self.enabled or not values:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def reduce_step(self, loss: float, tokens: int, stop: bool) -> tuple[float, int, bool]:
        """One all-reduce per step: the window loss (each rank holds its share of the token-weighted
        sum), tokens (summed) and whether any rank got SIGINT/SIGTERM (so all stop at the same step)."""
        if not self.enabled:
            return loss, tokens, stop
        tensor = torch.tensor(
            [loss, float(tokens), float(stop)], dtype=torch.float64, device=self.reduce_device
        )
        dist.all_reduce(tensor)
        return float(tensor[0]), int(tensor[1]), bool(tensor[2] > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (e.g. RNG states), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def reduce_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # -- gradients -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def grad_sync(self, wrapped: nn.Module, sync: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; gradients are reduced across ranks only when ``sync``
        (the last micro-batch of the window)."""
        if self.mode == "ddp" and not sync:
            with wrapped.no_sync():
                yield
            return
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
        yield

    # -- I/O and lifetime ----------------------------------------------------------------------
    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may fill a cache, e.g. a tiny model), then the others."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self, ok: bool) -> None:
        """Tear the process group down. After success all ranks meet at a barrier first (so no rank
        exits while another still talks to it); after an error no barrier (the others may be gone)."""
        if not self.owns_group or not dist.is_initialized():
            return
        if ok:
            with contextlib.suppress(Exception):
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def init(mode: str, device_spec: str) -> tuple[Dist, str]:
    """Join the torchrun job this process belongs to (env ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...),
    or return a single-process :class:`Dist`. Returns it and the device spec this rank uses."""
    world = env_world_size()
    if world <= 1:
        if mode == "fsdp":
            raise RecipeError(
                "train.distributed",
                "fsdp needs more than one process",
                "launch with --nproc-per-node N (N > 1) or set train.distributed: auto",
            )
        return Dist(), device_spec
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (torch.cuda.is_available() and device_spec in ("auto", "cuda")) or device_spec.startswith(
        "cuda"
    )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_spec = f"cuda:{local_rank}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=int(os.environ.get("PEFTCLI_DIST_TIMEOUT", "600"))),
        )
    return Dist("fsdp" if mode == "fsdp" else "ddp", rank, world, local_rank, owns), device_spec


def check_method(dist_: Dist, method_cls: type, quantized: bool = False) -> None:
    """A method (or base) that cannot run sharded says so before any weights are loaded."""
    if dist_.mode == "fsdp" and quantized:
        raise RecipeError(
            "train.distributed",
            "fsdp cannot shard a quantized (bitsandbytes) base yet",
            "use train.distributed: ddp (every GPU then holds the whole quantized base)",
        )
    if dist_.mode == "fsdp" and not method_cls.supports_fsdp:
        raise RecipeError(
            "train.distributed",
            f"method {method_cls.name} cannot run under fsdp",
            "use train.distributed: ddp (or auto), or a method that supports fsdp such as lora",
        )


def wrap(dist_: Dist, model: nn.Module) -> nn.Module:
    """The module the loop runs forward through: the model itself (single process, and FSDP2 which
    shards it in place) or a DDP wrapper around it. Methods keep talking to the unwrapped model."""
    if dist_.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The frozen base (and the buffers) are the same on every rank by construction: DDP neither
        # broadcasts them at start nor buckets them; only the adapter's gradients are all-reduced.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, frozen + [n for n, _ in model.named_buffers()]
        )
        device_ids = [dist_.local_rank] if dist_.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    if dist_.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise RecipeError(
                "train.distributed",
                f"found no decoder layers to shard in {type(model).__name__}",
                "use train.distributed: ddp",
            )
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the largest ModuleList of the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def full_tree(obj: Any) -> Any:
    """``obj`` with every DTensor gathered to a full tensor (a collective: all ranks call it alike)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tree(v) for v in obj)
    return obj


def like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` placed as ``reference`` is: sharded the same way when ``reference`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(
            full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements
        )
    return full.to(reference.device)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` with full tensors: shard each state tensor like its parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    optimizer.state[p][key] = like(p, value)


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """FSDP2 modules hold full parameters inside the block (for reading the adapter on save)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


# -- the launcher ------------------------------------------------------------------------------


@dataclass
class LaunchOptions:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None


LAUNCH_FLAGS = (
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--rdzv-endpoint",
    "--rdzv-id",
)


def worker_args(argv: list[str]) -> list[str]:
    """The command line each worker runs: ``argv`` without the launcher's own flags."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def launch(options: LaunchOptions, peftcli_args: list[str]) -> int:
    """Run ``python -m peftcli <peftcli_args>`` in ``nproc_per_node`` processes through
    ``torch.distributed.run`` (torchrun's engine: rendezvous, failure detection, signal forwarding).
    Returns the exit code: 0, or non-zero when any rank failed (torchrun stops the others)."""
    if options.nproc_per_node < 1:
        raise RecipeError(
            "--nproc-per-node", f"{options.nproc_per_node} is not a process count", "use 1 or more"
        )
    if options.rdzv_endpoint and (options.master_addr or options.master_port):
        raise RecipeError(
            "--rdzv-endpoint",
            "given together with --master-addr/--master-port",
            "use either a rendezvous endpoint or a master address and port",
        )
    if options.nnodes > 1 and not (options.rdzv_endpoint or options.master_addr):
        raise RecipeError(
            "--nnodes",
            f"{options.nnodes} nodes need a meeting point",
            "add --master-addr HOST --master-port PORT (same on every node) or --rdzv-endpoint HOST:PORT",
        )
    if not 0 <= options.node_rank < options.nnodes:
        raise RecipeError("--node-rank", f"{options.node_rank} is not in 0..{options.nnodes - 1}", None)
    args = [f"--nproc-per-node={options.nproc_per_node}", f"--nnodes={options.nnodes}"]
    if options.rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={options.rdzv_endpoint}"]
        args += [f"--rdzv-id={options.rdzv_id or 'peftcli'}"]
    else:
        args.append(f"--node-rank={options.node_rank}")
        if options.master_addr:
            args.append(f"--master-addr={options.master_addr}")
        if options.master_port:
            args.append(f"--master-port={options.master_port}")
        elif options.nnodes == 1:
            args.append("--standalone")
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parsed = get_args_parser().parse_args([*args, "-m", "peftcli", *peftcli_args])
    try:
        torchrun(parsed)
    except SignalException as err:  # SIGTERM/SIGINT: torchrun passed it on; the ranks checkpointed
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        failures = sorted(err.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        for rank, failure in failures:
            print(f"error: rank {rank} failed: {failure_line(failure)}", file=sys.stderr)
        codes = [f.exitcode for _, f in failures if f.exitcode > 0]
        return codes[0] if codes else 1
    return 0


def failure_line(failure: Any) -> str:
    """The last line of a failed rank's recorded error (its exception), or its exit code."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message).splitlines() if line.strip()]
    if not lines or "errors.html" in lines[-1]:
        return f"exit code {failure.exitcode} (see its output above)"
    return lines[-1].strip()


def run_recording_errors(main: Any) -> None:
    """Run ``main`` so that under torchrun an exception is recorded for the launcher's failure report
    (torchelastic's error file); it still propagates, so the rank exits non-zero and torchrun stops
    the other ranks."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
