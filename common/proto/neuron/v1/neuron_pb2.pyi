from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardSummary(_message.Message):
    __slots__ = ("handle", "model", "dtype", "weight_bytes", "kv_bytes", "tp_rank", "tp_size", "group_id", "error", "path", "architecture", "max_context", "vocab_size", "kv_block_size", "kv_blocks_total", "kv_tokens", "max_seqs", "running", "waiting", "kv_blocks_used", "prefix_cache_queries", "prefix_cache_hits", "cuda_graph_batch_sizes", "cuda_graph_seconds", "cuda_graph_pool_bytes", "warm_up_seconds", "cuda_graph_mixed_batch_sizes", "cuda_graph_mixed_chunk")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARM_UP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_MIXED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_MIXED_CHUNK_FIELD_NUMBER: _ClassVar[int]
    handle: int
    model: str
    dtype: str
    weight_bytes: int
    kv_bytes: int
    tp_rank: int
    tp_size: int
    group_id: str
    error: str
    path: str
    architecture: str
    max_context: int
    vocab_size: int
    kv_block_size: int
    kv_blocks_total: int
    kv_tokens: int
    max_seqs: int
    running: int
    waiting: int
    kv_blocks_used: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    cuda_graph_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    cuda_graph_seconds: float
    cuda_graph_pool_bytes: int
    warm_up_seconds: float
    cuda_graph_mixed_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    cuda_graph_mixed_chunk: int
    def __init__(self, handle: _Optional[int] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., group_id: _Optional[str] = ..., error: _Optional[str] = ..., path: _Optional[str] = ..., architecture: _Optional[str] = ..., max_context: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., max_seqs: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., cuda_graph_batch_sizes: _Optional[_Iterable[int]] = ..., cuda_graph_seconds: _Optional[float] = ..., cuda_graph_pool_bytes: _Optional[int] = ..., warm_up_seconds: _Optional[float] = ..., cuda_graph_mixed_batch_sizes: _Optional[_Iterable[int]] = ..., cuda_graph_mixed_chunk: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "kind", "name", "total_bytes", "free_bytes", "shards", "busy", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    name: str
    total_bytes: int
    free_bytes: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardSummary]
    busy: bool
    error: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardSummary, _Mapping]]] = ..., busy: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("host", "version", "backend", "devices", "address")
    HOST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    host: str
    version: str
    backend: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    address: str
    def __init__(self, host: _Optional[str] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., address: _Optional[str] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("path", "dtype", "device", "max_context", "tp_size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    dtype: str
    device: str
    max_context: int
    tp_size: int
    def __init__(self, path: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_context: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("path", "architecture", "dtype", "num_parameters", "weight_bytes_per_rank", "kv_bytes_per_slot", "max_context", "vocab_size", "workspace_bytes", "estimate", "default_kv_slots")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    path: str
    architecture: str
    dtype: str
    num_parameters: int
    weight_bytes_per_rank: int
    kv_bytes_per_slot: int
    max_context: int
    vocab_size: int
    workspace_bytes: int
    estimate: str
    default_kv_slots: int
    def __init__(self, path: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., num_parameters: _Optional[int] = ..., weight_bytes_per_rank: _Optional[int] = ..., kv_bytes_per_slot: _Optional[int] = ..., max_context: _Optional[int] = ..., vocab_size: _Optional[int] = ..., workspace_bytes: _Optional[int] = ..., estimate: _Optional[str] = ..., default_kv_slots: _Optional[int] = ...) -> None: ...

class TensorParallel(_message.Message):
    __slots__ = ("group_id", "rank", "size")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    rank: int
    size: int
    def __init__(self, group_id: _Optional[str] = ..., rank: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("path", "model", "device", "dtype", "max_context", "max_seqs", "tp")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    path: str
    model: str
    device: str
    dtype: str
    max_context: int
    max_seqs: int
    tp: TensorParallel
    def __init__(self, path: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_context: _Optional[int] = ..., max_seqs: _Optional[int] = ..., tp: _Optional[_Union[TensorParallel, _Mapping]] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("stage", "bytes_done", "bytes_total", "tensors_done", "tensors_total", "gb_per_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GB_PER_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    gb_per_s: float
    def __init__(self, stage: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., gb_per_s: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("handle", "model", "device", "architecture", "dtype", "num_parameters", "weight_bytes", "kv_bytes", "max_context", "max_seqs", "vocab_size", "tp_rank", "tp_size", "load_seconds", "path", "kv_block_size", "kv_blocks_total", "kv_tokens", "cuda_graph_batch_sizes", "cuda_graph_seconds", "cuda_graph_pool_bytes", "warm_up_seconds", "cuda_graph_mixed_batch_sizes", "cuda_graph_mixed_chunk")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARM_UP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_MIXED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_MIXED_CHUNK_FIELD_NUMBER: _ClassVar[int]
    handle: int
    model: str
    device: str
    architecture: str
    dtype: str
    num_parameters: int
    weight_bytes: int
    kv_bytes: int
    max_context: int
    max_seqs: int
    vocab_size: int
    tp_rank: int
    tp_size: int
    load_seconds: float
    path: str
    kv_block_size: int
    kv_blocks_total: int
    kv_tokens: int
    cuda_graph_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    cuda_graph_seconds: float
    cuda_graph_pool_bytes: int
    warm_up_seconds: float
    cuda_graph_mixed_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    cuda_graph_mixed_chunk: int
    def __init__(self, handle: _Optional[int] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., num_parameters: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., max_context: _Optional[int] = ..., max_seqs: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., load_seconds: _Optional[float] = ..., path: _Optional[str] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., cuda_graph_batch_sizes: _Optional[_Iterable[int]] = ..., cuda_graph_seconds: _Optional[float] = ..., cuda_graph_pool_bytes: _Optional[int] = ..., warm_up_seconds: _Optional[float] = ..., cuda_graph_mixed_batch_sizes: _Optional[_Iterable[int]] = ..., cuda_graph_mixed_chunk: _Optional[int] = ...) -> None: ...

class LoadShardResponse(_message.Message):
    __slots__ = ("progress", "loaded")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    progress: LoadProgress
    loaded: ShardInfo
    def __init__(self, progress: _Optional[_Union[LoadProgress, _Mapping]] = ..., loaded: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class DropShardRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: int
    def __init__(self, handle: _Optional[int] = ...) -> None: ...

class DropShardResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("handle", "token_ids", "all_positions")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    handle: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    all_positions: bool
    def __init__(self, handle: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., all_positions: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("logits",)
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "tokens", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: TokenIds
    chat: Chat
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("handle", "prompt", "sampling", "request_id")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    handle: int
    prompt: Prompt
    sampling: SamplingParams
    request_id: str
    def __init__(self, handle: _Optional[int] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("time_to_first_token_ms", "total_ms", "decode_tokens_per_second")
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_second: float
    def __init__(self, time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., decode_tokens_per_second: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "stop_reason", "usage", "timing", "request_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    stop_reason: str
    usage: Usage
    timing: Timing
    request_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("id", "start", "cancel")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: GenerateRequest
    cancel: bool
    def __init__(self, id: _Optional[int] = ..., start: _Optional[_Union[GenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class GenerateUpdate(_message.Message):
    __slots__ = ("id", "response", "error_code", "error_message")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: GenerateResponse
    error_code: int
    error_message: str
    def __init__(self, id: _Optional[int] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[GenerateUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[GenerateUpdate, _Mapping]]] = ...) -> None: ...

class ClearKvRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: int
    def __init__(self, handle: _Optional[int] = ...) -> None: ...

class ClearKvResponse(_message.Message):
    __slots__ = ("blocks_cleared",)
    BLOCKS_CLEARED_FIELD_NUMBER: _ClassVar[int]
    blocks_cleared: int
    def __init__(self, blocks_cleared: _Optional[int] = ...) -> None: ...

class CreateGroupIdRequest(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: str
    def __init__(self, device: _Optional[str] = ...) -> None: ...

class CreateGroupIdResponse(_message.Message):
    __slots__ = ("unique_id",)
    UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    unique_id: bytes
    def __init__(self, unique_id: _Optional[bytes] = ...) -> None: ...

class GroupMember(_message.Message):
    __slots__ = ("address", "device")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    address: str
    device: str
    def __init__(self, address: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class InitGroupRequest(_message.Message):
    __slots__ = ("group_id", "world_size", "rank", "unique_id", "device", "timeout_ms", "members", "step_timeout_ms")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    world_size: int
    rank: int
    unique_id: bytes
    device: str
    timeout_ms: int
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    step_timeout_ms: int
    def __init__(self, group_id: _Optional[str] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., unique_id: _Optional[bytes] = ..., device: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., step_timeout_ms: _Optional[int] = ...) -> None: ...

class InitGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GroupSanityRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class GroupSanityResponse(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: float
    def __init__(self, value: _Optional[float] = ...) -> None: ...

class DestroyGroupRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class DestroyGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StepCommand(_message.Message):
    __slots__ = ("group_id", "step", "token_ids", "positions", "slot_mapping", "query_start", "context_lens", "block_tables", "max_blocks")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    QUERY_START_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLES_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    step: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    slot_mapping: _containers.RepeatedScalarFieldContainer[int]
    query_start: _containers.RepeatedScalarFieldContainer[int]
    context_lens: _containers.RepeatedScalarFieldContainer[int]
    block_tables: _containers.RepeatedScalarFieldContainer[int]
    max_blocks: int
    def __init__(self, group_id: _Optional[str] = ..., step: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., slot_mapping: _Optional[_Iterable[int]] = ..., query_start: _Optional[_Iterable[int]] = ..., context_lens: _Optional[_Iterable[int]] = ..., block_tables: _Optional[_Iterable[int]] = ..., max_blocks: _Optional[int] = ...) -> None: ...

class StepAck(_message.Message):
    __slots__ = ("step", "error")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step: int
    error: str
    def __init__(self, step: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...
