"""Training: what turns images into a zoo's examples and a zoo into a generator. Not needed to generate.

    datasets/     image datasets (ImageDataset, DatasetConfig, load_dataset)
    shardio.py    the zoo's shard format: the one place shard bytes are decoded
    data.py       zoo shards -> augmented batches of tokens (ZooStream), manifests, splits, the anchor
    lit_module.py the LightningModule: optimisation, EMA, validation by real accuracy
    train.py      `tina train`: config, trainer, the generator folder it writes
    projector.py  training an image projector into a generator folder
    accuracy.py   accuracy of a model on a task's real test images
    testing.py    stand-in generators and datasets for tests and demos

Arrows: this package imports the runtime (tina) and never zoo_builder, evaluation, serve or the CLI.
"""

from tina.extras import require

require("train", "tina.training (training, zoo building and evaluation)")
