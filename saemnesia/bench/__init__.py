"""`python -m saemnesia bench`: what the SAE hook, the app and the SAE trainer cost, as ratios from one run.

Each comparison takes its candidates in turn, round after round (A B A B ...), after one warm-up call
of each, so load from other processes falls on all of them alike; a ratio is the median of the
per-round ratios. Generation runs under `torch.no_grad`. Two models: MiniCanvas (the world's pipeline
from assets) and a random-weight Stable Diffusion v1.4 UNet at a small latent size, each with an SAE
at `up_blocks.1.attentions.1` (the paper's shape on SD: 1280 -> 20480, k = 32).

`timing` measures and holds rows; `subjects` builds the pipelines and SAEs and measures the pair and the
SAE's share of a UNet call; `startup` the app as a user meets it; `training` the SAE trainer; `run`
runs the sections and formats the report.
"""

from saemnesia.bench.run import BenchOptions, format_report, run_bench

__all__ = ["BenchOptions", "format_report", "run_bench"]
