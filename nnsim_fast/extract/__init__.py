"""Features and expected gradients at named layers, streamed into a representation.

For each batch: ONE forward pass with hooks at the chosen layers and ONE
backward pass to them (none with ``gradients=False``); the per-layer rows go to
a sketched :class:`~nnsim_fast.sketch.Representation` (:func:`sketch_model`),
an exact one (:func:`exact_model`) or memory (:func:`features_and_gradients`).

Modules, in the order a batch meets them:

* :mod:`.batches`    what a loader yields -> model inputs, labels, indices, padding mask
* :mod:`.probe`      layer names, forward hooks, eval mode and the per-model lock
* :mod:`.step`       the extraction settings and one batch's forward + backward
* :mod:`.pooling`    a layer's output (tokens, feature maps) -> one row per sample
* :mod:`.driver`     the pass over the data and the public entry points
* :mod:`.joint`      two models on the same batches: CKA from exact within-batch kernel blocks
* :mod:`.checkpoint` resumable runs;  :mod:`.distributed` the rows of each rank
"""
from .batches import IndexedDataset, read_batch, unpack_batch
from .driver import Pass, exact_model, features_and_gradients, sketch_model
from .joint import compare_models
from .probe import LayerProbe, default_layers, eval_mode, model_lock, resolve_layers, suggest_layers
from .step import Extraction, batch_statistics, default_output_fn, expected_gradient_objective

__all__ = ["sketch_model", "exact_model", "compare_models", "features_and_gradients", "IndexedDataset",
           "Extraction", "Pass", "LayerProbe", "eval_mode", "model_lock", "resolve_layers",
           "default_layers", "suggest_layers", "default_output_fn", "expected_gradient_objective",
           "unpack_batch", "read_batch", "batch_statistics"]
