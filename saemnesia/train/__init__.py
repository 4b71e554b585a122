"""Making the SAEs: collect activations, train SAeUron's SAE, take statistics, fine-tune SAEmnesia's SAE.

One function per stage, each a CLI command (METHOD sections 2, 3 and 5), each in its own module:
1. `collect` (collection.py): every labelled (object, style, template) prompt of a world, over the whole
   sampling trajectory and several seeds, stored as float16 tokens in safetensors shards; read back
   with `Activations` (activations.py). `probe_blocks` (probe.py) measures where concepts can be read.
2. `train_sae` (unsupervised.py): an unsupervised TopK SAE trained as SAeUron trains it with sparsify.
3. `compute_stats` (concept_stats.py): mean activation of every latent per concept and step; then
   `build_dictionary`; `compute_footprints`: each concept's mean reconstruction token by token, for Paint.
4. `finetune` (supervised.py): SAEmnesia's supervised fine-tuning, binding each concept to its
   dictionary latent.
5. `centralisation_report` (feature_centralisation.py): how much of each concept's score its single best
   latent holds, and how far apart the concepts' decoder rows are.
"""

from saemnesia.train.activations import LABELS, MANIFEST_FILE, Activations, heldout_images
from saemnesia.train.collection import LabelledPrompt, collect, labelled_prompts, process_shards
from saemnesia.train.concept_stats import compute_footprints, compute_stats, write_stats
from saemnesia.train.feature_centralisation import (
    CENTRALISATION_FILE,
    centralisation,
    centralisation_report,
    centralisation_table,
    decoder_overlap,
    write_centralisation,
)
from saemnesia.train.probe import probe_blocks
from saemnesia.train.supervised import (
    SUPERVISIONS,
    FinetuneConfig,
    SupervisedLoss,
    evaluate_supervised,
    finetune,
    supervised_loss,
)
from saemnesia.train.unsupervised import (
    TRAINING_FILE,
    SaeTrainConfig,
    evaluate_sae,
    geometric_median,
    save_sae,
    train_sae,
)

__all__ = [
    "CENTRALISATION_FILE",
    "LABELS",
    "MANIFEST_FILE",
    "SUPERVISIONS",
    "TRAINING_FILE",
    "Activations",
    "FinetuneConfig",
    "LabelledPrompt",
    "SaeTrainConfig",
    "SupervisedLoss",
    "centralisation",
    "centralisation_report",
    "centralisation_table",
    "collect",
    "compute_footprints",
    "compute_stats",
    "decoder_overlap",
    "evaluate_sae",
    "evaluate_supervised",
    "finetune",
    "geometric_median",
    "heldout_images",
    "labelled_prompts",
    "probe_blocks",
    "process_shards",
    "save_sae",
    "supervised_loss",
    "train_sae",
    "write_centralisation",
    "write_stats",
]
