"""Process groups, conjugate collectives and tensor/sequence-parallel layers (DESIGN section 4)."""
from megatron_atlas.parallel.state import (ParallelConfigError, ParallelState, build_parallel_state,
                                           group_ranks, init_distributed, rank_coordinates)
from megatron_atlas.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_atlas.parallel.grads import reduce_sequence_parallel_grads
from megatron_atlas.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                            gather_logits)
from megatron_atlas.parallel.sharding import gather_state_dict, partition_dims, shard_state_dict

__all__ = ["ColumnParallelLinear", "ParallelConfigError", "ParallelState", "RowParallelLinear",
           "VocabParallelEmbedding", "build_parallel_state", "gather_logits", "gather_state_dict",
           "group_ranks", "init_distributed", "partition_dims", "rank_coordinates",
           "reduce_sequence_parallel_grads", "shard_state_dict", "vocab_parallel_cross_entropy"]
