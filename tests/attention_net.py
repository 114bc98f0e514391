"""A small network with an `nn.MultiheadAttention`: the converter refuses it (the surveys' refusal case)."""
from torch import nn


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(self.attn(t, t, t)[0].mean(1))
