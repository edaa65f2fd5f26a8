"""Report understanding for chest X-ray text: CheXpert labels, report graphs, rewrites, edits."""

from llmclip.clinical.labeler import Labeler, LabelResult, Mention, aggregate
from llmclip.clinical.lexicon import CHEXPERT_CLASSES

__all__ = ["CHEXPERT_CLASSES", "LabelResult", "Labeler", "Mention", "aggregate"]
