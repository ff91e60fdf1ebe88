"""Finetuning on several processes (GPUs, or machines) under torchrun, with one process's losses.

Not in the book: appendix A shows DistributedDataParallel on a toy model. Here the chapter's
finetune runs unchanged under PyTorch's own launcher:

    torchrun --nproc_per_node=4 gpt_instruction_finetuning.py --batch-size 8 ...

`init_processes()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK). Without it,
it returns `SingleProcess()`, whose methods do nothing, so one process runs as before. Under
torchrun it joins the process group (NCCL on CUDA, each process on GPU `LOCAL_RANK`; gloo on
the CPU, and on Windows, whose PyTorch has no NCCL) with a timeout, so a dead peer ends the
run instead of hanging it, and returns a `ProcessGroup` with the same methods:

- `check_batch_size(b)`: `--batch-size` is the GLOBAL batch; it must divide by the number
  of processes (checked before any work);
- `share(batch_indices)`: each process's rows of a global batch, `batch_indices[rank::world]`;
- `prepare_model(model, strategy)`: DistributedDataParallel ("ddp"), or FSDP's `fully_shard`
  ("fsdp": parameters, gradients and optimizer state sharded; build the optimizer after);
- `loss_sum_and_count(...)` and `backward_loss(loss_sum, n_counted)`: the chapter's loss is
  the mean over the counted (not -100) target tokens, and the processes' token counts
  differ. Averaging their means would weight a token on a process with few tokens more.
  Instead the counts are summed over processes (one all-reduce) and each process
  backpropagates `loss_sum * world_size / global_count`; DDP averages gradients over the
  `world_size` processes, so the update is exactly that of the global batch's mean loss
  (`last_loss` holds that loss, the all-reduced sum over the global count);
- `calc_loss_loader(...)`: evaluation losses, each batch's rows shared out and its (sum,
  count) reduced, so the numbers equal one process's;
- `map_in_order(fn, items)`: e.g. the test answers, generated in shards and gathered back in
  the items' order;
- `any(flag)`: a flag raised on any process (Ctrl-C), so all stop at the same step;
- `full_weights(model)`, `full_state_dict(model)`, `checkpoint_view(model, optimizer)`: under
  FSDP, the whole weights for fast_gpt's generation, the saved model, and
  checkpoints in the plain layout (any strategy and process count resumes them);
- `local_main_first()`: a download done once per machine;
- `is_main` (rank 0): only it prints (`main_prints_only()`), writes files and shows bars.

training.TrainingRun and finetune_run.FinetuneRun call these methods; the methods of
`SingleProcess` are the plain loop's steps, so one process computes what it always did.

One process failing: its error is printed, it exits non-zero, and torchrun's agent stops the
others; collectives time out after `timeout_s` in any case.
"""

import contextlib
import datetime
import itertools
import os
import sys

import torch
import torch.nn as nn

from instructkit.errors import BadInputError

DEFAULT_TIMEOUT_S = 600  # a collective waiting longer than this means a peer is gone
STRATEGIES = ("ddp", "fsdp")


class DistributedError(BadInputError):
    """A distributed run that cannot start or go on; the message says what to change."""


