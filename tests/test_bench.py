"""The benchmark's smoke run, and the fast edit path it measures: same codes, same images (no timing asserted)."""

import json
import math
from pathlib import Path

import torch
from conftest import make_tiny_sae

from saemnesia import cli
from saemnesia.erase import EditEncoder, Erasure, PreparedEdit, StepEdit, apply_step_edit, rank_counted_changes
from saemnesia.generate import SaeHook, _block_edit
from saemnesia.sae import Sae
from saemnesia.worlds import MINICANVAS

PAIR_ROWS = [
    "plain diffusers pair (2 images, one batch)",
    "reference: plain + hooked generation",
    "hooked pair / plain diffusers pair",
    "hooked pair / reference",
    "hooked pair, replace (PER) / plain diffusers pair",
    "UNet call (batch 4)",
    "SAE per UNet call: share / floor",
    "replace (PER) per UNet call: share / its floor",
]
TRAIN_ROWS = [
    "plain loop: TopK SAE + MSE + Adam",
    "train_sae without AuxK: time / plain loop's",
    "train_sae, full recipe (AuxK): time / plain loop's",
]
RATIO_ROWS = {name for name in PAIR_ROWS + TRAIN_ROWS if "/" in name}


def test_quick_bench_reports_every_row_with_positive_finite_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli.main(["bench", "--quick", "--repeats", "1", "--skip", "app", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    has_minicanvas = (Path(MINICANVAS.model) / "model_index.json").is_file()
    expected = [("minicanvas", name) for name in PAIR_ROWS] if has_minicanvas else [("minicanvas", "skipped")]
    expected += [("sd", name) for name in PAIR_ROWS] + [("app", "skipped")] + [("train", name) for name in TRAIN_ROWS]
    assert [(row["section"], row["name"]) for row in report["rows"]] == expected
    for row in report["rows"]:
        assert row["name"] in printed
        if row["name"] in RATIO_ROWS:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        if row["samples"]:
            assert all(math.isfinite(sample) and sample > 0 for sample in row["samples"]), row
    assert {"cores", "torch_threads", "device"} <= set(report["machine"])
    assert "machine:" in printed and "result" in printed


def sae_with_biases() -> Sae:
    sae = make_tiny_sae()
    sae.b_dec.data.normal_()
    sae.encoder.bias.data.normal_(0.0, 0.1)
    return sae


def test_rank_counted_changes_equal_the_top_k_edit():
    sae = sae_with_biases()
    tokens = torch.randn(200, sae.d_in)
    codes = sae.encode(tokens)
    latents = torch.tensor([int(codes.top_indices[0, 0]), int(codes.top_indices[1, 3]), 7])
    step = StepEdit(latents, torch.tensor([-5.0, -2.0, -1.0]), torch.tensor([0.0, 0.1, -1.0]))
    edit = PreparedEdit.of(sae, step)
    from_top_k, mask = apply_step_edit(tokens, codes, edit)
    assert mask.sum() >= 2
    torch.testing.assert_close(tokens + rank_counted_changes(EditEncoder.of(sae), tokens, edit), from_top_k)


def test_edit_without_recording_gives_the_recorded_edit():
    sae = sae_with_biases()
    hidden = torch.randn(6, sae.d_in, 4, 4)  # guidance halves of 3 rows: 1 original, 2 erased
    latent = int(sae.encode(hidden[4].flatten(1).T).top_indices[0, 0])
    step = StepEdit(torch.tensor([latent]), torch.tensor([-5.0]), torch.tensor([0.0]))
    erasure = Erasure(("star",), "saemnesia", -5.0, (step,), torch.tensor([500]))
    edits = [_block_edit(SaeHook("block", sae, erasure, record), 3, 1, [500], []) for record in (False, True)]
    fast, recorded = (edit(hidden, 0) for edit in edits)
    torch.testing.assert_close(fast, recorded)
    assert not torch.equal(fast[4], hidden[4]) and torch.equal(fast[[0, 3]], hidden[[0, 3]])
