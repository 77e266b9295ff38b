"""The processes and the device train.py runs on: torchrun, NCCL or gloo, determinism, a change of
device.

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK) each process takes its share of an update's
micro-batches and the gradients are summed in one flat all-reduce (`all_reduce_`), so the update is
the one a single process would make. NCCL needs a GPU per process: more processes than GPUs are
refused up front (`check_processes_fit`), unless --ddp-backend gloo shares them (for testing).
`configure_determinism` sets CUDA up for bitwise resume before its first use; `device_change_note`
says what changes when a run resumes on another device type than it trained on; `finish_distributed`
lets no process leave before rank 0 is done.
"""

from __future__ import annotations

import os

import torch

from minroute.run.safety import UserError


def local_processes() -> tuple[int, int]:
    """(this process's local rank, processes on this machine) as torchrun sets them; (0, 1) without
    torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("LOCAL_RANK", "0")), int(
        os.environ.get("LOCAL_WORLD_SIZE", str(world))
    )


def check_processes_fit(args):
    """NCCL needs a GPU per process: more torchrun processes on this machine than GPUs are refused
    up front (one `error:` line, from local rank 0; the others exit quietly), unless --ddp-backend
    gloo shares the GPUs.
    """
    local_rank, local_world = local_processes()
    if (
        int(os.environ.get("WORLD_SIZE", "1")) == 1
        or not args.device.startswith("cuda")
        or args.ddp_backend == "gloo"
    ):
        return
    n_gpu = torch.cuda.device_count()
    if local_world > n_gpu:
        if local_rank != 0:
            raise SystemExit(2)
        raise UserError(
            f"{local_world} processes on this machine (torchrun --nproc_per_node={local_world}) but"
            f" {n_gpu} CUDA device{'s' if n_gpu != 1 else ''}: NCCL needs one GPU per process; use"
            f" --nproc_per_node={n_gpu}, or --ddp-backend gloo to share GPUs between processes"
            " (testing)"
        )


def setup_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on CUDA (cuda:LOCAL_RANK, bound as the group's
    device_id), gloo on CPU or with --ddp-backend gloo (then processes share GPUs: cuda:LOCAL_RANK
    mod the GPUs). Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if args.demo:
        raise UserError("--demo runs in one process; build the data and model first for torchrun")
    if args.accum % world:
        raise UserError(
            f"--accum {args.accum} must be a multiple of the {world} processes (the global batch "
            f"stays batch_size x accum = {args.batch_size * args.accum} sequences)"
        )
    check_processes_fit(args)
    cuda = args.device.startswith("cuda")
    nccl = cuda and args.ddp_backend != "gloo"
    if cuda:
        args.device = f"cuda:{local_processes()[0] % torch.cuda.device_count()}"
        torch.cuda.set_device(args.device)
    # device_id: the communicator is bound to this GPU (and formed now, so a NCCL problem shows
    # here)
    if nccl:
        dist.init_process_group("nccl", device_id=torch.device(args.device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def finish_distributed(world: int):
    """End the process group, after every process got here."""
    if world > 1:
        import torch.distributed as dist

        # no process tears the group down while rank 0 still validates and writes the last
        # checkpoint
        dist.barrier()
        dist.destroy_process_group()


def configure_determinism(args):
    """--deterministic on CUDA: cuBLAS's fixed workspace (set before the first cuBLAS call) and
    deterministic algorithms everywhere (SDPA's backwards, index accumulations); an op with no
    deterministic kernel raises rather than silently breaking bitwise resume. Uninitialised memory
    is not filled (minroute writes every element it allocates; the fill would only cost time). CPU
    kernels minroute uses are deterministic already.
    """
    if not (args.deterministic and args.device.startswith("cuda")):
        return
    cfg = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg not in (":4096:8", ":16:8"):
        raise UserError(
            f"CUBLAS_WORKSPACE_CONFIG={cfg} in the environment: deterministic cuBLAS needs :4096:8"
            " or :16:8; unset it, or train with --no-deterministic"
        )
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def device_change_note(meta: dict, device: torch.device, dtype: torch.dtype) -> str | None:
    """What changes when a run resumes on another device type than it trained on (None when nothing
    does). Checkpoints before `device_type` was recorded: their args' device (the last one used),
    bf16 on CUDA.
    """
    was = meta.get("device_type") or torch.device(meta.get("args", {}).get("device", "cpu")).type
    was_dtype = meta.get("dtype") or ("bfloat16" if was == "cuda" else "float32")
    now_dtype = str(dtype).removeprefix("torch.")
    if (was, was_dtype) == (device.type, now_dtype):
        return None
    return (
        f"note: this run trained on {was} ({was_dtype} frozen weights) up to update"
        f" {meta.get('step')}; it resumes on {device.type} ({now_dtype}): from here it computes in"
        f" {now_dtype}, so it is not bitwise the run an uninterrupted {was} run would have been"
    )


def all_reduce_(tensors: list[torch.Tensor], device: torch.device):
    """Sum tensors across processes in one flat all-reduce. Every tensor must live on the training
    device: NCCL (CUDA) refuses CPU tensors, so a stray CPU tensor would stop multi-GPU training at
    its first update.
    """
    import torch.distributed as dist

    stray = [tuple(t.shape) for t in tensors if t.device != device]
    if stray:
        raise RuntimeError(
            f"all_reduce_: tensors of shape {stray} are not on {device}, the process group's device"
        )
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
