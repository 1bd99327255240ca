"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) behind the engine interface.

The DeepSpeed config is derived from the job: the three batch values from the plan, precision, clipping, the ZeRO
stage and offload; `engine.ds_config` adds raw keys, and one that contradicts the plan is a UserError before any
process starts. Conventions, each with one owner: the trainer divides the loss once (`backward(scale_wrt_gas=False)`)
and sets the accumulation boundary on every micro-step; the trainer's schedule sets the LR (no DeepSpeed scheduler)
and advances only on applied steps; DeepSpeed clips and steps, and the logged norm is the global pre-clip norm
(DeepSpeed's at stage 1+, ours at stage 0 where it gives none).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from largebatch import builds
from largebatch.batch import BatchPlan
from largebatch.config import Config
from largebatch.dist import DistInfo, broadcast_from_main
from largebatch.engine.base import Engine, trainable, written_by_another_engine
from largebatch.engine.features import YES, cuda_only, refused
from largebatch.errors import UserError
from largebatch.memory import State
from largebatch.precision import StepOutcome, grad_norm

TAG = "deepspeed"
"""The DeepSpeed checkpoint tag: its files go under `<checkpoint>/deepspeed/`."""
FP16 = (
    "with engine.name=deepspeed needs CUDA and engine.zero_stage 1-3 (its loss scaler lives in the ZeRO "
    "optimizer); use bf16, or engine.name=ddp"
)
OWNED = {
    "train_batch_size": "batch.global_size",
    "train_micro_batch_size_per_gpu": "batch.micro_size",
    "gradient_accumulation_steps": "batch.accum_steps",
    "gradient_clipping": "train.clip_grad_norm",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "torch_autocast": "train.precision",
    "optimizer": "optim.name",
    "scheduler": "schedule.name",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer": "engine.offload",
}
"""DeepSpeed keys that largebatch sets from the config (the key that sets them): ds_config may only repeat them."""


def deepspeed_config(cfg: Config, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed config this job runs with; raises UserError on an impossible or contradicting setting (the
    features DeepSpeedEngine refuses are its `check`'s)."""
    e, stage = cfg.engine, cfg.engine.zero_stage
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("engine.name=deepspeed needs the deepspeed package; pip install deepspeed")
    if e.offload == "cpu" and stage == 0:
        raise UserError(
            "engine.offload=cpu moves the sharded optimizer state: set engine.zero_stage to 1, 2 or 3"
        )
    zero: dict[str, Any] = {"stage": stage}
    if e.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ours: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum_steps,
        "gradient_clipping": cfg.train.clip_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        ours["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg.train.precision == "fp16":
        ours["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": round(math.log2(cfg.train.fp16_init_scale)),
        }
    return _merge(ours, _user_config(cfg), "")


def _user_config(cfg: Config) -> dict[str, Any]:
    raw = cfg.engine.ds_config
    if raw is None or isinstance(raw, dict):
        return raw or {}
    path = Path(raw)
    if not path.is_absolute() and not path.exists() and cfg.origin:
        path = Path(cfg.origin) / path
    if not path.is_file():
        raise UserError(
            f"engine.ds_config={raw} not found; give a DeepSpeed JSON/YAML file or a mapping"
        )
    try:
        loaded = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError:
        raise UserError(
            f"engine.ds_config={raw} is not valid JSON or YAML; fix the syntax"
        ) from None
    if not isinstance(loaded, dict):
        raise UserError(f"engine.ds_config={raw} must hold a mapping of DeepSpeed keys")
    return loaded


def _merge(ours: dict[str, Any], theirs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`ours` with `theirs` merged in; a key of theirs that contradicts ours (or that we own) is a UserError."""
    merged = dict(ours)
    for key, value in theirs.items():
        name = f"{prefix}{key}"
        if key in ours and isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = _merge(ours[key], value, f"{name}.")
        elif key in ours and ours[key] != value:
            owner = OWNED.get(name, "largebatch")
            raise UserError(
                f"engine.ds_config sets {name}={value!r} but {owner} gives {ours[key]!r}; "
                f"remove it from engine.ds_config and set {owner}"
            )
        elif key not in ours and name in OWNED:
            raise UserError(
                f"engine.ds_config sets {name}, which {OWNED[name]} owns; remove it and set {OWNED[name]}"
            )
        else:
            merged[key] = value
    return merged


class DeepSpeedEngine(Engine):
    """`model` is DeepSpeed's engine (forward, backward, step); `module` the bare model inside it."""

    needs_process_group = True
    """deepspeed.initialize wants a process group, also for one process."""
    measures_in_reduction = False
    redoes_micro_steps = False  # micro_size=auto is refused
    columns = {f"deepspeed-{stage}": f"engine.zero_stage={stage}" for stage in range(4)}
    capabilities = {
        "noise": (
            YES,
            YES,
            *(
                refused(
                    f"needs each rank's gradient before the reduction, which engine.zero_stage={stage} "
                    f"does not keep; use engine.zero_stage=0 or 1"
                )
                for stage in (2, 3)
            ),
        ),
        "gns": (
            YES,
            YES,
            *(
                refused(
                    f"follows train.noise_scale, which engine.zero_stage={stage} cannot measure; use "
                    f"engine.zero_stage=0 or 1, or batch.schedule=ramp"
                )
                for stage in (2, 3)
            ),
        ),
        "cbs": refused(
            "branches copy the engine's whole training state in memory, which engine.name=deepspeed holds in its "
            "own engine (not built); use engine.name=ddp, or largebatch cbs on a ddp run's checkpoint"
        ),
        "auto": refused(
            "is not supported with engine.name=deepspeed; set batch.micro_size (largebatch find-batch "
            "measures it)"
        ),
        "fp16": (
            refused(FP16),
            cuda_only(FP16),
            *(
                cuda_only(FP16, f"tests_gpu/test_cuda.py::test_deepspeed_zero[fp16-{stage}]")
                for stage in (2, 3)
            ),
        ),
        "layerwise": (
            YES,
            *(
                refused(
                    f"computes a trust ratio per layer, but engine.zero_stage={stage} flattens layers into "
                    f"partitions (it would be per chunk); use engine.name=fsdp (sharded, per-layer ratios "
                    f"kept), engine.zero_stage=0, or sgd, adamw or a torch_optimizer:<Class>"
                )
                for stage in (1, 2, 3)
            ),
        ),
        "muon": (
            YES,
            *(
                refused(
                    f"orthogonalises whole weight matrices, but engine.zero_stage={stage} flattens them into "
                    f"partitions; use engine.name=fsdp (sharded, whole-matrix Muon) or ddp, or "
                    f"engine.zero_stage=0"
                )
                for stage in (1, 2, 3)
            ),
        ),
        "groups": (
            YES,
            *(
                refused(
                    f"steps each group with its own optimizer, but engine.zero_stage={stage} flattens "
                    f"parameters into partitions; use engine.name=fsdp or ddp, or engine.zero_stage=0"
                )
                for stage in (1, 2, 3)
            ),
        ),
        "compile": refused(
            "is not wired to DeepSpeed's engine.compile here (its ZeRO hooks and our step would need testing "
            "together); use engine.name=ddp or fsdp, or train.compile=false"
        ),
    }

    @classmethod
    def column(cls, cfg: Config) -> int:
        return cfg.engine.zero_stage

    @classmethod
    def check(cls, cfg: Config, plan: BatchPlan, model: nn.Module | None) -> None:
        """Also: the DeepSpeed config can be derived (`deepspeed_config`)."""
        super().check(cfg, plan, model)
        deepspeed_config(cfg, plan)

    @staticmethod
    def per_rank(cfg: Config, world_size: int, whole: State) -> State:
        """Stage 1+ shards the optimizer state and adds an fp32 master copy of the parameters, sharded; stage 2+ the
        gradients; stage 3 the parameters."""
        stage, share = cfg.engine.zero_stage, lambda n: -(-n // world_size)
        if stage == 0:
            return whole
        return State(
            share(whole.params) if stage >= 3 else whole.params,
            share(whole.grads) if stage >= 2 else whole.grads,
            share(whole.optimizer + whole.params),
        )

    def __init__(
        self,
        module: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        cfg: Config,
        plan: BatchPlan,
        info: DistInfo,
    ) -> None:
        import deepspeed

        self.config = deepspeed_config(cfg, plan)
        for name, value in (
            ("LOCAL_RANK", info.local_rank),
            ("RANK", info.rank),
            ("WORLD_SIZE", info.world_size),
        ):
            os.environ.setdefault(
                name, str(value)
            )  # what a launcher sets, and DeepSpeed asserts; one process has none
        self.stage = cfg.engine.zero_stage
        comm = _comm_op_builder()
        if comm is not None:  # deepspeed.initialize would build it, unannounced
            _load(comm, "DeepSpeed's CPU comm op")
        module = module.to(info.device)
        self.optimizer = make_optimizer(module)
        if cfg.engine.offload == "cpu" and type(self.optimizer) is torch.optim.AdamW:
            self.optimizer = _cpu_adam(self.optimizer)
        self.ds, *_ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, config=self.config, dist_init_required=False
        )
        self.model = self.ds
        self.module = self.ds.module
        self.params = trainable(self.module)
        self.fp16 = cfg.train.precision == "fp16"
        self._factor = 1.0

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """The accumulation boundary is ours to set: DeepSpeed reduces (and may step) only at `sync`."""
        self.ds.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # bf16: DeepSpeed's torch_autocast wraps its own forward

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def reduce_gradients(self) -> None:
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.allreduce_gradients()

    def scale_gradients(self, factor: float) -> None:
        """Stage 0: the reduced gradients are the parameters' own. Stage 1+: they sit in DeepSpeed's partitions, which
        it divides by the loss scale before clipping and stepping; dividing that scale by `factor` for this step
        scales the gradients, the norm DeepSpeed reports and its clipping alike."""
        if self.stage == 0:
            super().scale_gradients(factor)
        else:
            self._factor *= factor

    def set_plan(self, plan: BatchPlan) -> None:
        """A batch schedule changed accumulation. The trainer sets every boundary and divides the loss itself
        (`scale_wrt_gas=False`), so DeepSpeed's train_batch_size and accumulation count feed only its bookkeeping
        (`global_samples`, kept in its checkpoints); `set_train_batch_size` rewrites both (the micro-batch stays)."""
        self.ds.set_train_batch_size(plan.global_batch)

    def local_grad_sq(self) -> float:
        """Stages 0 and 1 keep each rank's accumulated gradient in `.grad` until the reduction."""
        return (grad_norm(self.params).item() / (self.loss_scale or 1.0)) ** 2

    def step(self, loss: float, max_norm: float | None, norm_sq: float) -> StepOutcome:
        """DeepSpeed clips (gradient_clipping = max_norm) and steps; an overflow or non-finite gradient skips it."""
        if self.stage == 0:
            return self._step_stage0(loss)
        if not math.isfinite(loss):
            self._factor = (
                math.nan
            )  # a non-finite norm: DeepSpeed skips the step and frees the gradients
        optimizer = self.ds.optimizer
        before = optimizer.loss_scale
        optimizer.loss_scale = before / self._factor
        skipped = self.ds.skipped_steps
        self.ds.step()
        after = optimizer.loss_scale
        optimizer.loss_scale = before if after == before / self._factor else after * self._factor
        self._factor = 1.0
        applied = self.ds.skipped_steps == skipped
        norm = self.ds.get_global_grad_norm()
        norm = math.inf if norm is None else float(norm)
        nonfinite = not applied and (
            not self.fp16 or not math.isfinite(loss) or optimizer.loss_scale < 1.0
        )
        return StepOutcome(applied, nonfinite, norm)

    def _step_stage0(self, loss: float) -> StepOutcome:
        """Stage 0 steps the torch optimizer itself, without a norm or an overflow check: both are ours."""
        norm = grad_norm(self.params).item()
        applied = math.isfinite(loss) and math.isfinite(norm)
        if applied:
            self.ds.step()
        else:
            self.ds.zero_grad()
        return StepOutcome(applied, not applied, norm)

    @property
    def loss_scale(self) -> float | None:
        return float(self.ds.optimizer.loss_scale) if self.fp16 else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on every rank (stage 3 gathers its partitioned parameters; collective)."""
        if self.stage < 3:
            return self.module.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 writes in state.pt: nothing, the model and optimizer go through `save_shards`."""
        return {}

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its part of the model and optimizer state under `directory/deepspeed/` (collective).

        DeepSpeed's save has barriers between its writes (after rank 0 makes the directory, and at the end), so a
        rank whose write raised would leave its peers waiting in one: each write's failure is recorded instead,
        every rank runs the save to its end, and the first failure is raised here, for the trainer to agree on."""
        from deepspeed.checkpoint import constants

        universal = {
            constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
        failures: list[Exception] = []
        writer, recovery_script = self.ds.checkpoint_engine, self.ds._copy_recovery_script
        self.ds.checkpoint_engine = _RecordingWriter(writer, failures)
        self.ds._copy_recovery_script = _recorded(recovery_script, failures)
        try:
            self.ds.save_checkpoint(
                str(directory),
                tag=TAG,
                client_state={constants.UNIVERSAL_CHECKPOINT_INFO: universal},
                save_latest=False,
            )
        finally:
            self.ds.checkpoint_engine = writer
            del self.ds._copy_recovery_script
        if failures:
            raise failures[0]

    def load_state_dict(self, state: dict[str, Any], directory: Path) -> None:
        """Load this engine's checkpoint; one written by another number of processes goes through DeepSpeed's
        universal checkpoint (converted once, by rank 0, beside the checkpoint), at stages 1-3."""
        saved_ranks = len(glob.glob(str(directory / TAG / "*optim_states.pt")))
        world = dist.get_world_size()
        if self.stage == 0 or saved_ranks == world:
            self._load(directory)
            return
        universal = directory.parent / f".universal_{directory.name}"
        problem = broadcast_from_main(
            _to_universal(directory / TAG, universal / TAG) if dist.get_rank() == 0 else None
        )
        if problem:
            raise UserError(
                f"cannot resume {directory} ({saved_ranks} processes) on {world}: {problem}"
            )
        self.ds._config.load_universal_checkpoint = True
        try:
            self._load(universal)
        finally:
            self.ds._config.load_universal_checkpoint = False
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(universal, ignore_errors=True)

    def _load(self, directory: Path) -> None:
        """Load model and optimizer state; the optimizer's hyperparameters (LR included) stay this run's config's."""
        with self.keeping_hyperparameters():
            path, _ = self.ds.load_checkpoint(
                str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if path is None:
            raise written_by_another_engine(directory, f"DeepSpeed state under {TAG}/")

    def files(self) -> dict[str, Any]:
        """Written to the run directory: the effective DeepSpeed config."""
        return {"deepspeed.json": self.config}


def _cpu_adam(adamw: torch.optim.AdamW) -> torch.optim.Optimizer:
    """The same AdamW as DeepSpeed's CPU Adam, which steps offloaded optimizer state several times faster."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder

    _load(CPUAdamBuilder(), "DeepSpeed's CPU Adam op")
    d = adamw.defaults
    groups = [
        {k: v for k, v in g.items() if k in ("params", "weight_decay", "adapt")}
        for g in adamw.param_groups
    ]
    return DeepSpeedCPUAdam(
        groups,
        lr=d["lr"],
        betas=d["betas"],
        eps=d["eps"],
        weight_decay=d["weight_decay"],
        adamw_mode=True,
    )


def _comm_op_builder() -> Any:
    """The builder of DeepSpeed's shared-memory comm op where deepspeed.comm uses it (a CPU accelerator on Linux),
    else None."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def _load(builder: Any, what: str) -> Any:
    """DeepSpeed's op from `builder`, JIT-built (announced) unless it is in the cache or was installed prebuilt;
    DeepSpeed's own later load of it is then instant (it keeps loaded ops)."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):
        return builder.load(verbose=False)
    sources = [Path(builder.deepspeed_src_path(source)) for source in builder.sources()]
    with builds.announced(what, builder.name, sources):
        return builder.load(verbose=False)


def build_ahead() -> tuple[str, str]:
    """For `largebatch build`: (what, the built library or why there is none) for DeepSpeed's CPU comm op."""
    what = "DeepSpeed's CPU comm op"
    if importlib.util.find_spec("deepspeed") is None:
        return what, "not built: deepspeed is not installed"
    builder = _comm_op_builder()
    if builder is None:
        return what, "not needed here: DeepSpeed uses the accelerator's own collectives"
    try:
        return what, _load(builder, what).__file__
    except Exception as exc:  # noqa: BLE001 - any build failure: say why
        return what, f"not built: {type(exc).__name__}: {str(exc).strip()[:200]}"


def _to_universal(source: Path, target: Path) -> str | None:
    """Convert a DeepSpeed checkpoint to the universal format (DeepSpeed's ds_to_universal); None or what failed."""
    shutil.rmtree(target.parent, ignore_errors=True)
    target.parent.mkdir(parents=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(source),
            "--output_folder",
            str(target),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--no_strict",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return (done.stderr.strip().splitlines() or ["ds_to_universal failed"])[-1]
    return None


def _recorded(write: Callable[..., Any], failures: list[Exception]) -> Callable[..., Any]:
    """`write` that appends its exception to `failures` instead of raising it."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return write(*args, **kwargs)
        except Exception as exc:
            failures.append(exc)
            return False

    return run


class _RecordingWriter:
    """DeepSpeed's checkpoint engine with every write's failure recorded, not raised (see `save_shards`). Its own
    torch.save writes through a Python file, so that a full disk keeps its errno (a path goes to a C++ stream that
    says only "basic_ios::clear")."""

    def __init__(self, inner: Any, failures: list[Exception]) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        self.inner = inner
        self.by_file = type(inner) is TorchCheckpointEngine
        for name in ("create", "makedirs", "commit"):
            setattr(self, name, _recorded(getattr(inner, name), failures))
        self.save = _recorded(self._save, failures)

    def _save(self, state_dict: dict[str, Any], path: str) -> None:
        if not self.by_file:
            self.inner.save(state_dict, path)
            return
        with open(path, "wb") as f:
            self.inner.save(state_dict, f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
