"""The remote wire format: one safetensors file per request and per result, nothing else (no pickle).

A message is a safetensors file whose ``__metadata__`` holds one entry, ``"ic"``: a JSON document (the request's
graph, inputs and options, or the result's values and error), in which tensors are ``{"tensor": i}``, the
file's tensor ``"i"``. ``pack``/``unpack`` write and read it; ``unpack`` checks the framing itself (lengths,
JSON, tensor names) before safetensors reads the data, and every malformed message is a :class:`WireError`.

Values: requests carry the IR's values (``ir/serialize.py``); results also carry what a saved value can be
after a run: model outputs (``transformers``' ``ModelOutput``, rebuilt as the same class when it is one of
``transformers.modeling_outputs``'), KV caches (their layers' keys and values), ``tracer.cache()`` mappings.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..ir.serialize import value_from_data, value_to_data
from ..runtime import CacheEntry, ModuleCache

VERSION = 1
MAX_HEADER = 64 << 20  # bytes of the safetensors header (the JSON document is inside it)


class WireError(ValueError):
    """A message that is not a well-formed request or result (the server answers 400)."""


def pack(document: dict, tensors: list[torch.Tensor]) -> bytes:
    from safetensors.torch import save

    named = {}
    storages: set[int] = set()
    for i, t in enumerate(tensors):
        t = t.detach().contiguous().cpu()
        if t.numel() and t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        named[str(i)] = t
    return save(named, metadata={"ic": json.dumps(document)})


def unpack(payload: bytes, max_bytes: int | None = None) -> tuple[dict, list[torch.Tensor]]:
    """The JSON document and the tensors of a message (raises :class:`WireError`)."""
    if not isinstance(payload, (bytes, bytearray)):
        raise WireError("a message is bytes")
    if max_bytes is not None and len(payload) > max_bytes:
        raise WireError(f"the message has {len(payload)} bytes, more than {max_bytes}")
    if len(payload) < 8:
        raise WireError("the message is shorter than its own length field")
    n = int.from_bytes(payload[:8], "little")
    if n > min(MAX_HEADER, len(payload) - 8):
        raise WireError(f"the message's header says {n} bytes, but the message has {len(payload) - 8}")
    try:
        header = json.loads(bytes(payload[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"the message's header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("the message's header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get("ic"), str):
        raise WireError("the message carries no document (`__metadata__.ic`)")
    names = [k for k in header if k != "__metadata__"]
    count = len(names)
    if sorted(names) != sorted(str(i) for i in range(count)):
        raise WireError("the message's tensors must be named 0, 1, ... n-1")
    for name in names:
        spec = header[name]
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise WireError(f"tensor {name} has no shape")
    try:
        from safetensors.torch import load

        loaded = load(bytes(payload))
    except Exception as e:  # safetensors' own checks: dtypes, offsets, sizes
        raise WireError(f"the message's tensors cannot be read: {e}") from None
    try:
        document = json.loads(meta["ic"])
    except ValueError as e:
        raise WireError(f"the message's document is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise WireError("the message's document is not a JSON object")
    version = document.get("version")
    if version != VERSION:
        raise WireError(f"unknown message version {version!r} (this side speaks {VERSION})")
    return document, [loaded[str(i)] for i in range(count)]


# -- values ------------------------------------------------------------------------------------------------------
def encode(value: Any, tensors: list) -> Any:
    """A value (as a request's input or a run's saved value) as JSON-able data; tensors appended to ``tensors``."""
    if isinstance(value, ModuleCache):
        return {"modulecache": [[k, encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, CacheEntry):
        return {"cacheentry": [encode(value.output, tensors), encode(value.inputs, tensors)]}
    if isinstance(value, torch.nn.Parameter):
        return {"parameter": encode(value.detach(), tensors), "requires_grad": value.requires_grad}
    output = _model_output(value)
    if output is not None:
        return {
            "modeloutput": type(value).__name__,
            "fields": [[k, encode(v, tensors)] for k, v in output.items()],
        }
    layers = _cache_layers(value)
    if layers is not None:
        return {"kvcache": [[encode(k, tensors), encode(v, tensors)] for k, v in layers]}
    t = type(value)
    if t is tuple or t is list:
        return {t.__name__: [encode(x, tensors) for x in value]}
    if t is dict:
        return {"dict": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    if t is set or t is frozenset:
        return {"set": [encode(x, tensors) for x in value], "frozen": t is frozenset}
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
        value = value.as_subclass(torch.Tensor)  # a saved alias (tracing/saving.py): the plain tensor
    if isinstance(value, (tuple, list, dict)) and t not in (tuple, list, dict):  # namedtuples, subclasses
        plain: Any = tuple(value) if hasattr(value, "_fields") else t.__mro__[1](value)
        return encode(plain, tensors)
    return value_to_data(value, tensors)


def decode(data: Any, tensors: list) -> Any:
    """The inverse of :func:`encode` (raises :class:`WireError` on anything else)."""
    if not isinstance(data, dict):
        if isinstance(data, (int, float, str, bool)) or data is None:
            return data
        raise WireError(f"a value cannot be a JSON {type(data).__name__}")
    try:
        if "modulecache" in data:
            cache = ModuleCache()
            for k, v in data["modulecache"]:
                cache[str(k)] = decode(v, tensors)
            return cache
        if "cacheentry" in data:
            out, inputs = data["cacheentry"]
            return CacheEntry(decode(out, tensors), decode(inputs, tensors))
        if "parameter" in data:
            return torch.nn.Parameter(decode(data["parameter"], tensors), bool(data.get("requires_grad")))
        if "modeloutput" in data:
            return _rebuild_output(
                str(data["modeloutput"]), [(str(k), decode(v, tensors)) for k, v in data["fields"]]
            )
        if "kvcache" in data:
            return _rebuild_cache([(decode(k, tensors), decode(v, tensors)) for k, v in data["kvcache"]])
        if "set" in data:
            items = [decode(x, tensors) for x in data["set"]]
            return frozenset(items) if data.get("frozen") else set(items)
        if "tuple" in data and len(data) == 1:
            return tuple(decode(x, tensors) for x in data["tuple"])
        if "list" in data and len(data) == 1:
            return [decode(x, tensors) for x in data["list"]]
        if "dict" in data and len(data) == 1:
            return {decode(k, tensors): decode(v, tensors) for k, v in data["dict"]}
        return value_from_data(data, tensors)
    except WireError:
        raise
    except Exception as e:  # malformed nesting: wrong arity, unhashable keys, unknown tags
        raise WireError(f"malformed value {json.dumps(data)[:200]}: {type(e).__name__}: {e}") from None


def _model_output(value: Any) -> dict | None:
    try:
        from transformers.utils import ModelOutput
    except ImportError:
        return None
    if isinstance(value, ModelOutput):
        return {k: v for k, v in value.items()}
    return None


def _rebuild_output(name: str, fields: list[tuple[str, Any]]) -> Any:
    """The ``transformers.modeling_outputs`` class ``name`` (a class of that module only), else a plain
    ``ModelOutput`` holding the same fields."""
    from transformers import modeling_outputs
    from transformers.utils import ModelOutput

    cls = getattr(modeling_outputs, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, ModelOutput)):
        cls = ModelOutput
    try:
        return cls(**dict(fields))
    except TypeError:
        return ModelOutput(**dict(fields))


def _cache_layers(value: Any) -> list[tuple[Any, Any]] | None:
    """A ``transformers`` KV cache's (keys, values) per layer, or None for anything else."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return None
    if not isinstance(value, Cache):
        return None
    layers = getattr(value, "layers", None)
    if layers is None:
        raise WireError(f"a {type(value).__name__} cannot be sent: it has no layers")
    return [(layer.keys, layer.values) for layer in layers]


def _rebuild_cache(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        if k is not None:
            cache.update(k, v, i)
    return cache


__all__ = ["MAX_HEADER", "VERSION", "WireError", "decode", "encode", "pack", "unpack"]
