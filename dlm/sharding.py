"""
Sharding for train.py: one code path from a laptop CPU to a GPU cluster.

- Process group: NCCL on CUDA, gloo on CPU; a one-process group when not under torchrun,
  so world size 1 runs the very same sharded code (torchtitan's rule).
- FSDP2 (`fully_shard`) on each transformer block, then on the root, for the online
  backbone and for each frozen copy (EMA target, L2 anchor); activation checkpointing is
  applied before sharding; optional bf16 mixed precision (fp32 reduction) and CPU offload.
- Start-up: only rank 0 holds the weights; the other ranks build the model on the meta
  device and receive their shards from it (`materialize`): one full copy per node, not one
  per process. They wait for rank 0's loading on a gloo group with a 2-hour timeout (NCCL's
  default is 10 minutes), and a loading error on any rank stops all with its line.
- Collectives the trainer needs: sums, the agreed error or signal, a timeout in one line.
- The early-stopped forward: a target pass ends where its embedding is read (`stop_module`:
  block l, or the LM head), which DLLMJEPA receives as `truncated_forward`; under FSDP2 the
  stopped root is resharded by hand.
"""

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


# Rank 0 reads the weights (perhaps downloading them first) while the other ranks only build
# shapes; they wait for it on a gloo group with this timeout, not on NCCL's default 10 minutes.
START_UP_TIMEOUT = timedelta(hours=2)


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device
    start_up: dist.ProcessGroup  # gloo, START_UP_TIMEOUT: where ranks wait for rank 0's loading

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str | None) -> str:
    """--device auto (or none given): "cuda" when a CUDA device is visible, else "cpu"; any other
    name as it is (each command says in its own way what it does when CUDA is asked for and absent)."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "", "auto") else name


def init_distributed(device: str, timeout: timedelta | None = None) -> Env:
    """Join torchrun's process group, or make a one-process group on the spot. `timeout`: how
    long a collective waits for the other ranks before it fails (torch's default if None), so a
    stopped or hung rank ends the run with an error instead of a hang (see is_timeout)."""
    use_cuda = pick_device(device) == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():  # a second run in the same process (tests, notebooks)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        local_rank = 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Env(dist.get_rank(), dist.get_world_size(),
               torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
               dist.new_group(backend="gloo", timeout=START_UP_TIMEOUT))


def leave(env: Env):
    """Before a rank exits on an error every rank agreed on: take the process group down in
    order (gloo's threads joined, rank 0's store closed), so the exit is the error line alone,
    not a C++ 'terminate called' abort from threads destroyed at interpreter exit."""
    if env.world_size > 1 and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier(group=env.start_up)  # no rank closes the store while another still talks to it
            dist.destroy_process_group()


def is_timeout(error: BaseException) -> bool:
    """A collective that gave up waiting for another rank (gloo: "Timed out waiting ... for recv";
    NCCL's watchdog: "Watchdog caught collective operation timeout"): the peer stopped, hung or died."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def exit_on_timeout(env: Env, minutes: float, then: str = ""):
    """After is_timeout: one line naming the rank and the flag, then out at once: the group is
    broken, and tearing it down at exit aborts in gloo's threads (exit -6)."""
    print(f"error: rank {env.rank}: another process did not join a collective within --collective-timeout "
          f"{minutes:g} minutes (stopped, hung or died: see its output){then}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def is_peer_lost(error: BaseException) -> bool:
    """A collective whose peer's connection broke (gloo: "Connection closed by peer", "Connection
    reset by peer", a read error or broken pipe): another rank died mid-collective."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        words in text for words in ("closed by peer", "reset by peer", "broken pipe", "read error"))


@contextlib.contextmanager
def timeout_in_one_line(env: Env, minutes: float, then: str = ""):
    """A collective inside that gave up waiting for another rank (is_timeout), or whose peer died
    (is_peer_lost), ends the process with one line naming the rank, not gloo's traceback; any
    other error passes through."""
    try:
        yield
    except RuntimeError as e:
        if is_peer_lost(e):
            print(f"error: rank {env.rank}: another process left in the middle of a collective (stopped or died: "
                  f"see its output){then}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)  # the group is broken: tearing it down at exit aborts in gloo's threads
        if not is_timeout(e):
            raise
        exit_on_timeout(env, minutes, then)


def agreed_error(error: str | None, env: Env) -> str | None:
    """Wait for every rank; return the first error any rank met (None if none), so that all
    stop together with the same line, none left waiting for a rank that has exited."""
    errors = [None] * env.world_size
    dist.all_gather_object(errors, error, group=env.start_up)
    return next(filter(None, errors), None)


def on_meta(env: Env):
    """Where a rank builds its modules: rank 0 reads (or initialises) the weights; the other ranks
    build the same modules on the meta device, without memory, and receive their shards from
    rank 0 once sharded (materialize)."""
    return contextlib.nullcontext() if env.is_main else torch.device("meta")

# -----------------------------------------------------------------------------
# FSDP2


def checkpoint_activations(block: torch.nn.Module):
    """Recompute the block's activations in backward instead of storing them. The block's
    forward is wrapped in place, so parameter names (and save_pretrained files) are unchanged."""
    inner = block.forward
    block.forward = lambda *args, **kwargs: checkpoint(inner, *args, use_reentrant=False, **kwargs)


def shard_model(model, blocks_of, param_dtype=None, cpu_offload=False, activation_checkpointing=False):
    """fully_shard every block, then each root: backbone, EMA target, anchor, then the whole.

    Frozen copies never run backward, so they reshard right after their forward (otherwise
    their roots would keep full parameters gathered until the next step).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for module in (model.backbone, model.target_encoder, model.anchor):
        if module is None or next(module.parameters(), None) is None:
            continue  # absent, or owns no weights (lora.EMAAdapterTarget runs the backbone's blocks)
        frozen = module is not model.backbone
        for block in blocks_of(module):
            if activation_checkpointing and not frozen:
                checkpoint_activations(block)
            fully_shard(block, **kwargs)
        fully_shard(module, reshard_after_forward=True, **kwargs)
    fully_shard(model, **kwargs)  # the predictor's parameters live in this root group
    return model


def weights_to_send(model) -> dict:
    """Rank 0's weights to send (take them before sharding): the state dict without the
    second name of a module registered twice (LLaDA's `ff_out` is its `wte` when weight_tying),
    which set_model_state_dict neither expects nor fills."""
    aliases = aliased_keys(model)
    return {key: value for key, value in model.state_dict().items() if key not in aliases}


def aliased_keys(model) -> set[str]:
    modules = dict(model.named_modules())  # each module once, under its first name
    return {key for key in model.state_dict(keep_vars=True) if key.rpartition(".")[0] not in modules}


def materialize(model, full_state: dict | None, env: Env, cpu_offload: bool = False):
    """After shard_model, give every rank its shards of rank 0's weights.

    Rank 0 built the model with weights (`full_state`: weights_to_send(model), taken before
    sharding, which keeps the full tensors alive until they are sent); the other ranks built
    the same modules on the meta device. So a node holds one full copy of the weights at
    start-up, not one per process. Rank 0 sends each tensor in turn; each rank keeps its shard.
    """
    if env.world_size == 1:
        if not cpu_offload:
            model.to(env.device)  # after sharding: only this rank's shards move
        return
    # plain attributes that name a buffer (Dream's rotary original_inv_freq) must follow it
    buffer_attributes = [(module, attribute, name) for module in model.modules()
                         for name, buffer in module.named_buffers(recurse=False)
                         for attribute, value in vars(module).items() if value is buffer]
    if env.is_main:
        if not cpu_offload:
            model.to(env.device)
    else:  # allocate (uninitialised) shards and buffers; their values come from rank 0
        model.to_empty(device="cpu" if cpu_offload else env.device)
    check_same_tensors(model, full_state, env)
    set_model_state_dict(model, full_state if env.is_main else {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=False))  # strict: aliases get nothing
    for module in model.modules():  # non-persistent buffers (rotary tables) are in no state dict
        for name, buffer in module.named_buffers(recurse=False):
            buffer = buffer.to(env.device)  # the process group's device (CPU offload leaves them on CPU)
            dist.broadcast(buffer, src=0)
            setattr(module, name, buffer)
    for module, attribute, name in buffer_attributes:
        setattr(module, attribute, getattr(module, name))


def check_same_tensors(model, full_state: dict | None, env: Env):
    """Every rank must expect exactly the tensors rank 0 sends: set_model_state_dict with
    strict=False would leave one it was not sent as to_empty's uninitialised memory. Raises
    on every rank together."""
    spec = lambda state: {key: (tuple(value.shape), value.dtype) for key, value in state.items()}
    sent = [spec(full_state) if env.is_main else None]
    dist.broadcast_object_list(sent, src=0, group=env.start_up)
    aliases = aliased_keys(model)
    here = {key: value for key, value in spec(model.state_dict()).items() if key not in aliases}
    differ = sorted(key for key in sent[0].keys() | here.keys() if sent[0].get(key) != here.get(key))
    first = differ[0] if differ else None
    if error := agreed_error(differ and (f"{first}: rank 0 sends {sent[0].get(first, 'nothing')}, rank {env.rank} "
                                         f"expects {here.get(first, 'nothing')} ({len(differ)} tensors differ)"), env):
        raise RuntimeError(error)

# -----------------------------------------------------------------------------
# Collectives


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().clone()
    dist.all_reduce(values)
    return values


def agreed_signal(signum: int, device) -> int:
    """The largest signal number any rank caught (0: none), so that all ranks stop after the
    same step even when the signal reaches them at different moments."""
    value = torch.tensor(signum, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def barrier():
    dist.barrier()

# -----------------------------------------------------------------------------
# A forward that stops where the embedding is read (DLLMJEPA's target pass)


class StopForward(Exception):
    """Raised by a forward pre-hook to end a pass early; args[0] is the input it stopped at."""


def forward_until(model: nn.Module, ids, stop_at: nn.Module) -> torch.Tensor:
    """Run model(input_ids=ids) only until `stop_at` is called; return its input (B, T, C).

    A pre-hook on `stop_at` raises, so nothing after it runs, in any backbone. It goes first,
    so under FSDP2 `stop_at` is never all-gathered; FSDP2's post-forward hook on `model`,
    skipped by the raise, is run by hand (private API): it reshards the root's parameters
    (embeddings, head), which would otherwise stay gathered until the backward (under no_grad,
    for good) and sets the root's state back to idle. With gradient (two-pass) it also hooks the
    returned tensor to gather them again for the backward; Dream's head reads a slice of the
    last state (a view), and an in-place op on a view would drop that hook (FSDP2 warns of wrong
    gradients): a view is handed over as a copy, which nothing can modify behind the hook.
    """
    def hook(module, args, kwargs):
        raise StopForward((args or tuple(kwargs.values()))[0])
    handle = stop_at.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)
    try:
        model(input_ids=ids)
        raise RuntimeError(f"forward_until: {type(stop_at).__name__} never ran")
    except StopForward as stop:
        hidden = stop.args[0]
    finally:
        handle.remove()
    if isinstance(model, FSDPModule) and torch.is_grad_enabled() and hidden._is_view():
        hidden = hidden.clone()  # (B, T, C)
    finish_stopped_forward(model, hidden)
    return hidden


def finish_stopped_forward(model: nn.Module, hidden: torch.Tensor):
    """Run FSDP2's post-forward hook of `model` that a StopForward skipped (nothing otherwise)."""
    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._post_forward(model, (), hidden)


def stop_module(model: nn.Module, layer: int, blocks_of=None) -> nn.Module | None:
    """The module whose input is hidden_states[layer]: block l for l < L, else the LM head (its
    input is the last state, after the final norm); None if unknown: run it all. blocks_of:
    model -> its blocks in order (backbones.Family.blocks); without it only the head is known.
    A head tied to the input embeddings (LLaDA with weight_tying) is the embedding module
    itself, called first with the token ids: no place to stop, so None."""
    blocks = blocks_of(model) if blocks_of else None
    if blocks is not None and layer % (len(blocks) + 1) < len(blocks):
        return blocks[layer % (len(blocks) + 1)]
    if blocks is None and layer != -1:
        return None
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return None if head is model.get_input_embeddings() else head


def truncated_forward(blocks_of=None):
    """DLLMJEPA's truncated_forward for a family: (model, ids, layer) -> hidden_states[layer]
    (B, T, C) from a pass that stops there (l/L of a forward, no LM head), or None where no
    module marks the place (DLLMJEPA then runs the whole pass)."""
    def forward(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor | None:
        stop_at = stop_module(model, layer, blocks_of)
        return None if stop_at is None else forward_until(model, ids, stop_at)
    return forward
