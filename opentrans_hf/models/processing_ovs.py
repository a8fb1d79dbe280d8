"""``OVSProcessor``: the image processor and the CLIP tokenizer of an OVS model in one object, as
transformers' ``CLIPProcessor`` pairs them. ``processor(images=..., text=class_names, return_tensors="pt")``
gives everything a forward needs as tensors: ``pixel_values`` and the class prompts tokenized
(prompt templates x names), so ``model(**processor(images=..., text=...))`` runs with no strings inside."""

from __future__ import annotations

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from opentrans_hf.models.classifier import check_class_names, seen_class_flags, tokenize_class_prompts
from opentrans_hf.models.configuration_ovs import DEFAULT_TEMPLATES, resolve_prompt_templates
from opentrans_hf.models.image_processing_ovs import OVSImageProcessor


def parse_class_entry(entry):
    """A class as the pipeline and processor take it: ``"road|street"`` -> ``("road", "street")`` (``|``
    separates synonyms), a tuple/list of names as is, a plain name as is."""
    if isinstance(entry, str) and "|" in entry:
        names = tuple(n.strip() for n in entry.split("|"))
        if not all(names):
            raise ValueError(f"class {entry!r} has an empty synonym (a stray '|'?)")
        return names
    return entry


class OVSProcessor(ProcessorMixin):
    r"""Image processor + CLIP tokenizer of an OVS model.

    Args:
        image_processor: an :class:`OVSImageProcessor`.
        tokenizer: the CLIP tokenizer.
        prompt_templates: the templates class names are put into (the model config's ``prompt_templates``).
        name_aggregation: how a class's synonyms combine (the config's ``class_name_aggregation``); with
            ``"first"`` only a class's first name is tokenized.
        seen_class_names: the training classes (the config's ``seen_class_names``); when set, ``seen_classes``
            (``(K,)`` bool: a class is seen when one of its names is) is returned for FC-CLIP's ensemble.
        max_length: the text tower's context length (prompts are truncated to it).

    ``processor(images=None, text=None, segmentation_maps=None, return_tensors=None)``: ``text`` is the list
    of classes, each a name, a tuple of synonyms or a ``"road|street"`` string; returns ``input_ids`` /
    ``attention_mask`` ``(T * N, L)`` (template-major over the N names), ``class_ids`` ``(N,)`` (the class of
    each name), and with images ``pixel_values`` (and ``labels`` with ``segmentation_maps``).
    """

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates=None, name_aggregation: str = "max",
                 seen_class_names=None, max_length: int | None = 77, **kwargs):
        self.prompt_templates = list(resolve_prompt_templates(prompt_templates or DEFAULT_TEMPLATES))
        self.name_aggregation = name_aggregation
        self.seen_class_names = list(seen_class_names or [])
        self.max_length = max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor: OVSImageProcessor | None = None) -> OVSProcessor:
        """The processor that matches a framework's config (input size, templates, name aggregation, seen
        classes, the text tower's context length)."""
        return cls(image_processor or OVSImageProcessor.from_model_config(config), tokenizer,
                   prompt_templates=list(config.prompt_templates), name_aggregation=config.class_name_aggregation,
                   seen_class_names=list(config.seen_class_names or []),
                   max_length=config.clip.text_config.max_position_embeddings)

    def __call__(self, images=None, text=None, segmentation_maps=None, return_tensors=None, **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("give images=, text= (the class names), or both")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, return_tensors=return_tensors,
                                             **kwargs))
        elif segmentation_maps is not None:
            raise ValueError("segmentation_maps= needs the images= they belong to")
        if text is not None:
            data.update(self.encode_classes(text))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_classes(self, text) -> dict:
        """The tokenized prompts of a class list (see the class docstring); ``seen_classes`` too when the
        processor knows the training classes."""
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer, so class names cannot be encoded")
        names = check_class_names([parse_class_entry(t) for t in ([text] if isinstance(text, str) else text)])
        out = tokenize_class_prompts(self.tokenizer, names, self.prompt_templates, self.max_length,
                                     self.name_aggregation)
        if self.seen_class_names:
            out["seen_classes"] = seen_class_flags(names, self.seen_class_names)
        return out

    def post_process_semantic_segmentation(self, *args, **kwargs):
        """:meth:`OVSImageProcessor.post_process_semantic_segmentation`."""
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "class_ids", "seen_classes"]
