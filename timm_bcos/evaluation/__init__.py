"""Evaluating explanations: the grid pointing game of B-cos vs post-hoc attributions (paper §4,
Fig. 5/6) and the B ablation (§5.1, Tab. 1 / Fig. 5). grids -> localisation -> attribution ->
pointing_game -> plots -> report -> ablation -> cli."""
from .ablation import ablation_model_kwargs, b_ablation
from .attribution import (ATTRIBUTIONS, METHOD_LABELS, METHODS, PERTURBATION, POST_HOC, Attribution,
                          AttributionMethod, AttributionSettings, attribute, occlusion, run_method)
from .cli import build_parser, main
from .grids import Grids, Ranking, make_grids, rank_by_confidence
from .inputs import is_bcos
from .localisation import default_smoothing, localisation, summarise
from .plots import plot_ablation, plot_bcos_tiles, plot_boxes, plot_examples
from .pointing_game import PointingGame, pointing_game
from .report import run_evaluation

__all__ = ['ATTRIBUTIONS', 'METHODS', 'METHOD_LABELS', 'PERTURBATION', 'POST_HOC', 'Attribution', 'AttributionMethod',
           'AttributionSettings', 'Grids', 'PointingGame', 'Ranking', 'ablation_model_kwargs',
           'attribute', 'b_ablation', 'build_parser', 'default_smoothing', 'is_bcos', 'localisation', 'main',
           'make_grids', 'occlusion', 'plot_ablation', 'plot_bcos_tiles', 'plot_boxes', 'plot_examples',
           'pointing_game', 'rank_by_confidence', 'run_evaluation', 'run_method', 'summarise']
