"""Slimmable networks: one set of weights, many widths (Yu et al.'s S-Net, US-Net, AutoSlim).

A supernet is not a mask: it is a copy of the model whose Conv/Linear/BatchNorm layers run on the
first k channels of every channel group, switched at run time::

    from prunelab import slim
    net = slim.convert(model, widths=[0.25, 0.5, 0.75, 1.0])    # S-Net (or width_range=(lo, hi))
    slim.train(net, batches, recipe)                             # every width, every step
    with slim.width(net, 0.5):
        y = net(x)
    small = slim.export(net, 0.5)                                # a plain, narrow nn.Module
"""

from prunelab.slim.autoslim import autoslim, macs
from prunelab.slim.export import export
from prunelab.slim.groups import SlimmingError
from prunelab.slim.io import load_supernet, save_supernet
from prunelab.slim.supernet import (
    convert,
    get_width,
    is_slimmable,
    set_width,
    spec_of,
    width,
)
from prunelab.slim.training import SlimmableTraining, calibrate_bn
from prunelab.slim.training import train_slimmable as train
from prunelab.slim.widen import widen

__all__ = [
    "SlimmableTraining",
    "SlimmingError",
    "autoslim",
    "calibrate_bn",
    "convert",
    "export",
    "get_width",
    "is_slimmable",
    "load_supernet",
    "macs",
    "save_supernet",
    "set_width",
    "spec_of",
    "train",
    "widen",
    "width",
]
