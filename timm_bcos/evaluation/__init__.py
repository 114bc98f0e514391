"""Evaluating explanations: the grid pointing game of B-cos vs post-hoc attributions (paper §4,
Fig. 5/6) and the B ablation (§5.1, Tab. 1 / Fig. 5). grids -> localisation -> attribution ->
pointing_game -> plots -> report -> ablation -> cli.

Evaluating the converter: families -> coverage -> coverage_report -> trainability -> coverage_cli
(`timm-bcos coverage`: Eq. 13, logit spread and gates per model or per timm family; brief training)."""
from .ablation import ablation_model_kwargs, b_ablation
from .attribution import (ATTRIBUTIONS, METHOD_LABELS, METHODS, PERTURBATION, POST_HOC, Attribution,
                          AttributionMethod, AttributionSettings, attribute, occlusion, run_method)
from .cli import build_parser, main
from .coverage import (COVERAGE_MODELS, EXTRA_MODELS, OUTCOMES, CoverageResult, check_model, dynamic_gates,
                       eq13_autograd, logit_spread)
from .coverage_cli import build_coverage_parser, coverage_main
from .coverage_report import coverage_report, write_report
from .families import ATTENTION_CRITERION, FamilyModel, attention_evidence, smallest_per_family, timm_families
from .grids import Grids, Ranking, make_grids, rank_by_confidence
from .inputs import is_bcos
from .localisation import default_smoothing, localisation, summarise
from .plots import plot_ablation, plot_bcos_tiles, plot_boxes, plot_examples
from .pointing_game import PointingGame, pointing_game
from .report import run_evaluation
from .trainability import (Recipe, TrainabilityResult, check_trainability, train_briefly, trainability_report,
                           write_trainability_report)

__all__ = ['ATTENTION_CRITERION', 'ATTRIBUTIONS', 'COVERAGE_MODELS', 'EXTRA_MODELS', 'METHODS', 'METHOD_LABELS',
           'OUTCOMES', 'PERTURBATION', 'POST_HOC', 'Attribution', 'AttributionMethod', 'AttributionSettings',
           'CoverageResult', 'FamilyModel', 'Grids', 'PointingGame', 'Ranking', 'Recipe', 'TrainabilityResult',
           'ablation_model_kwargs', 'attention_evidence', 'attribute', 'b_ablation', 'build_coverage_parser',
           'build_parser', 'check_model', 'check_trainability', 'coverage_main', 'coverage_report',
           'default_smoothing', 'dynamic_gates', 'eq13_autograd', 'is_bcos', 'localisation', 'logit_spread', 'main',
           'make_grids', 'occlusion', 'plot_ablation', 'plot_bcos_tiles', 'plot_boxes', 'plot_examples',
           'pointing_game', 'rank_by_confidence', 'run_evaluation', 'run_method', 'smallest_per_family',
           'summarise', 'timm_families', 'train_briefly', 'trainability_report', 'write_report',
           'write_trainability_report']
