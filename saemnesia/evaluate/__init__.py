"""The erasure benchmark (METHOD section 6): UA, IRA and CRA per erased concept, for both methods.

For every erased concept each method gets its strength searched on TUNING seeds, choosing the setting
with the best (UA + IRA) / 2 on sampled prompts, and is then measured on every cell of the object x style
grid (and its unstyled row) at separate HELD-OUT seeds, counted as the authors' scripts count it.
SAEmnesia searches the 7 strengths of its kind's grid (`OBJECT_STRENGTHS`, `STYLE_STRENGTHS`) on its
concept's own latent; SAeUron searches 3 feature counts (its percentiles 99.999 / 99.995 / 99.99 at the paper's
20,480 latents: 1 / 2 / 3 latents a step) x the same 7 strengths. Sequential erasure then erases the
world's first objects together, one more each step. The classifier judges every image; the untouched
model, run once, gives the ceiling, and the same model with every block but the style block ablated gives
UA's chance ceiling.

Each method runs with each of the protocol's interventions: `steer` (the search above) and `replace`
(PER), which scales nothing and so searches no strength: SAEmnesia's replace has nothing to choose (no
tuning images), SAeUron's chooses its latents per step (3 trials). With an artifact detector every image
is also judged clean or corrupted, and each row reports AR, the artifact rate on the erased concept's
own images (`Metrics.ar`).

One module a job, each name re-exported here:
- `protocol`: the protocols (`FULL`, `STANDARD`, `QUICK`), their prompts, the held-out grid and the plan of
  every image;
- `metrics`: UA / IRA / CRA (over the grid, and pooled for the search) and the artifact rate on judged images,
  the ceiling, the papers' numbers;
- `search`: settings, pipeline names, each method's grid, choosing a setting, the tuned settings read back;
- `cache`: the verdict cache, the fingerprint that keeps it honest, the judge that fills it;
- `benchmark`: `evaluate`, the whole run;
- `diagnostics`: a live check of one erasure, block ablation, UA's chance ceiling, edit coverage;
- `report`: the table, the plots, the result files and the cached result sets.
"""

from saemnesia.evaluate.benchmark import evaluate
from saemnesia.evaluate.cache import UNTOUCHED, VerdictCache, fingerprint
from saemnesia.evaluate.diagnostics import (
    CONFIDENT,
    ablate_blocks,
    chance_blocks,
    chance_ceiling,
    chance_survival,
    edit_coverage,
    live_check,
    unconditional_blocks,
)
from saemnesia.evaluate.metrics import (
    KINDS,
    METRICS,
    PAPER_AR,
    PAPER_TABLE,
    TABLE1_METRICS,
    Judged,
    Metrics,
    accuracy,
    ceiling,
    concept_accuracies,
    erasure_metrics,
    grid_metrics,
    judged_artifact_rate,
    other_kind,
)
from saemnesia.evaluate.protocol import (
    FULL,
    PROTOCOLS,
    QUICK,
    STANDARD,
    PromptSpec,
    Protocol,
    balanced_prompts,
    erasure_prompts,
    grid_prompts,
    planned_images,
    trials_of,
)
from saemnesia.evaluate.report import (
    BENCHMARK_PROTOCOLS,
    METRIC_COLOURS,
    benchmark_results,
    plot_sequential,
    plot_strength_curves,
    result_paths,
    result_set_label,
    result_sets,
    results_table,
    write_results,
)
from saemnesia.evaluate.search import (
    DEFAULT_STRENGTH,
    METHOD_NAMES,
    OBJECT_STRENGTHS,
    PAPER_GRID_TRIALS,
    PAPER_LATENTS,
    REPLACE_STRENGTH,
    SAEURON_FEATURES,
    SAEURON_PERCENTILES,
    SELECTION_RULES,
    SEQUENTIAL_RULE,
    STYLE_STRENGTHS,
    TIES,
    Setting,
    choose_setting,
    joint_setting,
    pipeline_key,
    pipeline_label,
    search_grid,
    setting_or_default,
    tuned_setting,
)

__all__ = [
    "BENCHMARK_PROTOCOLS",
    "CONFIDENT",
    "DEFAULT_STRENGTH",
    "FULL",
    "Judged",
    "KINDS",
    "METHOD_NAMES",
    "METRICS",
    "METRIC_COLOURS",
    "Metrics",
    "OBJECT_STRENGTHS",
    "PAPER_AR",
    "PAPER_GRID_TRIALS",
    "PAPER_LATENTS",
    "PAPER_TABLE",
    "PROTOCOLS",
    "PromptSpec",
    "Protocol",
    "QUICK",
    "REPLACE_STRENGTH",
    "SAEURON_FEATURES",
    "SAEURON_PERCENTILES",
    "SELECTION_RULES",
    "SEQUENTIAL_RULE",
    "STANDARD",
    "STYLE_STRENGTHS",
    "Setting",
    "TABLE1_METRICS",
    "TIES",
    "UNTOUCHED",
    "VerdictCache",
    "ablate_blocks",
    "accuracy",
    "balanced_prompts",
    "benchmark_results",
    "ceiling",
    "chance_blocks",
    "chance_ceiling",
    "chance_survival",
    "choose_setting",
    "concept_accuracies",
    "edit_coverage",
    "erasure_metrics",
    "erasure_prompts",
    "evaluate",
    "fingerprint",
    "grid_metrics",
    "grid_prompts",
    "joint_setting",
    "judged_artifact_rate",
    "live_check",
    "other_kind",
    "pipeline_key",
    "pipeline_label",
    "planned_images",
    "plot_sequential",
    "plot_strength_curves",
    "result_paths",
    "result_set_label",
    "result_sets",
    "results_table",
    "search_grid",
    "setting_or_default",
    "trials_of",
    "tuned_setting",
    "unconditional_blocks",
    "write_results",
]
