"""Explanations: the exact linear map W(x) of a B-cos network (paper §3.2.1, Eq. 13-15), its check,
its pictures (§4) and explanations of image files."""
from .core import VERIFY_TOLERANCE, TargetLike, explain
from .explanation import Explanation
from .files import describe, explain_images, save_explanations
from .linearity import check_dynamic_linearity, eq13_error

__all__ = ['VERIFY_TOLERANCE', 'Explanation', 'TargetLike', 'check_dynamic_linearity', 'describe', 'eq13_error',
           'explain', 'explain_images', 'save_explanations']
