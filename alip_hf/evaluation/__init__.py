"""Evaluation of CLIP-style models: zero-shot classification, retrieval and linear probe, CLIP_benchmark's
metrics and names.

Modules, in import order: `classnames` (class names and templates), `presets` (tasks, presets, groups),
`archives` (a publisher's zip or tar, unpacked once), `long_retrieval` (the long-caption sets in their publishers'
files), `loading` (a task's split), `features` (sharded encoding, the zero-shot classifier and its cache), `metrics`
(pure functions of features), `runners` (features once per split, one runner per task), `reports` (results
table, recall plots, comparisons), `cards` (model cards, which import `reports`, never the other way round). The
names below are importable from here; they are loaded on first use so that importing the package (for `--help`)
stays cheap.
"""

import importlib

_EXPORTS = {
    "classnames": ("check_templates", "clip_benchmark_metadata", "named_list"),
    "presets": ("EvalTask", "LINEAR_PROBE", "PRESETS", "PRESET_GROUPS", "RECALL_CURVE_MAX_K", "RECALL_KS", "RETRIEVAL",
                "TASKS", "TASK_ALIASES", "ZEROSHOT", "resolve_tasks", "with_data_root"),
    "loading": ("captions_per_image", "class_names_and_labels", "load_split", "load_wds_split", "wds_root"),
    "features": ("ClassifierCache", "encode_images", "encode_texts", "model_fingerprint", "zeroshot_classifier"),
    "metrics": ("classification_metrics", "linear_probe", "mean_per_class_recall", "recall_at_ks", "recall_curve",
                "retrieval_metrics", "topk_accuracy", "group_metric", "mean_recall_at_1"),
    "runners": ("EvalSettings", "evaluate_model", "flatten_results", "run_and_save", "run_evaluation"),
    "reports": ("comparison_table", "datacomp_summary", "plot_comparison", "plot_recall_at_k", "results_table"),
    "cards": ("ModelCardInfo", "build_model_card", "render_model_card", "update_model_card"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
