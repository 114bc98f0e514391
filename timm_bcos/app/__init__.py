"""The explanation explorer in the browser (`timm-bcos serve`) and its Hub Space folder."""
from .explorer import DEFAULT_MODEL, Explorer, ExplorerError, View

__all__ = ['DEFAULT_MODEL', 'Explorer', 'ExplorerError', 'View']
