"""A transformers model for our conv-tower CLIPs: CLIP's text transformer beside one of contrastive/towers.py's trunks.

transformers' CLIPModel takes a ViT image tower only, so `contrastive export --format hf` writes models whose image
tower is one of our conv trunks with this file (as modeling_contrastive_clip.py) and contrastive/towers.py (as
contrastive_towers.py) beside the weights, and config.json's auto_map names them: AutoModel.from_pretrained(DIR,
trust_remote_code=True) then loads the model with torch and transformers alone (no timm, no contrastive). The
computation is open_clip's: CLIP's text transformer pooled at the end-of-text token and projected; the conv trunk,
average pooling and a linear projection (open_clip's TimmModel head). Letters: B batch, L tokens, D embed dim.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PretrainedConfig, PreTrainedModel
from transformers.models.clip.modeling_clip import CLIPOutput

try:  # inside an export, transformers imports this file as a module of a package holding contrastive_towers.py
    from .contrastive_towers import SmallConvNet
except ImportError:  # imported from our own package
    from contrastive.towers import SmallConvNet

MODEL_TYPE = "contrastive_clip"


class ContrastiveCLIPConfig(PretrainedConfig):
    """text_config: a CLIPTextConfig's fields; vision_config: SmallConvNet's arguments (widths, residual,
    stem_width, stem_stride) plus proj_bias of the linear projection to projection_dim."""

    model_type = MODEL_TYPE

    def __init__(self, text_config: dict | None = None, vision_config: dict | None = None, projection_dim: int = 512,
                 logit_scale_init_value: float = 2.6592, **kwargs):
        super().__init__(**kwargs)
        self.text_config = dict(text_config or {})
        self.vision_config = dict(vision_config or {})
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value


class ConvImageTower(nn.Module):
    """open_clip's TimmModel around a SmallConvNet: trunk (average-pooled features) -> linear projection."""

    def __init__(self, vision_config: dict, projection_dim: int):
        super().__init__()
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in vision_config.items() if k != "proj_bias"}
        self.trunk = SmallConvNet(**args, num_classes=0, global_pool="avg")
        self.proj = nn.Linear(self.trunk.num_features, projection_dim, bias=bool(vision_config.get("proj_bias")))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(pixel_values))


class ContrastiveCLIPModel(PreTrainedModel):
    config_class = ContrastiveCLIPConfig
    base_model_prefix = "contrastive_clip"
    main_input_name = "input_ids"

    def __init__(self, config: ContrastiveCLIPConfig):
        super().__init__(config)
        text_config = CLIPTextConfig(**config.text_config)
        self.text_model = CLIPTextModel._from_config(text_config)
        self.text_projection = nn.Linear(text_config.hidden_size, config.projection_dim, bias=False)
        self.vision_model = ConvImageTower(config.vision_config, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor:
        """(B, D) unnormalised text embeddings of token ids (B, L)."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, D) unnormalised image embeddings of normalised pixels (B, 3, H, W)."""
        return self.vision_model(pixel_values)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> CLIPOutput:
        """CLIPModel's outputs: logits both ways (scaled cosine similarities) and normalised embeddings."""
        image_embeds = nn.functional.normalize(self.get_image_features(pixel_values), dim=-1)
        text_embeds = nn.functional.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        return CLIPOutput(logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds)
