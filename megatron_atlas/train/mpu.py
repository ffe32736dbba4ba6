"""The `mpu` object DeepSpeed asks for, answered from a ParallelState.

DeepSpeed (0.19) calls the Megatron getters on it: model-parallel and data-parallel rank, size and
group (ZeRO shards and averages gradients within the data-parallel group only), and the
tensor-model-parallel variants (`deepspeed.utils.bwc`, the checkpoint's `mp_rank_XX` names, and the
grad-norm reduction over TP for parameters marked `tensor_model_parallel`).

The model-parallel group here is the TP group: DeepSpeed's checkpoint files are numbered by it and
its grad-norm all-reduce runs over it. Our sequence parallelism is Megatron's (inside the TP group),
not DeepSpeed's Ulysses, so the adapter deliberately has no `get_sequence_parallel_*` methods:
DeepSpeed then treats the Ulysses degree as 1.
"""
from __future__ import annotations

from megatron_atlas.parallel.state import ParallelState


class DeepSpeedMPU:
    def __init__(self, parallel: ParallelState) -> None:
        if parallel.cp_size != 1:
            raise ValueError(f"the DeepSpeed adapter supports cp=1 only (got cp={parallel.cp_size})")
        self.parallel = parallel

    # tensor (= model) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.parallel.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.parallel.tp_size

    def get_tensor_model_parallel_group(self):
        return self.parallel.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this process's TP group."""
        return self.parallel.global_rank - self.parallel.tp_rank

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.parallel.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.parallel.dp_size

    def get_data_parallel_group(self):
        return self.parallel.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        p = self.parallel
        return [(d * p.cp_size + p.cp_rank) * p.tp_size + p.tp_rank for d in range(p.dp_size)]

    # no pipeline parallelism
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
