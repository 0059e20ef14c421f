"""Every cached task, from one import (the flows and the service import them from here)."""
from rumflow.tasks.evaluation import evaluate_task, forgetting_quality_task, plan_task
from rumflow.tasks.proxies import PROXY_SOURCES, proxy_task
from rumflow.tasks.refs import Scores, Trained, Unlearned, store, write_scores
from rumflow.tasks.training import memorization_task, train_task
from rumflow.tasks.unlearning import prepare_task, unlearn_task

__all__ = ["PROXY_SOURCES", "Scores", "Trained", "Unlearned", "evaluate_task", "forgetting_quality_task",
           "memorization_task", "plan_task", "prepare_task", "proxy_task", "store", "train_task", "unlearn_task",
           "write_scores"]
