"""Small models shared by test modules."""

from __future__ import annotations

import torch
from torch import nn


class Concat(nn.Module):
    """Two branches concatenated on channels, then a grouped conv: coupled index ranges."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.c = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.d = nn.Conv2d(14, 12, 1)
        self.fc = nn.Linear(12, 10)
        self.input_shape = (3, 32, 32)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.d(self.c(y)).mean((2, 3)))
