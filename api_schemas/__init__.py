"""The HTTP contract of the FastIF service as pydantic v2 models (imports pydantic only)."""

from .applications import (
    Agreement,
    CandidateSource,
    CorrectRequest,
    DataRef,
    EvaluationSet,
    ExplainItem,
    ExplainRequest,
    GraphEdge,
    GraphInput,
    GraphNode,
    GraphRequest,
    GraphResult,
    LabelledInput,
    SelfInfluenceItem,
    SelfInfluenceRequest,
)
from .common import ErrorInfo, FiniteFloat
from .influence import CGSettings, InfluenceInput, InfluenceRequest, LissaConfig, SolverSettings
from .jobs import TERMINAL_STATUSES, Job, JobList, JobStatus, Progress
from .models import IndexSettings, InfluenceSettings, Model, ModelCreate, ModelList, ModelStatus, TrainData
from .problems import FieldError, Problem
from .results import Diagnostics, Influential, Prediction, ResultItem, ResultsPage

__all__ = [
    "Agreement",
    "CandidateSource",
    "CorrectRequest",
    "DataRef",
    "EvaluationSet",
    "ExplainItem",
    "ExplainRequest",
    "GraphEdge",
    "GraphInput",
    "GraphNode",
    "GraphRequest",
    "GraphResult",
    "LabelledInput",
    "SelfInfluenceItem",
    "SelfInfluenceRequest",
    "Diagnostics",
    "ErrorInfo",
    "FieldError",
    "FiniteFloat",
    "IndexSettings",
    "Influential",
    "InfluenceInput",
    "InfluenceRequest",
    "InfluenceSettings",
    "Job",
    "JobList",
    "JobStatus",
    "LissaConfig",
    "SolverSettings",
    "CGSettings",
    "Model",
    "ModelCreate",
    "ModelList",
    "ModelStatus",
    "Prediction",
    "Problem",
    "Progress",
    "ResultItem",
    "ResultsPage",
    "TERMINAL_STATUSES",
    "TrainData",
]
