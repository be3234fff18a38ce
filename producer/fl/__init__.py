"""Federated training as plans: strategies, rounds, device training plans, checkpoints.

Examples
--------
>>> import torch
>>> from torch import nn
>>> import producer as fp
>>> from producer.fl import (FedAvg, FederatedJob, PlanParticipant, TrainingSpec,
...                          build_training_plan, evaluate, get_weights)
>>> torch.manual_seed(0) and None
>>> net = nn.Linear(4, 3)
>>> spec = TrainingSpec(lr=0.1, batch_size=8)
>>> x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
>>> with fp.connect() as fleet:
...     dev = fleet.device("d0", data=[fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
...     device = PlanParticipant(dev, lambda n: build_training_plan(net, spec, n))
...     job = FederatedJob(participants=[device], strategy=FedAvg(),
...                        evaluate=lambda w: evaluate(nn.Linear(4, 3), w, x, y))
...     result = job.run(get_weights(net), num_rounds=2)
>>> [m.round for m in result.history]
[0, 1, 2]
"""

from producer.fl.aggregate import Weights, weighted_average
from producer.fl.buffered import FedBuff, StalenessPolicy, fold_updates, staleness_weight
from producer.fl.checkpoint import Checkpoint, load_latest, save_checkpoint
from producer.fl.data import Dataset, dirichlet_partition, iid_partition, load_digits, load_mnist
from producer.fl.dp_fedavg import CentralDP, DifferentialPrivacy
from producer.fl.evaluation import DeviceMetrics, EvaluationOutcome, EvaluationRunner
from producer.fl.job import FederatedJob, JobResult
from producer.fl.models import MODELS, DigitsCNN, DigitsGRU, make_model
from producer.fl.pace import DeviceLoad, PaceSteering, probe_for
from producer.fl.participants import EagerParticipant, PlanParticipant
from producer.fl.progress import (
    ProgressBar,
    RoundMetrics,
    plot_metrics,
    write_device_metrics,
    write_metrics,
)
from producer.fl.rounds import FitReply, FitTask, Participant, RoundPolicy, RoundRunner
from producer.fl.secure_rounds import SecureAggregation, SecureRoundRunner
from producer.fl.secure_training import build_update_plan
from producer.fl.strategy import (
    STRATEGIES,
    EvaluateResult,
    EvaluateSummary,
    FedAdam,
    FedAvg,
    FedProx,
    FitFailure,
    FitInstructions,
    FitResult,
    Strategy,
    make_strategy,
    register_strategy,
)
from producer.fl.tracking import MLflowTracker, TensorBoardTracker, Tracker
from producer.fl.training import (
    TrainingSpec,
    build_evaluation_plan,
    build_training_plan,
    evaluate,
    flatten,
    get_weights,
    sample_order,
    train_eager,
    unflatten,
)

__all__ = [
    "MODELS",
    "STRATEGIES",
    "CentralDP",
    "Checkpoint",
    "Dataset",
    "DeviceLoad",
    "DeviceMetrics",
    "DifferentialPrivacy",
    "DigitsCNN",
    "DigitsGRU",
    "EagerParticipant",
    "EvaluateResult",
    "EvaluateSummary",
    "EvaluationOutcome",
    "EvaluationRunner",
    "FedAdam",
    "FedAvg",
    "FedBuff",
    "FedProx",
    "FederatedJob",
    "FitFailure",
    "FitInstructions",
    "FitReply",
    "FitResult",
    "FitTask",
    "JobResult",
    "MLflowTracker",
    "PaceSteering",
    "Participant",
    "PlanParticipant",
    "ProgressBar",
    "RoundMetrics",
    "RoundPolicy",
    "RoundRunner",
    "SecureAggregation",
    "SecureRoundRunner",
    "StalenessPolicy",
    "Strategy",
    "TensorBoardTracker",
    "Tracker",
    "TrainingSpec",
    "Weights",
    "build_evaluation_plan",
    "build_training_plan",
    "build_update_plan",
    "dirichlet_partition",
    "evaluate",
    "flatten",
    "fold_updates",
    "get_weights",
    "iid_partition",
    "load_digits",
    "load_latest",
    "load_mnist",
    "make_model",
    "make_strategy",
    "plot_metrics",
    "probe_for",
    "register_strategy",
    "sample_order",
    "save_checkpoint",
    "staleness_weight",
    "train_eager",
    "unflatten",
    "weighted_average",
    "write_device_metrics",
    "write_metrics",
]
