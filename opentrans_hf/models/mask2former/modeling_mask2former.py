"""Mask2Former-style OVS on a CLIP ViT, built from transformers' Mask2Former blocks.

The pixel decoder (multi-scale deformable attention), the masked-attention transformer decoder and the
Hungarian-matching loss are transformers' own (``Mask2FormerPixelDecoder``,
``Mask2FormerTransformerModule``, ``Mask2FormerLoss``); what changes is the backbone (the CLIP ViT
through a simple feature pyramid) and the class head, which scores every query embedding against the
class text embeddings and a learned void ("no object") embedding, so any class names can be given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
    sample_point,
)

from opentrans_hf.models.backbone import SimpleFeaturePyramid, vit_feature_maps
from opentrans_hf.models.mask2former.configuration_mask2former import CLIPMask2FormerConfig
from opentrans_hf.models.modeling_ovs import OVSPreTrainedModel, OVSSegmentationOutput, upsample


class Mask2FormerHead(Mask2FormerPreTrainedModel):
    """transformers' pixel decoder + transformer decoder, initialised by Mask2Former's own ``_init_weights``
    (the ring grid of the deformable attention's sampling offsets, zero attention weights, xavier projections
    and decoder layers), exactly as transformers' ``Mask2FormerModel`` is."""

    def __init__(self, config, in_channels: int):
        super(Mask2FormerPreTrainedModel, self).__init__(config)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=[in_channels] * 4)
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.post_init()

    @classmethod
    def is_custom_code(cls) -> bool:
        """transformers' own blocks and init: not custom code. (For custom code, ``initialize_weights`` skips the
        modules without parameters of their own, which are exactly those Mask2Former's init targets: the
        deformable attention, the decoder layers, the transformer module.)"""
        return False

    def forward(self, features: list[torch.Tensor]):
        """-> per decoder layer the (normalised) query embeddings (Q, B, C) and mask logits (B, Q, h, w), and the
        per-pixel mask features (B, C, h, w) the masks are made from."""
        pix = self.pixel_decoder(features, return_dict=True)
        dec = self.transformer_module(pix.multi_scale_features, pix.mask_features)
        return dec.intermediate_hidden_states, dec.masks_queries_logits, pix.mask_features


def valid_points(valid: list[torch.Tensor], image_indices, point_coordinates: torch.Tensor) -> torch.Tensor:
    """(N, P) float: 1 where point n's sampled coordinates lie on a valid pixel (nearest) of image
    ``image_indices[n]``'s (H, W) bool map."""
    if len(image_indices) == 0:  # no target in the batch: nothing matched
        return point_coordinates.new_zeros(point_coordinates.shape[:2])
    maps = torch.stack([valid[int(i)] for i in image_indices]).to(point_coordinates)[:, None]
    return sample_point(maps, point_coordinates, align_corners=False, mode="nearest").squeeze(1)


