"""Defaults shared by the linear-probe configs in `configs/probe/`.

The optimisation recipe is the official CelebV-HQ linear probe's (`config/celebv_hq/*/*_lp.yaml`,
`model/classifier.py`, `evaluate.py`): learning rate 1e-4 for Adam with betas (0.5, 0.9), batch size 32,
at most 2000 epochs, the rate halved after 7 epochs without a lower training loss (floor 1e-8), training
stopped once it reaches 1e-6, and the epoch with the best validation AUROC kept. Features are mean-reduced
over windows and fed unstandardised.
"""

import ml_collections


def base_probe_config() -> ml_collections.ConfigDict:
    """An unlocked config with every field; a config file sets the task and data, then locks it."""
    config = ml_collections.ConfigDict()
    config.task = "multilabel"  # binary | multiclass | multilabel

    config.data = ml_collections.ConfigDict()
    config.data.format = "csv"  # csv | celebvhq
    config.data.csv = ""  # csv: path of the `path,split,label...` file
    config.data.num_classes = 0  # csv multiclass: 0 infers it from the largest label
    config.data.root = ""  # celebvhq: folder holding celebvhq_info.json
    config.data.feature_dir = "marlin_vit_base_ytf"  # celebvhq: features folder under root
    config.data.attribute = ""  # celebvhq: appearance | action
    config.data.temporal_reduction = "mean"  # mean | max | min over a video's windows

    # Low-data regime: each seed draws int(n * data_ratio) train and val examples (test stays whole).
    config.data_ratio = 1.0
    config.seeds = (0,)

    config.train = ml_collections.ConfigDict()
    config.train.learning_rate = 1e-4
    config.train.adam_b1 = 0.5
    config.train.adam_b2 = 0.9
    config.train.batch_size = 32
    config.train.max_epochs = 2000
    config.train.plateau_factor = 0.5
    config.train.plateau_patience = 7
    config.train.min_learning_rate = 1e-8
    config.train.stop_learning_rate = 1e-6
    config.train.select_metric = "auc"  # validation metric that picks the epoch
    return config
