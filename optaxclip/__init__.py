"""optaxclip: gradient clipping for JAX as composable optax transforms.

Every transform is an `optax.GradientTransformation` whose state holds a
`ClipStats` (pre-clip norm, threshold, whether it fired, counters); read it
with `optaxclip.stats(opt_state)` or `optaxclip.metrics(opt_state)`.
"""

from ._adagc import AdaGCClipState as AdaGCClipState
from ._adagc import adagc_clip as adagc_clip
from ._adaptive import AdaptiveClipState as AdaptiveClipState
from ._adaptive import ZScoreClipState as ZScoreClipState
from ._adaptive import adaptive_clip as adaptive_clip
from ._adaptive import zscore_clip as zscore_clip
from ._agc import adaptive_grad_clip as adaptive_grad_clip
from ._agc import flax_unit_axes as flax_unit_axes
from ._basic import ClipByValueState as ClipByValueState
from ._basic import clip_by_global_norm as clip_by_global_norm
from ._basic import clip_by_leaf_norm as clip_by_leaf_norm
from ._basic import clip_by_value as clip_by_value
from ._diagnose import Finding as Finding
from ._diagnose import diagnose as diagnose
from ._diagnose import format_findings as format_findings
from ._diagnose import spike_steps as spike_steps
from ._diagnose import suggest_threshold as suggest_threshold
from ._dp import DPAdaptiveAggregateState as DPAdaptiveAggregateState
from ._dp import DPAggregateState as DPAggregateState
from ._dp import adaptive_noise_multipliers as adaptive_noise_multipliers
from ._dp import dp_adaptive_aggregate as dp_adaptive_aggregate
from ._dp import dp_aggregate as dp_aggregate
from ._ghost import ghost_clipped_grad_sum as ghost_clipped_grad_sum
from ._guard import GuardClipState as GuardClipState
from ._guard import guard_clip as guard_clip
from ._loss_scale import DynamicLossScaleState as DynamicLossScaleState
from ._loss_scale import dynamic_loss_scale as dynamic_loss_scale
from ._loss_scale import loss_scale as loss_scale
from ._norms import global_norm as global_norm
from ._per_example import ClippedGradSum as ClippedGradSum
from ._per_example import clipped_grad_sum as clipped_grad_sum
from ._per_example import per_example_grads as per_example_grads
from ._skip import SkipSpikesState as SkipSpikesState
from ._skip import skip_spikes as skip_spikes
from ._stats import ClipStats as ClipStats
from ._stats import metrics as metrics
from ._stats import stats as stats
from ._train_state import apply_gradients as apply_gradients

__version__ = "0.1.0"

__all__ = [
    "AdaGCClipState",
    "AdaptiveClipState",
    "ClipByValueState",
    "ClipStats",
    "ClippedGradSum",
    "DPAdaptiveAggregateState",
    "DPAggregateState",
    "DynamicLossScaleState",
    "Finding",
    "GuardClipState",
    "SkipSpikesState",
    "ZScoreClipState",
    "adagc_clip",
    "adaptive_clip",
    "adaptive_noise_multipliers",
    "apply_gradients",
    "clipped_grad_sum",
    "dp_adaptive_aggregate",
    "dynamic_loss_scale",
    "loss_scale",
    "skip_spikes",
    "spike_steps",
    "suggest_threshold",
    "zscore_clip",
    "adaptive_grad_clip",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "diagnose",
    "dp_aggregate",
    "format_findings",
    "flax_unit_axes",
    "ghost_clipped_grad_sum",
    "guard_clip",
    "global_norm",
    "metrics",
    "per_example_grads",
    "stats",
]