class OVSHungarianMatcher(Mask2FormerHungarianMatcher):
    """transformers' matcher; with ``valid`` maps set, the points on invalid pixels are left out of the mask
    and dice costs (the class cost is unchanged)."""

    valid: list[torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        if self.valid is None:
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        indices = []
        for i in range(masks_queries_logits.shape[0]):
            cost_class = -class_queries_logits[i].softmax(-1)[:, class_labels[i]]
            pred_mask = masks_queries_logits[i][:, None]
            target_mask = mask_labels[i].to(pred_mask)[:, None]
            coords = torch.rand(1, self.num_points, 2, device=pred_mask.device)
            target = sample_point(target_mask, coords.repeat(target_mask.shape[0], 1, 1), align_corners=False).squeeze(1)
            pred = sample_point(pred_mask, coords.repeat(pred_mask.shape[0], 1, 1), align_corners=False).squeeze(1)
            w = valid_points(self.valid, [i], coords)[0]  # (P,)
            pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none") * w
            neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none") * w
            cost_mask = (pos @ target.T + neg @ (1 - target).T) / w.sum().clamp(min=1.0)
            probs, tgt = pred.sigmoid() * w, target * w
            cost_dice = 1 - (2 * probs @ tgt.T + 1) / (probs.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            indices.append(linear_sum_assignment(cost.float().cpu()))
        return [(torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)) for r, c in indices]


class OVSMask2FormerLoss(Mask2FormerLoss):
    """transformers' ``Mask2FormerLoss`` (Hungarian matching, point-sampled sigmoid CE + dice, class CE with
    the no-object weight) where pixels outside ``valid`` maps can be left out of the mask terms.

    :meth:`set_valid` gives per image a (H, W) bool map (False: ``ignore_index``) before the call; None: every
    pixel counts (transformers' behaviour, to the bit). Points are sampled as transformers does; a point on an
    invalid pixel gets zero weight in the matching cost and in both mask losses (cross-entropy averaged over
    the valid points of a mask, dice over its valid points).
    """

    def __init__(self, config, weight_dict):
        super().__init__(config, weight_dict)
        matcher = self.matcher
        self.matcher = OVSHungarianMatcher(num_points=matcher.num_points, cost_class=matcher.cost_class,
                                           cost_mask=matcher.cost_mask, cost_dice=matcher.cost_dice)
        self.valid: list[torch.Tensor] | None = None

    def set_valid(self, valid: list[torch.Tensor] | None) -> None:
        self.valid = valid
        self.matcher.valid = valid

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks):
        if self.valid is None:
            return super().loss_masks(masks_queries_logits, mask_labels, indices, num_masks)
        src_idx = self._get_predictions_permutation_indices(indices)
        tgt_idx = self._get_targets_permutation_indices(indices)
        pred_masks = masks_queries_logits[src_idx][:, None]
        target_masks, _ = self._pad_images_to_max_in_batch(mask_labels)
        target_masks = target_masks[tgt_idx][:, None]
        with torch.no_grad():
            point_coordinates = self.sample_points_using_uncertainty(
                pred_masks, lambda logits: self.calculate_uncertainty(logits), self.num_points,
                self.oversample_ratio, self.importance_sample_ratio)
            point_labels = sample_point(target_masks, point_coordinates, align_corners=False).squeeze(1)
            weights = valid_points(self.valid, src_idx[0], point_coordinates)
        point_logits = sample_point(pred_masks, point_coordinates, align_corners=False).squeeze(1)
        ce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
        ce = (ce * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        probs, labels = point_logits.sigmoid() * weights, point_labels * weights
        dice = 1 - (2 * (probs * labels).sum(1) + 1) / (probs.sum(1) + labels.sum(1) + 1)
        return {"loss_mask": ce.sum() / num_masks, "loss_dice": dice.sum() / num_masks}


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
    Trained by transformers' ``Mask2FormerLoss``; ``config.mask_loss_ignored`` says whether pixels labelled
    ``ignore_index`` count as background of the matched masks (the reference) or are left out (default).
    """

    config_class = CLIPMask2FormerConfig

    def __init__(self, config: CLIPMask2FormerConfig, tokenizer=None, image_processor=None):
        super().__init__(config, tokenizer=tokenizer, image_processor=image_processor)
        hidden = config.clip.vision_config.hidden_size
        self.pyramid = SimpleFeaturePyramid(hidden, config.fpn_channels)
        self.head = Mask2FormerHead(config.mask2former_config(num_labels=1), config.fpn_channels)
        self.class_embed = nn.Linear(config.hidden_dim, config.clip.projection_dim)
        self._losses: dict[int, Mask2FormerLoss] = {}
        self.post_init()

    def criterion(self, num_classes: int) -> OVSMask2FormerLoss:
        if num_classes not in self._losses:
            cfg = self.config.mask2former_config(num_labels=num_classes)
            weights = {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
            self._losses[num_classes] = OVSMask2FormerLoss(cfg, weights)
        return self._losses[num_classes]

    def query_class_embeddings(self, hidden: torch.Tensor, masks: torch.Tensor, mask_features: torch.Tensor):
        """(B, Q, D) class embeddings of one decoder layer's queries: ``hidden`` (Q, B, C) the normalised query
        embeddings, ``masks`` (B, Q, h, w) their mask logits, ``mask_features`` (B, C, h, w)."""
        return self.class_embed(hidden.transpose(0, 1))

    def query_outputs(self, pixel_values, text):
        """Per decoder layer: class logits (B, Q, K + 1) and mask logits (B, Q, h, w); and the ViT output."""
        maps, vision_out = vit_feature_maps(self.clip, pixel_values, self.hidden_state_indices())
        hidden, masks, mask_features = self.head(self.pyramid(maps))
        classes = [self.classifier(self.query_class_embeddings(h, m, mask_features), text) for h, m in zip(hidden, masks)]
        return classes, list(masks), vision_out

    def mask2former_loss(self, classes, masks, labels, num_classes: int) -> torch.Tensor:
        crit = self.criterion(num_classes).to(masks[-1].device)
        mask_labels, class_labels = semantic_labels_to_masks(labels, self.config.ignore_index)
        mask_labels = [m.to(masks[-1].dtype) for m in mask_labels]
        aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
        exclude = getattr(self.config, "mask_loss_ignored", "background") == "exclude"
        crit.set_valid([lab != self.config.ignore_index for lab in labels] if exclude else None)
        try:
            losses = crit(masks[-1], classes[-1], mask_labels, class_labels, auxiliary_predictions=aux)
        finally:
            crit.set_valid(None)
        total = 0.0
        for key, loss in losses.items():
            weight = next(w for name, w in crit.weight_dict.items() if name in key)
            total = total + weight * loss
        return total

    def class_probabilities(self, class_logits, mask_logits, vision_out, text, seen_classes, grid) -> torch.Tensor:
        """(B, Q, K) probability of each class per query (void excluded) for semantic inference;
        ``grid``: the ViT's patch grid (h, w) of this forward; ``seen_classes``: (K,) bool or None."""
        return class_logits.softmax(-1)[..., : text.shape[0]]

    def forward_with_text(self, pixel_values, text, labels, seen_classes=None) -> OVSSegmentationOutput:
        classes, masks, vision_out = self.query_outputs(pixel_values, text)
        loss = None
        if labels is not None:
            loss = self.mask2former_loss(classes, masks, labels, text.shape[0])
        patch = self.config.clip.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        probs = self.class_probabilities(classes[-1], masks[-1], vision_out, text, seen_classes, grid)
        mask_probs = upsample(masks[-1], pixel_values.shape[-2:]).sigmoid()
        logits = torch.einsum("bqk,bqhw->bkhw", probs.to(mask_probs.dtype), mask_probs)
        return OVSSegmentationOutput(loss=loss, logits=logits, class_queries_logits=classes[-1],
                                     masks_queries_logits=masks[-1])
