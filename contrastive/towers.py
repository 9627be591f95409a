"""Small image trunks for low-resolution photographs, registered with timm so open_clip configs can name them.

ImageNet trunks lose resolution at once (a stride-2 stem plus a max-pool turn 32 px into 8 px), which is
what caps them on CIFAR-sized images. These keep full resolution in a 3x3 stem and halve it per stage with a
max-pool, in the style of the fast CIFAR-10 baselines (ResNet-9 / airbench): conv-BN-GELU, two convolutions
per stage with a residual pair on the wider stages. Use them through open_clip's timm tower:
`"vision_cfg": {"timm_model_name": "convnet_s", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32}`.
Built that way (contrastive.models), their BatchNorm layers compute in fp32 under bf16/fp16 weights too.
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from timm.layers import SelectAdaptivePool2d
    from timm.models import is_model, register_model
except ImportError:  # this file also ships inside exports, where a transformers-only process has no timm
    SelectAdaptivePool2d = None

    def is_model(name: str) -> bool:
        return True  # no registry to join

    def register_model(fn):
        return fn


def _register(fn):
    """Register with timm once: an export's copy of this file may be imported beside our package."""
    return fn if is_model(fn.__name__) else register_model(fn)

# The registered trunks, by the arguments that build them: exports record these, so a loader without our
# package (see contrastive/hf_modeling.py) rebuilds the trunk from this file alone.
TOWER_ARGS = {
    "convnet_xs": {"widths": [32, 64, 128], "stem_width": 16},
    "convnet_s": {"widths": [64, 128, 256], "stem_width": 32},
    "convnet_xs_s2": {"widths": [32, 64, 128], "stem_width": 16, "stem_stride": 2},
}


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class _Stage(nn.Module):
    """conv -> max-pool (halves the side) -> residual pair of convs."""

    def __init__(self, cin: int, cout: int, residual: bool):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(cout), nn.GELU())
        self.res = nn.Sequential(_conv_bn(cout, cout), _conv_bn(cout, cout)) if residual else None

    def forward(self, x):
        x = self.down(x)
        return x + self.res(x) if self.res is not None else x


class SmallConvNet(nn.Module):
    """timm-compatible trunk: `num_features`, `forward_features`, `reset_classifier`, `group_matcher`."""

    def __init__(self, widths=(64, 128, 256), residual=(True, False, True), stem_width: int = 32,
                 stem_stride: int = 1, num_classes: int = 0, global_pool: str = "avg", in_chans: int = 3, drop_rate: float = 0.0, **kwargs):
        super().__init__()
        self.stem = _conv_bn(in_chans, stem_width, stem_stride)
        stages, prev = [], stem_width
        for width, res in zip(widths, residual):
            stages.append(_Stage(prev, width, res))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.reset_classifier(num_classes, global_pool)
        self.pretrained_cfg = self.default_cfg = {"num_classes": num_classes, "input_size": (3, 32, 32),
                                                  "pool_size": None, "mean": (0.4914, 0.4822, 0.4465),
                                                  "std": (0.2470, 0.2435, 0.2616), "classifier": "fc"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and SelectAdaptivePool2d is None:
            if global_pool != "avg":
                raise ValueError(f"global_pool={global_pool!r} needs timm; without it only 'avg' is available")
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # timm's 'avg', op for op
        elif global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last activations, oneDNN's preferred layout for CPU convolutions (no benchmark in bench/ backs
        # a figure yet); the weights stay contiguous, as DeepSpeed's broadcast views them as bytes.
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        if self.grad_checkpointing and self.training:
            from timm.models import checkpoint_seq

            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@_register
def convnet_xs(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """~0.4M params, ~48 MFLOPs (forward) at 32 px."""
    return SmallConvNet(**TOWER_ARGS["convnet_xs"], **kwargs)


@_register
def convnet_s(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """~1.6M params, ~190 MFLOPs (forward) at 32 px."""
    return SmallConvNet(**TOWER_ARGS["convnet_s"], **kwargs)


@_register
def convnet_xs_s2(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """convnet_xs with a stride-2 stem: a quarter of its cost, for 48-64 px images (the demo's tower)."""
    return SmallConvNet(**TOWER_ARGS["convnet_xs_s2"], **kwargs)
