"""The scoring stage."""
from workbench.scoring.activations import LLM_INT8_THRESHOLD, SITES, HIST_EDGES, SiteStats, ActivationStats, recording, activation_stats
from workbench.scoring.methods import Accumulators, Importance, available_methods, global_warning, ImportanceMethod, IMPORTANCE_METHODS
from workbench.scoring.importance import CACHE_KIND, input_sq_norms, only_prunable_grads, gradient_taps, param_terms, accumulate_in_backward, compute_importance, save_importance, load_importance, importance_cached
from workbench.scoring.parallel import init_from_env, importance_data_parallel
from workbench.scoring.removal import bypassed, mean_loss, INPUT_CACHE_BYTES, removal_losses, block_removal_loss
from workbench.scoring.layer_importance import layer_removal_loss, block_influence, LayerImportance, LAYER_IMPORTANCE, layer_importance, check_layer_values

__all__ = [
    "LLM_INT8_THRESHOLD",
    "SITES",
    "HIST_EDGES",
    "SiteStats",
    "ActivationStats",
    "recording",
    "activation_stats",
    "Accumulators",
    "Importance",
    "available_methods",
    "global_warning",
    "ImportanceMethod",
    "IMPORTANCE_METHODS",
    "CACHE_KIND",
    "input_sq_norms",
    "only_prunable_grads",
    "gradient_taps",
    "param_terms",
    "accumulate_in_backward",
    "compute_importance",
    "save_importance",
    "load_importance",
    "importance_cached",
    "init_from_env",
    "importance_data_parallel",
    "bypassed",
    "mean_loss",
    "INPUT_CACHE_BYTES",
    "removal_losses",
    "block_removal_loss",
    "layer_removal_loss",
    "block_influence",
    "LayerImportance",
    "LAYER_IMPORTANCE",
    "layer_importance",
    "check_layer_values",
]