def torchrun_env(environ=None):
    """(rank, local_rank, world_size) from torchrun's environment, or None without torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    try:
        values = tuple(int(environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except (KeyError, ValueError) as e:
        raise DistributedError(f"WORLD_SIZE is set but RANK/LOCAL_RANK/WORLD_SIZE are not all "
                               f"integers ({e}): start several processes with torchrun.") from None
    return values


class SingleProcess:
    """One process, no torchrun: every method is what the plain training loop does."""

    rank, local_rank, world_size, is_main = 0, 0, 1, True

    def __init__(self, device=None):
        self.device = None if device is None else torch.device(device)
        self.model, self.strategy, self._train_forward = None, None, None
        self.last_loss = None

    def agree(self, seed):
        """The epoch's shuffling seed every process uses: rank 0's (all train on shares of one
        global batch order)."""
        return seed

    def check_batch_size(self, batch_size):
        """Refuse a global batch that does not split evenly over the processes."""
        if batch_size % self.world_size:
            raise DistributedError(
                f"--batch-size {batch_size} is the global batch, shared by {self.world_size} "
                f"processes, and does not divide by {self.world_size}: use a multiple of "
                f"{self.world_size} (e.g. {self.world_size * max(1, batch_size // self.world_size)}),"
                f" or start a number of processes that divides it.")

    def share(self, batch_indices):
        """This process's part of a global batch (indices, or the rows of a tensor)."""
        return batch_indices[self.rank::self.world_size]

    def prepare_model(self, model, strategy="ddp"):
        """Get `model` ready to train here; returns it (the same object). Build the optimizer
        after this call (FSDP replaces the parameters by shards)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        self.model, self.strategy = model, strategy
        self._train_forward = _TokenLoss(model)
        return model

    def loss_sum_and_count(self, input_batch, target_batch, model, device):
        """(sum of this process's token losses, their count), through DDP's forward when
        training under DDP (that forward prepares the gradient all-reduce)."""
        training = torch.is_grad_enabled() and self._train_forward is not None and model is self.model
        return (self._train_forward if training else _TokenLoss(model))(input_batch, target_batch, device)

    def backward_loss(self, loss_sum, n_counted):
        """The loss to backpropagate: calc_loss_batch's mean over the counted tokens."""
        self.last_loss = loss_sum.detach() / n_counted
        return loss_sum / n_counted

    def sum_over_processes(self, *values):
        """float64 sums over the processes of scalars (tensors or numbers), in one all-reduce."""
        return tuple(torch.tensor([float(v) for v in values], dtype=torch.float64))

    def padded_tokens(self, input_batch):
        """input_batch.numel() of the global batch (the book's "tokens seen"): this process's
        rows, padded to the longest row of all processes."""
        return input_batch.numel()

    def any(self, flag):
        """True when `flag` is true on any process (e.g. Ctrl-C seen by one of them)."""
        return bool(flag)

    def calc_loss_loader(self, data_loader, model, device, num_batches=None):
        """calc_loss_loader's mean of batch losses (fast_gpt's, or fast_llm's for Qwen3/Llama)."""
        from instructkit.fast_llm import fast_path

        return fast_path(model).calc_loss_loader_fast(data_loader, model, device, num_batches)

    def map_in_order(self, fn, items):
        """fn(items) with the items shared out over the processes (`fn` maps a list to a list
        of the same length); every process gets all the results, in the items' order."""
        return fn(items)

    @contextlib.contextmanager
    def full_weights(self, model):
        """The model with whole parameters inside the block (FSDP gathers its shards), for
        code that reads the weights directly: fast_gpt's generation (the KV cache)."""
        yield model

    def full_state_dict(self, model):
        """The model's whole state dict on the main process (None elsewhere, under FSDP)."""
        return model.state_dict()

    def checkpoint_view(self, model, optimizer, gather=True):
        """(model, optimizer) as checkpoints.py saves and restores them: themselves here. Under
        FSDP, stand-ins over whole state dicts in the plain layout (gathered from the shards
        when `gather`, a collective), so a checkpoint resumes with any strategy and number
        of processes."""
        return model, optimizer

    @contextlib.contextmanager
    def local_main_first(self):
        """The block runs first in each machine's process of LOCAL_RANK 0, then in the others
        (which wait at a barrier): a download into a folder the machine's processes share."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def barrier(self):
        """Wait until every process gets here."""

    def close(self):
        """Leave the process group."""

    @contextlib.contextmanager
    def main_prints_only(self):
        """Inside the block, what processes other than rank 0 print (stdout and stderr: lines,
        warnings, notices) goes nowhere. An error raised out of the block is reported after
        it, by every process that has it."""
        if self.is_main:
            yield
            return
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull):
            yield


class ProcessGroup(SingleProcess):
    """One of `world_size` processes started by torchrun, in torch.distributed's group."""

    def __init__(self, rank, local_rank, world_size, device):
        super().__init__(device)
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.is_main = rank == 0

    def prepare_model(self, model, strategy="ddp"):
        super().prepare_model(model, strategy)
        if strategy == "ddp":
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # The buffers (causal masks, 24 MB in gpt2-medium) are constants: DDP need not
            # broadcast them at every step. Newer torch names that switch forward_sync_buffers.
            sync_name = ("forward_sync_buffers" if "forward_sync_buffers" in
                         inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
            self._train_forward = DistributedDataParallel(
                self._train_forward, device_ids=[self.device] if self.device.type == "cuda" else None,
                **{sync_name: False})
        else:
            from torch.distributed.fsdp import fully_shard

            # One shard group per transformer block and one for the rest: a GPU holds its
            # shards plus the whole weights of the block being computed, not all the weights.
            for block in model.trf_blocks:
                fully_shard(block)
            fully_shard(model)
            self._train_forward = _TokenLoss(model, through_modules=True)
        return model

    def loss_sum_and_count(self, input_batch, target_batch, model, device):
        if torch.is_grad_enabled() and model is not self.model:
            raise DistributedError("Training under torchrun needs prepare_model(model) first: "
                                   "without it the processes' gradients are never averaged.")
        return super().loss_sum_and_count(input_batch, target_batch, model, device)

    def backward_loss(self, loss_sum, n_counted):
        """loss_sum * world_size / (the count summed over processes): after DDP averages the
        gradients over the processes, the update is that of the global batch's mean loss."""
        global_sum, global_count = self.sum_over_processes(loss_sum.detach(), n_counted)
        self.last_loss = global_sum / global_count
        return loss_sum * self.world_size / int(global_count)

    def agree(self, seed):
        import torch.distributed as dist

        shared = [seed]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def sum_over_processes(self, *values):
        import torch.distributed as dist

        device = self.device if self.device.type == "cuda" else "cpu"
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
        dist.all_reduce(totals)
        return tuple(totals.cpu())

    def padded_tokens(self, input_batch):
        import torch.distributed as dist

        longest = torch.tensor(input_batch.shape[1], device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        return input_batch.shape[0] * self.world_size * int(longest)

    def any(self, flag):
        return bool(self.sum_over_processes(bool(flag))[0])

    def calc_loss_loader(self, data_loader, model, device, num_batches=None):
        """Each batch's rows shared out over the processes and its (sum, count) reduced, so
        every process gets the number one process computes.

        Under FSDP through the model's own forward, one block's whole weights at a time (not
        all of them at once), run by every process, even one with no rows of a short batch,
        since each block's forward gathers its weights from all of them."""
        if len(data_loader) == 0:
            return float("nan")
        num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
        fsdp = self.strategy == "fsdp" and model is self.model
        loss = _TokenLoss(model, through_modules=fsdp)
        total = 0.0
        for input_batch, target_batch in itertools.islice(data_loader, num_batches):
            rows_in, rows_target = self.share(input_batch), self.share(target_batch)
            loss_sum, count = loss(rows_in, rows_target, device) if len(rows_in) or fsdp else (0.0, 0)
            global_sum, global_count = self.sum_over_processes(loss_sum, count)
            total += (global_sum / global_count).item()
        return total / num_batches

    def map_in_order(self, fn, items):
        import torch.distributed as dist

        results = fn(self.share(items))
        if len(results) != len(self.share(items)):
            raise ValueError(f"fn returned {len(results)} results for {len(self.share(items))} items")
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, results)
        merged = [None] * len(items)
        for rank, part in enumerate(gathered):
            merged[rank::self.world_size] = part
        return merged

    @contextlib.contextmanager
    def full_weights(self, model):
        if self.strategy != "fsdp" or model is not self.model:
            yield model
            return
        groups = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
        for module in groups:
            module.unshard()
        try:
            yield model
        finally:
            for module in groups:
                module.reshard()

    def full_state_dict(self, model):
        if self.strategy != "fsdp" or model is not self.model:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
        return state if self.is_main else None

    def checkpoint_view(self, model, optimizer, gather=True):
        if self.strategy != "fsdp" or model is not self.model:
            return model, optimizer
        from torch.distributed.checkpoint import state_dict as dcp

        options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        names = _parameter_names(model, optimizer)  # the plain optimizer's ids are their indices
        index = {name: i for i, name in enumerate(names)}

        def load_model(state):
            dcp.set_model_state_dict(model, state, options=dcp.StateDictOptions(full_state_dict=True))

        def load_optimizer(state):
            by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                       "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                        for group in state["param_groups"]]}
            dcp.set_optimizer_state_dict(model, optimizer, by_name,
                                         options=dcp.StateDictOptions(full_state_dict=True))

        model_state = optimizer_state = None
        if gather:
            model_state = dcp.get_model_state_dict(model, options=options)
            by_name = dcp.get_optimizer_state_dict(model, optimizer, options=options)
            if self.is_main:
                optimizer_state = {
                    "state": {index[name]: value for name, value in by_name["state"].items()},
                    "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                     for group in by_name["param_groups"]]}
        return _WholeState(model_state, load_model), _WholeState(optimizer_state, load_optimizer)

    def barrier(self):
        import torch.distributed as dist

        dist.barrier()

    def close(self):
        """Leave the group so that no process can hang on its way out.

        Gloo's worker threads may still be freeing a finished collective's tensors, and a
        tensor made in Python needs the GIL to be freed. Whoever drops the group's last
        reference waits for those threads: torch's Python handle lets the GIL go while it
        waits, but DDP's reducer (C++) holds it. Dropped after destroy_process_group, the
        reducer was that last holder, and a process deadlocked now and then at exit (seen
        under load, with py-spy: the join in ~ProcessGroupGloo under ~Reducer, a gloo thread
        waiting for the GIL in ~AsyncAllgatherWork). So DDP goes first, and a Python handle
        of the group is the last reference."""
        import gc

        import torch.distributed as dist

        if not dist.is_initialized():
            return
        group = dist.group.WORLD
        self._train_forward = None  # DDP and its reducer, while torch still holds the group
        gc.collect()  # DDP's modules may sit in reference cycles: free them now, not later
        dist.destroy_process_group()
        del group  # the last reference, through torch's holder that releases the GIL


def _parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order its state dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class _WholeState:
    """The two methods checkpoints.py calls on a model or optimizer, over a whole state dict."""

    def __init__(self, state, load):
        self.state, self.load = state, load

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.load(state)


class _TokenLoss(nn.Module):
    """fast_gpt.loss_sum_and_count as a module, so that DDP's forward runs it.

    `through_modules=True` computes the same loss through the model's own forward (the
    book's GPTModel.forward, full logits), which FSDP needs: its hooks gather each block's
    weights when that block's forward is called, and fast_gpt reads the weights directly.
    """

    def __init__(self, model, through_modules=False):
        super().__init__()
        self.model, self.through_modules = model, through_modules

    def forward(self, input_batch, target_batch, device):
        if not self.through_modules:  # fast_gpt's, or fast_llm's for Qwen3/Llama (fast_path)
            from instructkit.fast_llm import fast_path

            return fast_path(self.model).loss_sum_and_count(input_batch, target_batch, self.model, device)
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        logits = self.model(input_batch)  # (batch, n_tokens, vocab_size)
        loss_sum = nn.functional.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten(),
                                               reduction="sum")
        return loss_sum, (target_batch != -100).sum()


def process_group_backend(device_type, nccl_available):
    """NCCL for CUDA GPUs where this PyTorch has it; gloo on the CPU, and for CUDA on Windows,
    whose PyTorch builds come without NCCL (gloo moves CUDA tensors itself, more slowly)."""
    return "nccl" if device_type == "cuda" and nccl_available else "gloo"


def init_processes(device=None, timeout_s=DEFAULT_TIMEOUT_S, environ=None):
    """SingleProcess() without torchrun; under torchrun, join the process group and return
    this process's ProcessGroup.

    device: "cuda", "cpu" or None (CUDA when available). Under torchrun, CUDA means GPU
    LOCAL_RANK and the NCCL backend (gloo where NCCL is missing); the CPU uses gloo.
    """
    env = torchrun_env(environ)
    if env is None:
        return SingleProcess(device)
    rank, local_rank, world_size = env
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("This PyTorch build has no torch.distributed: run without torchrun.")
    kind = torch.device(device).type if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"Process LOCAL_RANK={local_rank} needs GPU {local_rank}, but this machine shows "
                f"{torch.cuda.device_count()} GPU(s): start at most that many processes per machine "
                f"(--nproc_per_node).")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif kind == "cpu":
        device = torch.device("cpu")
    else:
        raise DistributedError(f"torchrun runs on CUDA GPUs or the CPU, not {kind}: "
                               f"use --device cpu, or run without torchrun.")
    backend = process_group_backend(kind, dist.is_nccl_available())
    if os.name == "nt":
        # Windows builds of PyTorch have no libuv, which the rendezvous store uses by default.
        os.environ.setdefault("USE_LIBUV", "0")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return ProcessGroup(rank, local_rank, world_size, device)


@contextlib.contextmanager
def processes(device=None, timeout_s=DEFAULT_TIMEOUT_S):
    """`init_processes()` for a block; leaves the process group at its end. On an error the
    group is left as is (the process is about to exit, and torchrun stops the others)."""
    group = init_processes(device, timeout_s)
    yield group
    group.close()


def report_error(group, error, file=None):
    """Print `error` on one line, naming the process when there are several."""
    where = f" (process {group.rank} of {group.world_size})" if group.world_size > 1 else ""
    print(f"error{where}: {error}", file=file or sys.stderr, flush=True)
