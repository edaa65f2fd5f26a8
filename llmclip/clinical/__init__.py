"""Report understanding for chest X-ray text: CheXpert labels, report graphs, rewrites, edits."""

from llmclip.clinical.edits import one_error_edits
from llmclip.clinical.graph import GRAPH_VOCAB, GRAPH_VOCAB_SHA, ReportGraph
from llmclip.clinical.labeler import Labeler, LabelResult, Mention, aggregate
from llmclip.clinical.lexicon import CHEXPERT_CLASSES
from llmclip.clinical.negation import negate
from llmclip.clinical.rewrites import equivalent_rewrites
from llmclip.clinical.variants import Variant

__all__ = [
    "CHEXPERT_CLASSES",
    "GRAPH_VOCAB",
    "GRAPH_VOCAB_SHA",
    "ReportGraph",
    "LabelResult",
    "Labeler",
    "Mention",
    "Variant",
    "aggregate",
    "equivalent_rewrites",
    "negate",
    "one_error_edits",
]
