"""Mask2Former-style OVS on a CLIP ViT, built from transformers' Mask2Former blocks.

The pixel decoder (multi-scale deformable attention), the masked-attention transformer decoder and the
Hungarian-matching loss are transformers' own (``Mask2FormerPixelDecoder``,
``Mask2FormerTransformerModule``, ``Mask2FormerLoss``); what changes is the backbone (the CLIP ViT
through a simple feature pyramid) and the class head, which scores every query embedding against the
class text embeddings and a learned void ("no object") embedding, so any class names can be given.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)

from .backbone import SimpleFeaturePyramid, vit_feature_maps
from .configuration import CLIPMask2FormerConfig
from .modeling_base import OVSPreTrainedModel, OVSSegmentationOutput, upsample


class Mask2FormerHead(Mask2FormerPreTrainedModel):
    """transformers' pixel decoder + transformer decoder, initialised by Mask2Former's own ``_init_weights``."""

    def __init__(self, config, in_channels: int):
        super(Mask2FormerPreTrainedModel, self).__init__(config)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=[in_channels] * 4)
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.post_init()

    def forward(self, features: list[torch.Tensor]):
        pix = self.pixel_decoder(features, return_dict=True)
        dec = self.transformer_module(pix.multi_scale_features, pix.mask_features)
        return dec.intermediate_hidden_states, dec.masks_queries_logits


def semantic_labels_to_masks(labels: torch.Tensor, ignore_index: int):
    """Per image: (binary masks (n, H, W) float, class ids (n,)) of the classes present (Mask2Former targets)."""
    mask_labels, class_labels = [], []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != ignore_index]
        mask_labels.append((lab[None] == classes[:, None, None]).float())
        class_labels.append(classes.long())
    return mask_labels, class_labels


class CLIPMask2FormerForOVS(OVSPreTrainedModel):
    """Mask2Former on a CLIP ViT with an open-vocabulary class head.

    Semantic inference as Mask2Former: ``scores[k] = sum_q softmax(class_q)[k] * sigmoid(mask_q)``.
    """

    config_class = CLIPMask2FormerConfig

    def __init__(self, config: CLIPMask2FormerConfig, tokenizer=None):
        super().__init__(config, tokenizer=tokenizer)
        hidden = config.clip.vision_config.hidden_size
        self.pyramid = SimpleFeaturePyramid(hidden, config.fpn_channels)
        self.head = Mask2FormerHead(config.mask2former_config(num_labels=1), config.fpn_channels)
        self.class_embed = nn.Linear(config.hidden_dim, config.clip.projection_dim)
        self._losses: dict[int, Mask2FormerLoss] = {}
        self.post_init()

    def criterion(self, num_classes: int) -> Mask2FormerLoss:
        if num_classes not in self._losses:
            cfg = self.config.mask2former_config(num_labels=num_classes)
            weights = {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
            self._losses[num_classes] = Mask2FormerLoss(cfg, weights)
        return self._losses[num_classes]

    def query_outputs(self, pixel_values, text):
        """Per decoder layer: class logits (B, Q, K + 1) and mask logits (B, Q, h, w); and the ViT output."""
        maps, vision_out = vit_feature_maps(self.clip, pixel_values, self.hidden_state_indices())
        hidden, masks = self.head(self.pyramid(maps))
        classes = [self.classifier(self.class_embed(h.transpose(0, 1)), text) for h in hidden]
        return classes, list(masks), vision_out

    def mask2former_loss(self, classes, masks, labels, num_classes: int) -> torch.Tensor:
        crit = self.criterion(num_classes).to(masks[-1].device)
        mask_labels, class_labels = semantic_labels_to_masks(labels, self.config.ignore_index)
        mask_labels = [m.to(masks[-1].dtype) for m in mask_labels]
        aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
        losses = crit(masks[-1], classes[-1], mask_labels, class_labels, auxiliary_predictions=aux)
        total = 0.0
        for key, loss in losses.items():
            weight = next(w for name, w in crit.weight_dict.items() if name in key)
            total = total + weight * loss
        return total

    def class_probabilities(self, class_logits, mask_logits, vision_out, text, class_names, grid) -> torch.Tensor:
        """(B, Q, K) probability of each class per query (void excluded) for semantic inference;
        ``grid``: the ViT's patch grid (h, w) of this forward."""
        return class_logits.softmax(-1)[..., : len(class_names)]

    def forward_with_text(self, pixel_values, text, class_names, labels) -> OVSSegmentationOutput:
        classes, masks, vision_out = self.query_outputs(pixel_values, text)
        loss = None
        if labels is not None:
            loss = self.mask2former_loss(classes, masks, labels, len(class_names))
        patch = self.config.clip.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        probs = self.class_probabilities(classes[-1], masks[-1], vision_out, text, class_names, grid)
        mask_probs = upsample(masks[-1], pixel_values.shape[-2:]).sigmoid()
        logits = torch.einsum("bqk,bqhw->bkhw", probs.to(mask_probs.dtype), mask_probs)
        return OVSSegmentationOutput(loss=loss, logits=logits, class_queries_logits=classes[-1],
                                     masks_queries_logits=masks[-1])
