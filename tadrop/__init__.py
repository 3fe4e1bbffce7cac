"""tadrop: the maths of model merging on in-memory tensors (torch + numpy only).

See shared/SPEC.md for the semantics and docs/ARCHITECTURE.md for the contracts.
"""
from ._buffers import begin_scratch_generation, release_scratch
from .methods import (EMRChunk, EMRPartials, consensus, consensus_mask, emr, emr_rescalers,
                      emr_task_model, tall_masks, tall_task_model, task_arithmetic, task_sum, ties,
                      ties_official_vector, ties_vector)
from .quantile import AbsSelector, NonFiniteError, abs_quantiles, kth_smallest_abs
from .sparsify import DARE, ChunkKey, Identity, Sparsifier, SparsifyStats, TADrop, TopK
from .spec import MemorySink, MemorySource, MergeSpec, TensorSink, TensorSource
from .streamed import (TensorPlan, TensorResult, global_extra_ranks, global_pass_extra, global_pass_hi,
                       global_pass_lo, global_select, global_values, merge_tensor, plan_tensor)
from .reference import MergeResult, merge_state_dicts, task_model

__all__ = [
    "AbsSelector", "NonFiniteError", "abs_quantiles", "kth_smallest_abs",
    "Sparsifier", "SparsifyStats", "ChunkKey", "Identity", "TADrop", "TopK", "DARE",
    "task_arithmetic", "task_sum", "ties", "ties_vector", "emr", "EMRChunk", "EMRPartials",
    "emr_rescalers", "emr_task_model", "tall_masks", "tall_task_model", "consensus",
    "consensus_mask", "ties_official_vector",
    "MergeSpec", "TensorSource", "TensorSink", "TensorPlan", "TensorResult", "MemorySource",
    "MemorySink", "plan_tensor", "merge_tensor", "global_pass_hi", "global_pass_lo", "global_select",
    "global_values", "global_extra_ranks", "global_pass_extra",
    "MergeResult", "merge_state_dicts", "task_model", "release_scratch", "begin_scratch_generation",
]
