"""FC-CLIP-style OVS: the Mask2Former variant plus the out-of-vocabulary branch on the CLIP's own
dense features, combined with the in-vocabulary scores by FC-CLIP's geometric ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import clip_dense_embeddings
from .classifier import class_scores, class_synonyms
from .configuration import CLIPFCCLIPConfig
from .mask2former import CLIPMask2FormerForOVS


def geometric_ensemble(p_in: torch.Tensor, p_out: torch.Tensor, seen: torch.Tensor, alpha: float, beta: float,
                       void: torch.Tensor) -> torch.Tensor:
    """FC-CLIP's ensemble: ``p_in^(1-a) * p_out^a`` with ``a = alpha`` for seen classes and ``beta`` for
    unseen ones, renormalised over the K classes, times ``1 - p(void)``; returns (..., K + 1) with p(void) last.

    ``p_in``/``p_out``: (..., K) in-/out-of-vocabulary class probabilities; ``seen``: (K,) bool;
    ``void``: (..., 1) the in-vocabulary void probability.
    """
    eps = 1e-8
    a = torch.where(seen, torch.as_tensor(alpha, dtype=p_in.dtype), torch.as_tensor(beta, dtype=p_in.dtype))
    log_p = (1 - a) * torch.log(p_in + eps) + a * torch.log(p_out + eps)
    return torch.cat([log_p.softmax(-1) * (1 - void), void], -1)


class CLIPFCCLIPForOVS(CLIPMask2FormerForOVS):
    """FC-CLIP on a CLIP ViT.

    Training is the Mask2Former loss of the in-vocabulary head. At inference (``model.eval()``), every
    query's mask also pools the CLIP's dense features (``visual_projection(post_layernorm(tokens))``
    of the last layer, computed in the same forward, without gradient), which are scored against the
    class text embeddings with CLIP's own logit scale; the two class distributions are combined by
    :func:`geometric_ensemble` (``ensemble_alpha`` for classes in ``config.seen_class_names``,
    ``ensemble_beta`` for the others) and multiplied by the in-vocabulary non-void probability.

    The OOV branch sees the encoder as it is: frozen CLIP in FC-CLIP, the pruned and/or spectrally
    tuned encoder here when a mask or spectral tuning is applied.
    """

    config_class = CLIPFCCLIPConfig

    def out_of_vocabulary_probabilities(self, mask_logits, vision_out, text, grid) -> torch.Tensor:
        """(B, Q, K): mask-pooled dense CLIP features classified against the text embeddings."""
        with torch.no_grad():
            clip = self.clip
            tokens = vision_out.last_hidden_state[:, 1:, :]
            dense = clip_dense_embeddings(clip, tokens)  # (B, N, D)
            b, _, d = dense.shape
            gh, gw = grid
            dense = dense.transpose(1, 2).reshape(b, d, gh, gw)
            m = F.interpolate(mask_logits.float(), size=(gh, gw), mode="bilinear", align_corners=False).sigmoid()
            pooled = torch.einsum("bqhw,bdhw->bqd", m, dense.float()) / (m.sum((-2, -1))[..., None] + 1e-6)
            logits = clip.logit_scale.exp() * class_scores(F.normalize(pooled, dim=-1), text)
            return logits.softmax(-1)

    def class_probabilities(self, class_logits, mask_logits, vision_out, text, class_names, grid) -> torch.Tensor:
        k = len(class_names)
        if self.training:
            return class_logits.softmax(-1)[..., :k]
        p_all = class_logits.softmax(-1)
        p_in = class_logits[..., :k].softmax(-1)
        p_out = self.out_of_vocabulary_probabilities(mask_logits, vision_out, text, grid)
        # a class counts as seen when any of its names is a training class (FC-CLIP's category overlap)
        seen_names = set(self.config.seen_class_names)
        seen = torch.tensor([not seen_names.isdisjoint(class_synonyms(n)) for n in class_names],
                            device=class_logits.device)
        probs = geometric_ensemble(p_in, p_out.to(p_in.dtype), seen, self.config.ensemble_alpha,
                                   self.config.ensemble_beta, p_all[..., -1:])
        return probs[..., :k]
