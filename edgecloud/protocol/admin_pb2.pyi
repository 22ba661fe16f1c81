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
