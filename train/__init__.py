"""Training, evaluation and checkpointing for blossom-jax recommenders (``blossom-train``, ``blossom-eval``).

Modules (import what you need; this package root imports nothing heavy):

* ``train.data``        readers (seq / pairs / RecBole .inter / MovieLens .dat), ItemMap, leave-one-out
                        split, example indices, vectorised ``BatchIterator``, uni100 negatives.
* ``train.synthetic``   the bundled seeded dataset (``generate(SyntheticSpec())``).
* ``train.metrics``     Recall / NDCG / MRR at K from rank counts; tie handling.
* ``train.evaluation``  evaluation sets and loop, popularity baseline.
* ``train.objectives``  CE, BPR, all-positions CE and masked-item (BERT4Rec) losses.
* ``train.steps``       TrainState, optimiser, device mesh, jitted train / eval steps (data parallel).
* ``train.checkpoint``  orbax checkpoints and ``load_run`` (model config, best params, item map).
* ``train.loop``        ``fit`` (a whole run) and ``evaluate_run``.
* ``train.config``      ``TrainConfig`` (every field commented; ``to_yaml`` / ``from_yaml``).
* ``train.cli``         the console scripts.
"""
