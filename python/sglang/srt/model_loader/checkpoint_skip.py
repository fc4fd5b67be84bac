# Copyright 2025 SGLang Team
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""Checkpoint tensors a model declines, skipped before they are read.

A model may define ``skip_checkpoint_tensor(name, shape, dtype) -> bool`` (``shape`` a list
of ints, ``dtype`` the safetensors dtype string, e.g. ``"BF16"``). The safetensors iterators
of ``weight_utils`` ask it from the file header alone, so a skipped tensor is never read:

* memory-mapped (default): :func:`skipped` before ``get_tensor``;
* ``disable_mmap`` (the whole shard is otherwise read into memory first):
  :func:`load_unmapped` reads the header, then only the byte ranges of the kept tensors, and
  hands them to safetensors' own parser.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Dict, List, Optional

import safetensors.torch
import torch

SkipTensor = Callable[[str, List[int], str], bool]

# safetensors layout: an 8-byte little-endian header length, the JSON header, the data.
_HEADER_LEN = struct.Struct("<Q")
_METADATA_KEY = "__metadata__"


def skipped(f, name: str, skip_tensor: Optional[SkipTensor]) -> bool:
    """Whether the model skips tensor ``name`` of the open safetensors file ``f``, from
    its header only (nothing is read)."""
    if skip_tensor is None:
        return False
    sl = f.get_slice(name)
    return skip_tensor(name, sl.get_shape(), sl.get_dtype())


def load_unmapped(
    path: str, skip_tensor: Optional[SkipTensor] = None
) -> Dict[str, torch.Tensor]:
    """The tensors of one shard read without mmap; with ``skip_tensor``, the skipped
    tensors' bytes are never read."""
    with open(path, "rb") as f:
        if skip_tensor is None:
            return safetensors.torch.load(f.read())
        (header_len,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
        header = json.loads(f.read(header_len))
        data_start = _HEADER_LEN.size + header_len
        kept, chunks, offset = {}, [], 0
        tensors = sorted(
            ((name, info) for name, info in header.items() if name != _METADATA_KEY),
            key=lambda item: item[1]["data_offsets"][0],
        )
        for name, info in tensors:
            if skip_tensor(name, list(info["shape"]), info["dtype"]):
                continue
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            chunks.append(f.read(end - begin))
            kept[name] = {
                "dtype": info["dtype"],
                "shape": info["shape"],
                "data_offsets": [offset, offset + end - begin],
            }
            offset += end - begin
    # A shard of the kept tensors only, parsed by safetensors itself.
    kept_header = json.dumps(kept).encode()
    kept_header += b" " * (-len(kept_header) % 8)
    return safetensors.torch.load(
        _HEADER_LEN.pack(len(kept_header)) + kept_header + b"".join(chunks)
    )
