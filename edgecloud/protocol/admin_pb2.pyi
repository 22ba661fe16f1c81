from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetThresholdsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ExitThreshold(_message.Message):
    __slots__ = ("exit_index", "exit_name", "threshold")
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXIT_NAME_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    exit_index: int
    exit_name: str
    threshold: float
    def __init__(self, exit_index: _Optional[int] = ..., exit_name: _Optional[str] = ..., threshold: _Optional[float] = ...) -> None: ...

class ModelThresholds(_message.Message):
    __slots__ = ("model", "policy", "exits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    exits: _containers.RepeatedCompositeFieldContainer[ExitThreshold]
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., exits: _Optional[_Iterable[_Union[ExitThreshold, _Mapping]]] = ...) -> None: ...

class GetThresholdsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelThresholds]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelThresholds, _Mapping]]] = ...) -> None: ...

class SetThresholdRequest(_message.Message):
    __slots__ = ("model", "exit_index", "value", "clear")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    model: str
    exit_index: int
    value: float
    clear: bool
    def __init__(self, model: _Optional[str] = ..., exit_index: _Optional[int] = ..., value: _Optional[float] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetThresholdResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelThresholds
    def __init__(self, model: _Optional[_Union[ModelThresholds, _Mapping]] = ...) -> None: ...

class Budgets(_message.Message):
    __slots__ = ("agreement", "delta", "energy_j", "uplink_bytes_s", "p99_latency_ms", "priority")
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_S_FIELD_NUMBER: _ClassVar[int]
    P99_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    agreement: float
    delta: float
    energy_j: float
    uplink_bytes_s: float
    p99_latency_ms: float
    priority: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agreement: _Optional[float] = ..., delta: _Optional[float] = ..., energy_j: _Optional[float] = ..., uplink_bytes_s: _Optional[float] = ..., p99_latency_ms: _Optional[float] = ..., priority: _Optional[_Iterable[str]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("name", "target", "value", "bound", "met", "reachable", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    MET_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: float
    value: float
    bound: float
    met: bool
    reachable: bool
    message: str
    def __init__(self, name: _Optional[str] = ..., target: _Optional[float] = ..., value: _Optional[float] = ..., bound: _Optional[float] = ..., met: _Optional[bool] = ..., reachable: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ControlState(_message.Message):
    __slots__ = ("model", "exit_index", "exit_name", "policy", "threshold", "shadow_rate", "window_samples", "window_shadowed", "agreement", "agreement_lower", "exit_agreement", "exit_agreement_lower", "exit_share", "budgets", "backoff", "steps", "targets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXIT_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SHADOW_RATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SHADOWED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_LOWER_FIELD_NUMBER: _ClassVar[int]
    EXIT_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    EXIT_AGREEMENT_LOWER_FIELD_NUMBER: _ClassVar[int]
    EXIT_SHARE_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    exit_index: int
    exit_name: str
    policy: str
    threshold: float
    shadow_rate: float
    window_samples: int
    window_shadowed: int
    agreement: float
    agreement_lower: float
    exit_agreement: float
    exit_agreement_lower: float
    exit_share: float
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    backoff: bool
    steps: int
    targets: Budgets
    def __init__(self, model: _Optional[str] = ..., exit_index: _Optional[int] = ..., exit_name: _Optional[str] = ..., policy: _Optional[str] = ..., threshold: _Optional[float] = ..., shadow_rate: _Optional[float] = ..., window_samples: _Optional[int] = ..., window_shadowed: _Optional[int] = ..., agreement: _Optional[float] = ..., agreement_lower: _Optional[float] = ..., exit_agreement: _Optional[float] = ..., exit_agreement_lower: _Optional[float] = ..., exit_share: _Optional[float] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., backoff: _Optional[bool] = ..., steps: _Optional[int] = ..., targets: _Optional[_Union[Budgets, _Mapping]] = ...) -> None: ...

class GetControlRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetControlResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ControlState]
    def __init__(self, models: _Optional[_Iterable[_Union[ControlState, _Mapping]]] = ...) -> None: ...

class SetBudgetsRequest(_message.Message):
    __slots__ = ("model", "budgets", "clear")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    model: str
    budgets: Budgets
    clear: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., budgets: _Optional[_Union[Budgets, _Mapping]] = ..., clear: _Optional[_Iterable[str]] = ...) -> None: ...

class SetBudgetsResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ControlState
    def __init__(self, model: _Optional[_Union[ControlState, _Mapping]] = ...) -> None: ...
