"""The optimizer half of a training step, for plain DDP and for DeepSpeed ZeRO, behind one interface.

The loop hands an engine each micro-batch's share of the global mean loss (summed item losses over
the item count of the whole global batch); the engine turns it into gradients summed over
micro-batches and workers, steps the optimizer at accumulation boundaries (clipping, loss scaling,
schedule), and saves or restores its own state. So 2 workers and 1 worker with twice the
accumulation make the same update.

    with engine.micro_step():
        engine.backward(loss_share)
    engine.step()          # an optimizer step only at the accumulation boundary
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import torch

from kftune.config import TrainSection
from kftune.errors import KftuneError
from kftune.train.schedules import lr_multiplier

DDP_STATE_FILE = "optimizer_state.pt"
DEEPSPEED_TAG = "deepspeed"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_engine(model, groups: list[dict], train: TrainSection, total_steps: int, world: int, device: torch.device):
    """`model` carries the method (trainable parameters chosen); `groups` are its optimizer parameter groups."""
    engine = (DeepSpeedEngine if train.deepspeed else DDPEngine)(model, groups, train, total_steps, world, device)
    if train.compile:
        engine.compile()
    return engine


@contextlib.contextmanager
def mixed_precision(model, precision: str, device: torch.device):
    """16-bit matmuls over fp32 and 16-bit weights alike (a method's fp32 parameters on a 16-bit frozen base),
    through autocast. PEFT's layers then take their input as it comes: they would cast it to their fp32
    weights' dtype, and autocast would cast it back for the matmul, two copies of every adapted layer's
    input in the forward pass and two of its gradient in the backward (a bf16 LoRA step on CPU: 16% of
    its time)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    adapted = _tuner_layers(model) if dtype else []
    casting = [(layer, getattr(layer, "cast_input_dtype_enabled", True)) for layer in adapted]
    for layer in adapted:
        layer.cast_input_dtype_enabled = False
    try:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            yield
    finally:
        for layer, enabled in casting:
            layer.cast_input_dtype_enabled = enabled


_TUNER_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tuner_layers(model) -> list:
    """The model's PEFT layers, found once per model: `mixed_precision` wraps every micro-step, and walking
    a 1B model's 1,337 modules each time took 1.8 ms. A method adds its layers before the first step."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model not in _TUNER_LAYERS:
        _TUNER_LAYERS[model] = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return _TUNER_LAYERS[model]


@contextlib.contextmanager
def partitioned_construction(train: TrainSection, world: int, method: str):
    """Under ZeRO-3, models built inside this are partitioned as they are constructed (under
    `deepspeed.zero.Init`, with transformers' DeepSpeed config active) and each worker reads only its
    partitions from the checkpoint (`kftune.train.partitioned`). Elsewhere, and for methods that read
    the whole base weights while applied, it does nothing."""
    from kftune.methods import METHODS

    if not train.partitions_weights or METHODS[method].reads_base_weights:
        yield
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from kftune.train.deepspeed_config import deepspeed_config

    if not train.use_gpu:
        skip_shm_op()
    if (
        torch.distributed.is_initialized()
    ):  # zero.Init partitions over DeepSpeed's view of the (Ray Train) process group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    settings = HfDeepSpeedConfig(
        deepspeed_config(train, world)
    )  # transformers holds it weakly: alive for this block only
    try:
        yield settings
    finally:
        unset_hf_deepspeed_config()


def torch_adamw(groups: list[dict], train: TrainSection, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW (fused on GPUs); public because bench/gpu_throughput.py hands its DeepSpeed peer the same one."""
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=device.type == "cuda" or None)


class DDPEngine:
    """torch DDP across workers (over whatever process group the launcher set up: Ray Train's, or a
    plain torch.distributed one), AdamW, autocast, GradScaler for fp16."""

    def __init__(
        self, model, groups: list[dict], train: TrainSection, total_steps: int, world: int, device: torch.device
    ):
        self.train, self.world, self.device = train, world, device
        self.module = model.to(device)
        self.model = self._replicated()
        self.parameters = [p for group in groups for p in group["params"]]
        self.optimizer = torch_adamw(groups, train, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(train, total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.micro_steps = 0

    def compile(self) -> None:
        """torch.compile on the wrapped module, in place: parameter names (and so the saved artifact) stay
        as they are, and a re-wrap after gradual unfreezing keeps the compiled module."""
        self.module.compile()

    def at_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.train.gradient_accumulation == 0

    @contextlib.contextmanager
    def micro_step(self):
        """Forward and backward of one micro-batch: autocast, and no gradient all-reduce until the last one."""
        sync = (
            contextlib.nullcontext()
            if self.at_boundary() or not hasattr(self.model, "no_sync")
            else self.model.no_sync()
        )
        with sync, mixed_precision(self.module, self.train.precision, self.device):
            yield

    def backward(self, loss_share: torch.Tensor) -> None:
        self.scaler.scale(loss_share * self.world).backward()  # DDP averages over workers; we want the sum

    def step(self) -> bool:
        boundary = self.at_boundary()
        self.micro_steps += 1
        if not boundary:
            return False
        if self.train.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.train.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def _replicated(self):
        """The module under DDP when there are several workers (as Ray Train's prepare_model does), else itself."""
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return self.module
        # Every worker built the same model from the same files and seed, so rank 0 sends only what trains:
        # DDP's own start-up sync would send the frozen weights too, through buckets worth 0.5 GB on a 1B model.
        for parameter in self.module.parameters():
            if parameter.requires_grad:
                torch.distributed.broadcast(parameter.data, 0)
        return torch.nn.parallel.DistributedDataParallel(
            self.module, device_ids=[self.device] if self.device.type == "cuda" else None, init_sync=False
        )

    def trainable_set_changed(self) -> None:
        """DDP hooks the parameters that were trainable when it wrapped the model: after gradual
        unfreezing turns more on, wrap again so their gradients are averaged across workers too."""
        self.model = self._replicated()

    def trained_state(self, rank: int) -> dict[str, torch.Tensor]:
        """The parameters the optimizer steps, as fp32 CPU copies on rank 0 (`{}` elsewhere)."""
        if rank != 0:
            return {}
        chosen = {id(p) for p in self.parameters}
        return {n: p.detach().float().cpu().clone() for n, p in self.module.named_parameters() if id(p) in chosen}

    def kept_state(self, rank: int) -> dict[str, torch.Tensor]:
        """`train.keep_best`'s copy of the weights: rank 0's `trained_state` (the replicas are identical)."""
        return self.trained_state(rank)

    def save(self, directory: Path, rank: int) -> None:
        """Rank 0 writes the trained parameters with optimizer, schedule and scaler state (DDP keeps them identical on every worker)."""
        if rank == 0:
            torch.save(
                {
                    "parameters": self.trained_state(rank),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                },
                directory / DDP_STATE_FILE,
            )

    def load(self, directory: Path) -> None:
        path = directory / DDP_STATE_FILE
        if not path.is_file():
            raise KftuneError(
                f"{path}: missing; this checkpoint was not written by the DDP engine (was train.deepspeed set?)"
            )
        state = torch.load(path, map_location=self.device, weights_only=True)
        own = dict(self.module.named_parameters())
        missing = sorted(set(state["parameters"]) - set(own))
        if missing:
            raise KftuneError(
                f"{path}: parameters {missing[:3]} are not in this model; the checkpoint belongs to another model or method"
            )
        _copy_into(self.module, state["parameters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def consolidated(self, build_model, rank: int, state: dict[str, torch.Tensor] | None = None):
        """The trained model as a plain module (DDP replicas are whole and identical), holding `state`
        (a `trained_state` taken earlier) when given."""
        if state:
            _copy_into(self.module, state)
        return self.module


class DeepSpeedEngine:
    """A DeepSpeed engine for ZeRO stages 0-3. It gets torch's AdamW, or DeepSpeed's CPU Adam (a C++ op,
    built at install time or on first use) when the optimizer state is offloaded to the CPU: that is the
    op the offloaded step runs on, GPUs or not, and several times faster there than torch's."""

    def __init__(
        self, model, groups: list[dict], train: TrainSection, total_steps: int, world: int, device: torch.device
    ):
        import deepspeed

        from kftune.train.deepspeed_config import deepspeed_config

        self.train, self.world, self.device = train, world, device
        if device.type == "cpu":
            skip_shm_op()
        if train.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=train.lr, weight_decay=train.weight_decay, adamw_mode=True)
        else:
            optimizer = torch_adamw(groups, train, device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(train, total_steps)),
            config=deepspeed_config(train, world),
            dist_init_required=False,
        )
        self.model = self.engine
        self.module = self.engine.module

    def compile(self) -> None:
        """DeepSpeed's own compile rather than torch's on the module: it compiles the module in place with
        the accelerator's backend and turns off its NVTX ranges, which would break the graphs."""
        self.engine.compile()

    @contextlib.contextmanager
    def micro_step(self):
        yield  # DeepSpeed holds the reduction itself and casts the model to bf16/fp16 when asked

    def backward(self, loss_share: torch.Tensor) -> None:
        # DeepSpeed divides by the accumulation steps and averages over workers; undo both to get the sum.
        self.engine.backward(loss_share * self.world * self.train.gradient_accumulation)

    def at_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def loss_scale(self) -> float:
        """The factor DeepSpeed's gradients carry until the step divides it out (fp16's loss scale; 1 otherwise)."""
        return float(self.engine.optimizer.loss_scale)

    def step(self) -> bool:
        boundary = self.at_boundary()
        self.engine.step()
        return boundary

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def trainable_set_changed(self) -> None:
        raise KftuneError(
            "DeepSpeed cannot change the trained parameter set mid-run (config validation refuses such methods)"
        )

    def save(self, directory: Path, rank: int) -> None:
        """Every worker writes its shard of the ZeRO state; Ray Train gathers them into one checkpoint."""
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        if not (directory / DEEPSPEED_TAG).is_dir():
            raise KftuneError(
                f"{directory / DEEPSPEED_TAG}: missing; this checkpoint was not written by the DeepSpeed engine"
            )
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
        if loaded is None:
            raise KftuneError(f"{directory / DEEPSPEED_TAG}: DeepSpeed could not load this checkpoint")

    def trained_state(self, rank: int) -> dict[str, torch.Tensor]:
        """The trained parameters gathered from every worker's ZeRO shards onto rank 0 (`{}` elsewhere):
        the optimizer's fp32 master copies where DeepSpeed trains in 16 bits. Collective."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        state = {}
        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            for name, parameter in trainable:
                master = safe_get_full_fp32_param(
                    parameter
                )  # collective under ZeRO-3: every worker asks for every parameter
                if rank == 0:
                    state[name] = (parameter.detach() if master is None else master).float().cpu().clone()
        return state

    def kept_state(self, rank: int) -> dict[str, torch.Tensor]:
        """`train.keep_best`'s copy of the weights. Under ZeRO-3 each worker copies its own partitions of
        the trained parameters, in the dtype they are saved in (`kftune.train.partitioned.load_into_partitions`
        puts them back), so no worker ever holds them whole; else rank 0's `trained_state` (collective)."""
        if not self.train.partitions_weights:
            return self.trained_state(rank)
        return {n: p.ds_tensor.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def consolidated(self, build_model, rank: int, state: dict[str, torch.Tensor] | None = None):
        """On rank 0, a fresh plain model (`build_model()`) holding `state` (a `trained_state` taken
        earlier) or else the trained parameters now; None elsewhere. Collective: every worker calls it.
        A plain module is what the artifact, the probe and a later reload all see."""
        state = self.trained_state(rank) if state is None else state
        if rank != 0:
            return None
        model = build_model()
        _copy_into(model, state)
        return model


def _copy_into(model, state: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def skip_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (30-150 s);
    gloo's all-reduce is fine for CPU runs, so mark the op unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
