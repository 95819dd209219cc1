from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AcquireRequest(_message.Message):
    __slots__ = ("model", "device", "instance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    instance: str
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class PartitionFile(_message.Message):
    __slots__ = ("file", "path", "size", "block_size")
    FILE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    file: str
    path: str
    size: int
    block_size: int
    def __init__(self, file: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class LeaseGranted(_message.Message):
    __slots__ = ("lease_id", "model", "key", "directory", "partitions", "files", "source", "total_bytes", "device")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model: str
    key: str
    directory: str
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionFile]
    files: _containers.RepeatedScalarFieldContainer[str]
    source: str
    total_bytes: int
    device: str
    def __init__(self, lease_id: _Optional[str] = ..., model: _Optional[str] = ..., key: _Optional[str] = ..., directory: _Optional[str] = ..., partitions: _Optional[_Iterable[_Union[PartitionFile, _Mapping]]] = ..., files: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., total_bytes: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class Watermarks(_message.Message):
    __slots__ = ("filled", "complete")
    FILLED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    filled: _containers.RepeatedScalarFieldContainer[int]
    complete: bool
    def __init__(self, filled: _Optional[_Iterable[int]] = ..., complete: _Optional[bool] = ...) -> None: ...

class LeaseEvent(_message.Message):
    __slots__ = ("granted", "progress")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    granted: LeaseGranted
    progress: Watermarks
    def __init__(self, granted: _Optional[_Union[LeaseGranted, _Mapping]] = ..., progress: _Optional[_Union[Watermarks, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("model", "tier", "wait")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: str
    wait: bool
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[str] = ..., wait: _Optional[bool] = ...) -> None: ...

class PrefetchReply(_message.Message):
    __slots__ = ("model", "tier", "source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: str
    source: str
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("model", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: str
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("tiers", "bytes")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    bytes: int
    def __init__(self, tiers: _Optional[_Iterable[str]] = ..., bytes: _Optional[int] = ...) -> None: ...

class InventoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointEntry(_message.Message):
    __slots__ = ("model", "key", "size", "state", "filled", "last_use", "leases", "readers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILLED_FIELD_NUMBER: _ClassVar[int]
    LAST_USE_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    READERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    key: str
    size: int
    state: str
    filled: int
    last_use: float
    leases: int
    readers: int
    def __init__(self, model: _Optional[str] = ..., key: _Optional[str] = ..., size: _Optional[int] = ..., state: _Optional[str] = ..., filled: _Optional[int] = ..., last_use: _Optional[float] = ..., leases: _Optional[int] = ..., readers: _Optional[int] = ...) -> None: ...

class TierInventory(_message.Message):
    __slots__ = ("name", "directory", "capacity", "used", "free", "entries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    directory: str
    capacity: int
    used: int
    free: int
    entries: _containers.RepeatedCompositeFieldContainer[CheckpointEntry]
    def __init__(self, name: _Optional[str] = ..., directory: _Optional[str] = ..., capacity: _Optional[int] = ..., used: _Optional[int] = ..., free: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[CheckpointEntry, _Mapping]]] = ...) -> None: ...

class Bandwidth(_message.Message):
    __slots__ = ("hop", "bytes_per_second", "samples")
    HOP_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    hop: str
    bytes_per_second: float
    samples: int
    def __init__(self, hop: _Optional[str] = ..., bytes_per_second: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("kind", "index", "name", "memory_total", "memory_free")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    index: int
    name: str
    memory_total: int
    memory_free: int
    def __init__(self, kind: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ...) -> None: ...

class LeaseInfo(_message.Message):
    __slots__ = ("lease_id", "model", "device", "instance", "since")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model: str
    device: str
    instance: str
    since: float
    def __init__(self, lease_id: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., instance: _Optional[str] = ..., since: _Optional[float] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("node", "version", "tiers", "bandwidths", "devices", "leases", "stores", "time")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTHS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierInventory]
    bandwidths: _containers.RepeatedCompositeFieldContainer[Bandwidth]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseInfo]
    stores: _containers.RepeatedScalarFieldContainer[str]
    time: float
    def __init__(self, node: _Optional[str] = ..., version: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierInventory, _Mapping]]] = ..., bandwidths: _Optional[_Iterable[_Union[Bandwidth, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[LeaseInfo, _Mapping]]] = ..., stores: _Optional[_Iterable[str]] = ..., time: _Optional[float] = ...) -> None: ...
