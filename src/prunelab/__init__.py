"""prunelab: neural-network pruning for any ``torch.nn.Module``, and its honest evaluation.

The public API in one screen::

    import prunelab
    model = prunelab.models.create("resnet20", num_classes=10)
    prunelab.prune(model, "magnitude", sparsity=0.9)            # masks, in place
    print(prunelab.measure(model, torch.randn(1, 3, 32, 32)))   # params, FLOPs, per layer
    prunelab.make_permanent(model)                              # plain model, zeros baked in
"""

from prunelab import data, methods, models
from prunelab.checkpoint import export_onnx, load_checkpoint, load_state_dict, save_checkpoint
from prunelab.errors import PrunelabError
from prunelab.methods import METHODS
from prunelab.metrics import Measurement, evaluate, measure
from prunelab.pruning import prune
from prunelab.sparsity import get_mask, make_permanent, remove_masks

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Measurement",
    "PrunelabError",
    "__version__",
    "data",
    "evaluate",
    "export_onnx",
    "get_mask",
    "load_checkpoint",
    "load_state_dict",
    "make_permanent",
    "measure",
    "methods",
    "models",
    "prune",
    "remove_masks",
    "save_checkpoint",
]

# Last, with the package complete: method plugins of other installed packages may import any
# of it (prunelab.methods.load_plugins).
methods.load_plugins()
