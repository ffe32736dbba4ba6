"""Typed training configuration (also the omegaconf schema of the `train` section)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_atlas.data.config import DataConfig
from megatron_atlas.model.config import ConfigError, _check_choice, _check_positive

SCHEDULES = ("cosine", "wsd", "constant")
ZERO_STAGES = (0, 1, 2, 3)
ENGINES = ("auto", "native", "deepspeed")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def _check_range(key: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    ok = (low < value if open_low else low <= value) and value <= high
    if not ok:
        raise ConfigError(f"{key}={value!r} must be in {'(' if open_low else '['}{low}, {high}]")


@dataclass
class TrainConfig:
    steps: int = 1000                 # optimizer steps
    micro_batch_size: int = 8         # sequences per forward/backward
    grad_accum: int = 1               # micro-batches per optimizer step
    seq_len: int = 4096
    lr: float = 3e-3                  # peak learning rate
    min_lr_ratio: float = 0.1         # final lr = lr * min_lr_ratio (cosine, wsd)
    warmup_steps: int = 100           # linear warmup from lr / warmup_steps
    schedule: str = "cosine"          # cosine | wsd | constant
    decay_fraction: float = 0.2       # wsd: share of the steps spent decaying
    weight_decay: float = 0.1         # applied to parameters with >= 2 dims only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0            # max global grad norm; 0 = no clipping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100             # 0 = only at the end
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    tf32: bool = True                 # CUDA: fp32 matmuls/convolutions on TF32 tensor cores
    out_dir: str = "runs/default"
    save_every: int = 0               # checkpoint every N steps (0: only at the end)
    keep_last: int = 3                # complete checkpoints kept (0: all)
    resume: str = "none"              # none | auto (latest checkpoint in out_dir, if any) | a path
    prefetch_steps: int = 2           # steps of batches built ahead on a background thread (0: inline)
    compile: bool = False             # torch.compile the model for the training and eval steps
    tensorboard: bool = True          # also write TensorBoard scalars to out_dir/tensorboard
    peak_tflops: float = 0.0          # per-device peak for MFU (e.g. 989 for H100 bf16); 0 = not shown
    max_bad_steps: int = 5            # non-finite loss/grad steps are skipped; stop after this many in a row
    exit_at_step: int = 0             # end this run (with a checkpoint) after this step, keeping the
                                      # schedule of `steps`: for jobs with a time limit; 0 = off
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.seq_len

    def validate(self, prefix: str = "train") -> "TrainConfig":
        for key in ("steps", "micro_batch_size", "grad_accum", "seq_len", "log_every", "max_bad_steps"):
            _check_positive(f"{prefix}.{key}", getattr(self, key))
        for key in ("warmup_steps", "eval_every", "seed", "save_every", "keep_last", "exit_at_step",
                    "prefetch_steps"):
            _check_positive(f"{prefix}.{key}", getattr(self, key), minimum=0)
        _check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        _check_choice(f"{prefix}.device", self.device, DEVICES)
        _check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        _check_range(f"{prefix}.lr", self.lr, 0.0, 1.0, open_low=True)
        _check_range(f"{prefix}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range(f"{prefix}.decay_fraction", self.decay_fraction, 0.0, 1.0)
        _check_range(f"{prefix}.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range(f"{prefix}.beta1", self.beta1, 0.0, 0.999999)
        _check_range(f"{prefix}.beta2", self.beta2, 0.0, 0.999999)
        _check_range(f"{prefix}.eps", self.eps, 0.0, 1.0, open_low=True)
        _check_range(f"{prefix}.grad_clip", self.grad_clip, 0.0, float("inf"))
        _check_range(f"{prefix}.peak_tflops", self.peak_tflops, 0.0, float("inf"))
        if not self.resume:
            raise ConfigError(f"{prefix}.resume must be none, auto or a checkpoint folder")
        if not self.out_dir:
            raise ConfigError(f"{prefix}.out_dir must not be empty")
        self.data.validate(f"{prefix}.data")
        return self


@dataclass
class ParallelConfig:
    """How one run is spread over processes (the `parallel` section; DESIGN section 4).

    The data-parallel size is what is left: world size / (tp * cp). One process with zero_stage 0
    trains with plain PyTorch; anything else runs through DeepSpeed (`engine=auto`).
    """

    tp: int = 1                        # tensor-parallel degree (ranks adjacent: one node's fast links)
    cp: int = 1                        # context-parallel degree
    sequence_parallel: bool = False    # Megatron-style sequence parallelism inside the TP group
    zero_stage: int = 0                # DeepSpeed ZeRO: 0 none, 1 optimizer states, 2 + grads, 3 + params
    deepspeed: str = ""                # configs/deepspeed/NAME.json ("" = zero<zero_stage>)
    engine: str = "auto"               # auto | native (single process only) | deepspeed
    activation_checkpointing: bool = False   # recompute each block in the backward pass

    @property
    def deepspeed_config_name(self) -> str:
        return self.deepspeed or f"zero{self.zero_stage}"

    def validate(self, prefix: str = "parallel") -> "ParallelConfig":
        _check_positive(f"{prefix}.tp", self.tp)
        _check_positive(f"{prefix}.cp", self.cp)
        _check_choice(f"{prefix}.zero_stage", self.zero_stage, ZERO_STAGES)
        _check_choice(f"{prefix}.engine", self.engine, ENGINES)
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(f"{prefix}.sequence_parallel=true needs {prefix}.tp > 1 (got tp=1)")
        if self.engine == "native" and (self.zero_stage or self.tp > 1 or self.cp > 1):
            raise ConfigError(f"{prefix}.engine=native runs one plain PyTorch process: it cannot take "
                              f"zero_stage={self.zero_stage}, tp={self.tp}, cp={self.cp}; use engine=auto")
        if self.cp > 1:
            raise ConfigError(f"{prefix}.cp={self.cp}: context parallelism is not wired into training yet; "
                              "use cp=1")
        return self
