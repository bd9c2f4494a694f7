"""Engine configuration: one frozen dataclass per concern, validated in ``__post_init__``.

In: values from the CLI, ``LLM(...)`` keyword arguments or the server. Out: immutable config
objects that every other module reads. Bad values raise ``ValueError`` naming the field and
what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8", "int4")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {message}")


def resolve_dtype(name: str | torch.dtype, field_name: str = "dtype") -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; 'auto' is handled by callers."""
    if isinstance(name, torch.dtype):
        _check(name in DTYPES.values(), field_name, f"unsupported dtype {name}")
        return name
    key = str(name).lower()
    _check(key in DTYPES, field_name, f"got {name!r}, allowed: auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and in which precision."""

    model: str
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype on GPU, float32 on CPU
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    trust_remote_code: bool = False
    load_format: str = "auto"  # auto: safetensors; dummy: random weights (benchmarks)

    def __post_init__(self):
        _check(bool(self.model), "model", "a local model folder is required")
        _check(self.load_format in ("auto", "safetensors", "dummy"), "load_format",
               f"got {self.load_format!r}, allowed: auto, safetensors, dummy")
        _check(self.trust_remote_code is False, "trust_remote_code", "remote code is never run")
        if self.dtype != "auto":
            resolve_dtype(self.dtype, "dtype")
        if self.max_model_len is not None:
            _check(self.max_model_len > 0, "max_model_len", f"must be > 0, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size, dtype and how much memory it may use."""

    block_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None  # bytes; None: a fraction of free device memory
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_memory: int = 256 * 1024 * 1024  # default budget on CPU
    enable_prefix_caching: bool = True

    def __post_init__(self):
        _check(self.block_size in (8, 16, 32, 64, 128), "block_size",
               f"got {self.block_size}, allowed: 8, 16, 32, 64, 128")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
               f"got {self.kv_cache_dtype!r}, allowed: {', '.join(KV_CACHE_DTYPES)}")
        if self.kv_cache_memory is not None:
            _check(self.kv_cache_memory > 0, "kv_cache_memory",
                   f"must be a positive number of bytes, got {self.kv_cache_memory}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None  # server back-pressure bound; None: unbounded
    # admit waiting requests only when this many sequence slots are free (or nothing else runs);
    # None: max_num_seqs // 8. Grouped prefills leave more decode-only steps, which run as CUDA
    # graphs (+11% offline throughput measured); under light load admission stays immediate.
    admit_batch: int | None = None
    # launch step N+1 before reading step N's sampled tokens (they stay on the device and become
    # N+1's input ids); the host reads N, checks stops and detokenizes while N+1 runs. None: on
    # where it pays (CUDA with graphs), off elsewhere. Outputs are the same either way.
    async_scheduling: bool | None = None

    def __post_init__(self):
        if self.async_scheduling is not None:
            _check(isinstance(self.async_scheduling, bool), "async_scheduling",
                   f"must be True, False or None (auto), got {self.async_scheduling!r}")
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.admit_batch is None:
            object.__setattr__(self, "admit_batch", max(1, self.max_num_seqs // 8))
        _check(self.admit_batch >= 1, "admit_batch", f"must be >= 1, got {self.admit_batch}")
        if self.max_waiting_requests is not None:
            _check(self.max_waiting_requests >= 1, "max_waiting_requests",
                   f"must be >= 1, got {self.max_waiting_requests}")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and which attention implementation it uses."""

    device: str = "auto"  # auto: cuda if available else cpu
    attention_backend: str = "auto"  # auto: triton on cuda, torch on cpu
    enforce_eager: bool = False  # True: no CUDA graphs
    cpu_threads: int | None = None  # torch threads on CPU; None: about one per 1024 of hidden size

    def __post_init__(self):
        if self.cpu_threads is not None:
            _check(isinstance(self.cpu_threads, int) and self.cpu_threads >= 1, "cpu_threads",
                   f"must be an integer >= 1, got {self.cpu_threads!r}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
               f"got {self.device!r}, allowed: auto, cpu, cuda, cuda:N")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               f"got {self.attention_backend!r}, allowed: {', '.join(ATTENTION_BACKENDS)}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but no CUDA GPU is available")
        return torch.device(self.device)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    @staticmethod
    def create(model: str, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (``LLM(model, dtype=..., block_size=...)``).

        Unknown keywords raise ``ValueError`` listing the accepted ones.
        """
        groups = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                  "device": DeviceConfig}
        parts: dict[str, dict] = {name: {} for name in groups}
        known = {}
        for name, cls in groups.items():
            for f in cls.__dataclass_fields__:
                known[f] = name
        for key, value in kwargs.items():
            if key not in known or key == "model":
                raise ValueError(f"{key}: unknown engine option; allowed: {', '.join(sorted(known))}")
            parts[known[key]][key] = value
        return EngineConfig(
            model=ModelConfig(model=model, **parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            device=DeviceConfig(**parts["device"]),
        )
