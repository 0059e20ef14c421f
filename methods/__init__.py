"""Unlearning algorithms: pure PyTorch, one registry (importing this package registers them all)."""
from rumflow.methods import basic, neggrad, relabel, scrub  # noqa: F401  (registration side effects)
from rumflow.methods import gli, teachers, unsir  # noqa: F401  (seed 001: GLI, UNSIR, Bad Teaching)
from rumflow.methods import ascent, layers  # noqa: F401  (seed 000, CF-k, EU-k)
from rumflow.methods import contrastive, fisher, gisa, similarity_teachers, ssd  # noqa: F401  (seed 003)
from rumflow.methods import boundary, pruning, soft_relabel, surgery  # noqa: F401  (seed 004)
from rumflow.methods.registry import (METHODS, MethodParams, UnlearnContext, describe_methods, get_method,
                                      register, run_method, validate_params)
from rumflow.methods.relabel import random_labels, salun_mask

__all__ = ["METHODS", "MethodParams", "UnlearnContext", "describe_methods", "get_method", "random_labels",
           "register", "run_method", "salun_mask", "validate_params"]
