"""Malicious checkpoints: refused with CheckpointError, and nothing in them runs.

The payloads are written opcode by opcode (pickle protocols 0-5), so each one says exactly which
trick it plays: dotted global names resolved attribute by attribute (protocol >= 4), global names
built from the memo, gadgets such as ``copyreg._reconstructor`` / ``functools.partial`` /
``builtins.getattr``, ``BUILD`` / ``__setstate__`` on allowed objects, numpy dtype states that lie
about holding object pointers, extension codes, persistent ids. The same goes for torch.save files
(``data.pkl`` in a zip written by hand) abusing the one global this project allow-lists for
``torch.load(weights_only=True)``: ``argparse.Namespace``. A property-based test feeds random
opcode streams to the .pkl reader. The last tests cover a disk filling up during a save.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import copyreg
import errno
import fractions
import importlib
import importlib.util
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convmae_det import compat
from convmae_det.checkpoint import io as ckpt_io
from convmae_det.checkpoint import safe_pickle
from convmae_det.checkpoint.io import (
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint_file,
    save_checkpoint_atomic,
    write_text_atomic,
)
from tests.conftest import ROOT

PROTOCOLS = list(range(6))
CONVERT_TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")

# ------------------------------------------------------------------------------------------------
# Writing pickles by hand
# ------------------------------------------------------------------------------------------------


def text(value: str, proto: int) -> bytes:
    """Push a str (no newline inside)."""
    raw = value.encode("utf-8")
    if proto == 0:
        return pickle.UNICODE + value.encode("raw-unicode-escape") + b"\n"
    if proto >= 4 and len(raw) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def py2str(raw: bytes, proto: int) -> bytes:
    """Push a Python 2 ``str`` (read as latin-1 text, as detectron2 reads .pkl files)."""
    if proto == 0:
        return pickle.STRING + repr(raw.decode("latin1")).encode("latin1") + b"\n"
    if len(raw) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw
    return pickle.BINSTRING + struct.pack("<i", len(raw)) + raw


def integer(value: int) -> bytes:
    return pickle.INT + str(value).encode() + b"\n"


def glob(module: str, name: str, proto: int) -> bytes:
    """Push a global: STACK_GLOBAL from protocol 4, GLOBAL before."""
    if proto >= 4:
        return text(module, proto) + text(name, proto) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def lst(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.LIST


def dct(proto: int, **items: bytes) -> bytes:
    return pickle.MARK + b"".join(text(k, proto) + v for k, v in items.items()) + pickle.DICT


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + pickle.REDUCE


def put(index: int, proto: int) -> bytes:
    if proto == 0:
        return pickle.PUT + str(index).encode() + b"\n"
    return pickle.BINPUT + bytes([index])


def get(index: int, proto: int) -> bytes:
    if proto == 0:
        return pickle.GET + str(index).encode() + b"\n"
    return pickle.BINGET + bytes([index])


def stream(proto: int, payload: bytes) -> bytes:
    """``{"model": {}, "payload": <payload>}``: a dict, as a checkpoint would be."""
    header = pickle.PROTO + bytes([proto]) if proto >= 2 else b""
    return header + dct(proto, model=pickle.MARK + pickle.DICT, payload=payload) + pickle.STOP


def empty_array(proto: int, module: str = "numpy.core.multiarray") -> bytes:
    """What numpy writes before an array's BUILD: ``_reconstruct(ndarray, (0,), 'b')``."""
    return call(
        glob(module, "_reconstruct", proto),
        glob("numpy", "ndarray", proto),
        tup(integer(0)),
        py2str(b"b", proto),
    )


def dtype_of(spec: str, proto: int, flags: int = 0, endian: str = "<") -> bytes:
    """``numpy.dtype(spec, False, True)`` followed by a BUILD with a (possibly lying) state."""
    state = tup(
        integer(3),
        text(endian, proto),
        pickle.NONE,
        pickle.NONE,
        pickle.NONE,
        integer(-1),
        integer(-1),
        integer(flags),
    )
    return (
        call(glob("numpy", "dtype", proto), text(spec, proto), pickle.NEWFALSE, pickle.NEWTRUE)
        + state
        + pickle.BUILD
    )


def array_of(proto: int, dtype: bytes, shape: Tuple[int, ...], raw: bytes) -> bytes:
    shape_ops = tup(*(integer(n) for n in shape))
    state = tup(integer(1), shape_ops, dtype, pickle.NEWFALSE, py2str(raw, proto))
    return empty_array(proto) + state + pickle.BUILD


# ------------------------------------------------------------------------------------------------
# The payloads: (proto, marker path) -> the opcodes of the value stored under "payload"
# ------------------------------------------------------------------------------------------------


def _py(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def _sh(marker: str) -> str:
    return f"touch {marker}"


def _eval_via(module: str, dotted: str) -> Callable[[int, str], bytes]:
    def payload(proto: int, marker: str) -> bytes:
        getter = call(glob(module, dotted, proto), text("eval", proto))
        return call(getter, text(_py(marker), proto))

    return payload


def _call_global(module: str, name: str, args: Callable[[int, str], List[bytes]]):
    def payload(proto: int, marker: str) -> bytes:
        return call(glob(module, name, proto), *args(proto, marker))

    return payload


def _shell(proto: int, marker: str) -> List[bytes]:
    return [text(_sh(marker), proto)]


def _stack_global_from_memo(proto: int, marker: str) -> bytes:
    """Module and (dotted) name pushed once, memoised, popped, and fetched back from the memo
    just before STACK_GLOBAL: the name never appears next to the opcode that resolves it."""
    return (
        text("numpy", proto)
        + put(1, proto)
        + pickle.POP
        + text("dtypes.__builtins__.get", proto)
        + put(2, proto)
        + pickle.POP
        + get(1, proto)
        + get(2, proto)
        + pickle.STACK_GLOBAL
        + tup(text("eval", proto))
        + pickle.REDUCE
        + tup(text(_py(marker), proto))
        + pickle.REDUCE
    )


def _stack_global_os_system_from_memo(proto: int, marker: str) -> bytes:
    return (
        text("os", proto)
        + put(3, proto)
        + text("system", proto)
        + put(4, proto)
        + pickle.POP
        + pickle.POP
        + get(3, proto)
        + get(4, proto)
        + pickle.STACK_GLOBAL
        + tup(text(_sh(marker), proto))
        + pickle.REDUCE
    )


def _copyreg_reconstructor(proto: int, marker: str) -> bytes:
    return call(
        glob("copyreg", "_reconstructor", proto),
        glob("subprocess", "Popen", proto),
        glob("builtins", "object", proto),
        pickle.NONE,
    )


def _copyreg_reconstructor_allowed_class(proto: int, marker: str) -> bytes:
    return call(
        glob("copy_reg", "_reconstructor", proto),
        glob("collections", "OrderedDict", proto),
        glob("collections", "OrderedDict", proto),
        lst(),
    )


def _functools_partial(proto: int, marker: str) -> bytes:
    partial = call(
        glob("functools", "partial", proto), glob("os", "system", proto), text(_sh(marker), proto)
    )
    return partial + pickle.EMPTY_TUPLE + pickle.REDUCE


def _builtins_getattr(proto: int, marker: str) -> bytes:
    module = call(glob("builtins", "__import__", proto), text("os", proto))
    system = call(glob("builtins", "getattr", proto), module, text("system", proto))
    return call(system, text(_sh(marker), proto))


def _getattr_on_allowed(proto: int, marker: str) -> bytes:
    return call(
        glob("__builtin__", "getattr", proto),
        glob("numpy", "dtype", proto),
        text("__init__", proto),
    )


def _build_on_ordereddict(proto: int, marker: str) -> bytes:
    od = call(glob("collections", "OrderedDict", proto))
    state = dct(proto, __setstate__=glob("os", "system", proto), foo=integer(1))
    return od + state + pickle.BUILD


def _build_on_ordereddict_plain_state(proto: int, marker: str) -> bytes:
    od = call(glob("collections", "OrderedDict", proto))
    return od + dct(proto, foo=integer(1)) + pickle.BUILD


def _build_slotstate_on_ordereddict(proto: int, marker: str) -> bytes:
    od = call(glob("collections", "OrderedDict", proto))
    slots = dct(proto, __class__=glob("numpy", "ndarray", proto))
    return od + tup(pickle.NONE, slots) + pickle.BUILD


def _build_dict_on_ndarray(proto: int, marker: str) -> bytes:
    state = dct(proto, __class__=glob("numpy", "dtype", proto), foo=integer(1))
    return empty_array(proto) + state + pickle.BUILD


def _build_twice_on_ndarray_with_setstate(proto: int, marker: str) -> bytes:
    real = array_of(proto, dtype_of("f4", proto), (1,), b"\x00\x00\x80?")
    return real + dct(proto, __setstate__=glob("builtins", "eval", proto)) + pickle.BUILD


def _build_on_dtype_class(proto: int, marker: str) -> bytes:
    cls = glob("numpy.dtypes", "Float32DType", proto)
    return cls + dct(proto, __reduce__=glob("os", "system", proto)) + pickle.BUILD


def _dtype_claims_objects(proto: int, marker: str) -> bytes:
    """A float64 dtype whose pickled flags say "items are PyObject pointers" (63): with numpy's
    own unpickling, the array's bytes 0x41... would be dereferenced as objects (a crash, or
    worse with crafted addresses)."""
    return array_of(proto, dtype_of("f8", proto, flags=63), (1,), b"A" * 8)


def _object_dtype_claims_plain(proto: int, marker: str) -> bytes:
    """An object dtype whose pickled flags say it holds plain bytes, with raw 'pointers'."""
    return array_of(proto, dtype_of("O", proto, flags=0, endian="|"), (1,), b"A" * 8)


def _scalar_with_lying_dtype(proto: int, marker: str) -> bytes:
    return call(
        glob("numpy._core.multiarray", "scalar", proto),
        dtype_of("f8", proto, flags=63),
        py2str(b"A" * 8, proto),
    )


def _scalar_with_object_dtype(proto: int, marker: str) -> bytes:
    return call(
        glob("numpy.core.multiarray", "scalar", proto),
        call(glob("numpy", "dtype", proto), text("O", proto)),
        glob("os", "system", proto),
    )


def _flexible_dtype_grows(proto: int, marker: str) -> bytes:
    """An 'S4' dtype whose state claims 4096-byte items: reads past the array's buffer."""
    state = tup(
        integer(3),
        text("|", proto),
        pickle.NONE,
        pickle.NONE,
        pickle.NONE,
        integer(4096),
        integer(1),
        integer(0),
    )
    grown = (
        call(glob("numpy", "dtype", proto), text("S4", proto), pickle.NEWFALSE, pickle.NEWTRUE)
        + state
        + pickle.BUILD
    )
    return array_of(proto, grown, (1,), b"abcd")


def _datetime_dtype_state_without_unit(proto: int, marker: str) -> bytes:
    """numpy's own dtype.__setstate__ dereferences a missing datetime unit (a crash)."""
    return array_of(proto, dtype_of("M8", proto), (1,), b"A" * 8)


def _structured_dtype_state(proto: int, marker: str) -> bytes:
    fields = pickle.MARK + text("a", proto) + tup(dtype_of("O", proto, 63, "|"), integer(0))
    state = tup(
        integer(3),
        text("|", proto),
        pickle.NONE,
        tup(text("a", proto)),
        fields + pickle.DICT,
        integer(8),
        integer(1),
        integer(0),
    )
    void = call(glob("numpy", "dtype", proto), text("V8", proto), pickle.NEWFALSE, pickle.NEWTRUE)
    return array_of(proto, void + state + pickle.BUILD, (1,), b"A" * 8)


def _object_array_short_list(proto: int, marker: str) -> bytes:
    """An object array of 4 items built from a 1-item list: numpy reads past the list."""
    obj = call(glob("numpy", "dtype", proto), text("O8", proto), pickle.NEWFALSE, pickle.NEWTRUE)
    state = tup(integer(1), tup(integer(4)), obj, pickle.NEWFALSE, lst(pickle.NONE))
    return empty_array(proto) + state + pickle.BUILD


def _array_size_overflows(proto: int, marker: str) -> bytes:
    """A shape whose byte size wraps around 64 bits to the 8 bytes given."""
    return array_of(proto, dtype_of("f8", proto), (2**61, 8), b"A" * 8)


def _reduce_on_ndarray(proto: int, marker: str) -> bytes:
    """``numpy.ndarray(shape, dtype, buffer)``: an array over memory the file chooses."""
    return call(
        glob("numpy", "ndarray", proto),
        tup(integer(8)),
        text("f8", proto),
        py2str(b"x" * 8, proto),
    )


def _newobj_ndarray(proto: int, marker: str) -> bytes:
    args = tup(tup(integer(1)), text("f8", proto), py2str(b"x" * 8, proto))
    return glob("numpy", "ndarray", proto) + args + pickle.NEWOBJ


def _reconstruct_other_args(proto: int, marker: str) -> bytes:
    return call(
        glob("numpy._core.multiarray", "_reconstruct", proto),
        glob("numpy", "ndarray", proto),
        tup(integer(10**6), integer(10**6)),
        text("f8", proto),
    )


def _setitem_on_ndarray(proto: int, marker: str) -> bytes:
    real = array_of(proto, dtype_of("f4", proto), (1,), b"\x00\x00\x80?")
    return real + integer(0) + integer(7) + pickle.SETITEM


def _inst_opcode(proto: int, marker: str) -> bytes:
    return pickle.MARK + text(_sh(marker), proto) + pickle.INST + b"os\nsystem\n"


def _obj_opcode(proto: int, marker: str) -> bytes:
    return pickle.MARK + glob("collections", "OrderedDict", proto) + pickle.OBJ


def _persistent_id(proto: int, marker: str) -> bytes:
    return pickle.PERSID + b"storage\n"


def _binary_persistent_id(proto: int, marker: str) -> bytes:
    return tup(text("storage", proto), text(_sh(marker), proto)) + pickle.BINPERSID


def _codecs_other_codec(proto: int, marker: str) -> bytes:
    return call(glob("_codecs", "encode", proto), text("x", proto), text("rot13", proto))


def _bytes_with_size(proto: int, marker: str) -> bytes:
    return call(glob("builtins", "bytes", proto), integer(10**12))


PAYLOADS: Dict[str, Callable[[int, str], bytes]] = {
    # dotted names: resolved attribute by attribute from protocol 4 by pickle's own find_class
    "dotted numpy dtypes.__builtins__.get": _eval_via("numpy", "dtypes.__builtins__.get"),
    "dotted numpy dtypes.__builtins__.__getitem__": _eval_via(
        "numpy", "dtypes.__builtins__.__getitem__"
    ),
    "dotted function __builtins__": _eval_via(
        "numpy._core.numeric", "_frombuffer.__builtins__.get"
    ),
    "dotted __globals__": _eval_via("numpy._core.numeric", "_frombuffer.__globals__.get"),
    "dotted __class__.__base__": _call_global(
        "collections", "OrderedDict.__class__.__base__.__subclasses__", lambda p, m: []
    ),
    "dotted sys.modules": _call_global(
        "numpy._core.numeric", "sys.modules.get", lambda p, m: [text("os", p)]
    ),
    "dotted DType class attribute": _call_global(
        "numpy.dtypes", "Float32DType.__init__.__globals__.get", lambda p, m: [text("eval", p)]
    ),
    "numpy.dtypes module itself": _call_global("numpy", "dtypes", lambda p, m: []),
    "numpy.dtypes helper function": _call_global(
        "numpy.dtypes", "_convert_to_stringdtype_kwargs", lambda p, m: [integer(1)]
    ),
    "STACK_GLOBAL from memo (dotted)": _stack_global_from_memo,
    "STACK_GLOBAL from memo (os.system)": _stack_global_os_system_from_memo,
    "os.system": _call_global("os", "system", _shell),
    "posix.system": _call_global("posix", "system", _shell),
    "nt.system": _call_global("nt", "system", _shell),
    "subprocess.Popen": _call_global(
        "subprocess", "Popen", lambda p, m: [lst(text("touch", p), text(m, p))]
    ),
    "builtins.eval": _call_global("builtins", "eval", lambda p, m: [text(_py(m), p)]),
    "__builtin__.eval (python 2 name)": _call_global(
        "__builtin__", "eval", lambda p, m: [text(_py(m), p)]
    ),
    "builtins.exec": _call_global("builtins", "exec", lambda p, m: [text(_py(m), p)]),
    "builtins.getattr reducer": _builtins_getattr,
    "getattr on an allowed class": _getattr_on_allowed,
    "copyreg._reconstructor": _copyreg_reconstructor,
    "copy_reg._reconstructor on an allowed class": _copyreg_reconstructor_allowed_class,
    "functools.partial": _functools_partial,
    "numpy.load": _call_global("numpy", "load", lambda p, m: [text(m, p)]),
    "torch._utils._rebuild_tensor_v2": _call_global(
        "torch._utils", "_rebuild_tensor_v2", lambda p, m: [pickle.NONE] * 4
    ),
    "torch._utils._rebuild_parameter": _call_global(
        "torch._utils", "_rebuild_parameter", lambda p, m: [pickle.NONE] * 3
    ),
    "torch._tensor._rebuild_from_type_v2": _call_global(
        "torch._tensor",
        "_rebuild_from_type_v2",
        lambda p, m: [glob("os", "system", p), pickle.NONE, tup(text(_sh(m), p)), pickle.NONE],
    ),
    "BUILD __setstate__ on OrderedDict": _build_on_ordereddict,
    "BUILD attributes on OrderedDict": _build_on_ordereddict_plain_state,
    "BUILD slotstate __class__ on OrderedDict": _build_slotstate_on_ordereddict,
    "BUILD dict on ndarray": _build_dict_on_ndarray,
    "BUILD __setstate__ dict on a built ndarray": _build_twice_on_ndarray_with_setstate,
    "BUILD on a numpy DType class": _build_on_dtype_class,
    "dtype state claims object pointers": _dtype_claims_objects,
    "object dtype state claims plain data": _object_dtype_claims_plain,
    "scalar with a lying dtype": _scalar_with_lying_dtype,
    "scalar with object dtype": _scalar_with_object_dtype,
    "flexible dtype state grows its items": _flexible_dtype_grows,
    "structured dtype state with object field": _structured_dtype_state,
    "datetime dtype state without its unit": _datetime_dtype_state_without_unit,
    "object array from a short list": _object_array_short_list,
    "array size overflows": _array_size_overflows,
    "REDUCE on numpy.ndarray": _reduce_on_ndarray,
    "NEWOBJ on numpy.ndarray": _newobj_ndarray,
    "_reconstruct with other arguments": _reconstruct_other_args,
    "SETITEM on an ndarray": _setitem_on_ndarray,
    "INST opcode": _inst_opcode,
    "OBJ opcode": _obj_opcode,
    "PERSID": _persistent_id,
    "BINPERSID": _binary_persistent_id,
    "_codecs.encode with another codec": _codecs_other_codec,
    "bytes(huge)": _bytes_with_size,
}


def _write(tmp_path, name: str, data: bytes) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _assert_refused(path: str, marker) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert "refused to load" in message and path in message, message
    assert "\n" not in message
    assert not os.path.exists(marker)
    return message


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_malicious_pkl_is_refused_and_runs_nothing(tmp_path, name, proto):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, "evil.pkl", stream(proto, PAYLOADS[name](proto, str(marker))))
    _assert_refused(path, marker)


@pytest.mark.parametrize(
    "name, protos",
    [
        ("dotted numpy dtypes.__builtins__.get", [4, 5]),
        ("dotted numpy dtypes.__builtins__.__getitem__", [4, 5]),
        ("STACK_GLOBAL from memo (dotted)", [4, 5]),
        ("STACK_GLOBAL from memo (os.system)", PROTOCOLS),
        ("os.system", PROTOCOLS),
        ("functools.partial", PROTOCOLS),
        ("builtins.getattr reducer", PROTOCOLS),
        ("builtins.eval", PROTOCOLS),
    ],
)
def test_the_payloads_do_run_code_under_plain_pickle(tmp_path, name, protos):
    """The payloads are live: Python's own unpickler runs them (so the refusals above matter)."""
    for proto in protos:
        marker = tmp_path / f"ran-{proto}"
        pickle.loads(stream(proto, PAYLOADS[name](proto, str(marker))))
        assert marker.exists(), (name, proto)


def test_the_dotted_name_hole_of_the_old_allow_rule_is_closed(tmp_path):
    """The old rule let ``numpy`` + any name starting with ``dtypes`` through to
    ``pickle.Unpickler.find_class``, which walks the dots (protocol >= 4) to ``eval``."""
    marker = tmp_path / "pwned"
    data = stream(4, PAYLOADS["dotted numpy dtypes.__builtins__.get"](4, str(marker)))
    message = _assert_refused(_write(tmp_path, "model_final.pkl", data), marker)
    assert "import 'numpy.dtypes.__builtins__.get'" in message


def test_extension_codes_are_refused_even_when_cached(tmp_path):
    """EXT1/2/4 resolve through copyreg's global registry and cache, not find_class: a code
    registered (and cached by an earlier load elsewhere in the process) must not reach os.system."""
    marker = tmp_path / "pwned"
    code = 0x7A
    copyreg.add_extension("os", "system", code)
    try:
        assert pickle.loads(pickle.PROTO + b"\x02" + pickle.EXT1 + bytes([code]) + pickle.STOP)
        payload = pickle.EXT1 + bytes([code]) + tup(text(_sh(str(marker)), 2)) + pickle.REDUCE
        _assert_refused(_write(tmp_path, "ext.pkl", stream(2, payload)), marker)
    finally:
        copyreg.remove_extension("os", "system", code)


def test_out_of_band_buffers_are_refused(tmp_path):
    data = pickle.dumps({"w": np.arange(4.0)}, protocol=5, buffer_callback=lambda b: False)
    with pytest.raises(CheckpointError, match="refused to load.*out-of-band"):
        load_checkpoint_file(_write(tmp_path, "oob.pkl", data))


def test_lying_dtype_payloads_cannot_crash_the_interpreter(tmp_path):
    """In a child process (a regression would segfault, not fail): each numpy-state payload is
    refused, and touching whatever got built does not crash."""
    names = [n for n in PAYLOADS if any(w in n for w in ("dtype", "scalar", "array", "ndarray"))]
    paths = []
    for name in names:
        for proto in (2, 5):
            data = stream(proto, PAYLOADS[name](proto, str(tmp_path / "pwned")))
            paths.append(_write(tmp_path, f"{len(paths)}.pkl", data))
    script = (
        "import sys\n"
        "from convmae_det.checkpoint.io import CheckpointError, load_checkpoint_file\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        obj = load_checkpoint_file(path)\n"
        "    except CheckpointError as exc:\n"
        "        print('REFUSED' if 'refused to load' in str(exc) else 'UNREADABLE', flush=True)\n"
        "    else:\n"
        "        print('LOADED', repr(obj), flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *paths],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["REFUSED"] * len(paths), proc.stdout


def test_convert_tool_refuses_a_malicious_pkl_with_one_line(tmp_path):
    marker = tmp_path / "pwned"
    src = _write(tmp_path, "evil.pkl", stream(4, _stack_global_from_memo(4, str(marker))))
    dst = str(tmp_path / "out.pth")
    proc = subprocess.run(
        [sys.executable, CONVERT_TOOL, src, dst],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "refused to load" in lines[0]
    assert not marker.exists() and not os.path.exists(dst)


# ------------------------------------------------------------------------------------------------
# What must keep loading: real numpy / detectron2 pickles
# ------------------------------------------------------------------------------------------------


def _real_arrays() -> Dict[str, Any]:
    return {
        "f4": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f8 big-endian": np.array([1.5, -2.0], dtype=">f8"),
        "i8": np.arange(3),
        "u1": np.array([1, 255], np.uint8),
        "bool": np.array([True, False]),
        "f2": np.ones(2, np.float16),
        "c8": np.array([1 + 2j], np.complex64),
        "U3": np.array(["ab", "xyz"]),
        "S5": np.array([b"ab"], "S5"),
        "datetime": np.array(["2020-01-01"], "M8[D]"),
        "0-d": np.array(3.0),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "axes permuted": np.arange(24.0).reshape(2, 3, 4).transpose(1, 0, 2),
        "strided": np.arange(24.0).reshape(2, 3, 4)[:, ::2],
        "empty": np.zeros((0, 3), np.float32),
        "void": np.zeros(2, "V8"),
        "object": np.array([1, "a", None], dtype=object),
    }


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_real_numpy_pickles_load_like_pickle_does(tmp_path, proto):
    ckpt = {
        "model": collections.OrderedDict(_real_arrays()),
        "__author__": "Detectron",
        "matching_heuristics": True,
        "scalars": [np.float32(1.5), np.int64(3), np.bool_(True)],
        "dtype": np.dtype("f4"),
        "dtype class": np.dtypes.Float32DType,
        "misc": (1, 2.0, None, b"raw", b"", "text", {1, 2}, frozenset({3})),
    }
    data = pickle.dumps(ckpt, protocol=proto)
    out = load_checkpoint_file(_write(tmp_path, "model_final.pkl", data))
    ref = pickle.loads(data, encoding="latin1")
    assert type(out["model"]) is collections.OrderedDict
    for key, want in ref["model"].items():
        got = out["model"][key]
        assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
        assert got.tolist() == want.tolist(), key
    assert out["scalars"] == ref["scalars"] and out["dtype"] == np.dtype("f4")
    assert out["dtype class"] is np.dtypes.Float32DType
    assert out["misc"] == ref["misc"] and out["__author__"] == "Detectron"
    assert out["matching_heuristics"] is True


@pytest.mark.parametrize("proto", [0, 2])
def test_python2_detectron_style_pkl_loads(tmp_path, proto):
    """Detectron / detectron2 model-zoo files written by Python 2: ``numpy.core.multiarray``,
    py2 ``str`` data read as latin-1, an OrderedDict rebuilt from a list of pairs."""
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = array_of(proto, dtype_of("f4", proto), (2, 3), weights.tobytes())
    pairs = lst(lst(py2str(b"conv1_w", proto), array))
    blobs = call(glob("collections", "OrderedDict", proto), pairs)
    header = pickle.PROTO + bytes([proto]) if proto >= 2 else b""
    body = pickle.MARK + py2str(b"blobs", proto) + blobs
    body += py2str(b"__author__", proto) + py2str(b"Detectron", proto) + pickle.DICT
    out = load_checkpoint_file(_write(tmp_path, "R-50.pkl", header + body + pickle.STOP))
    assert out["__author__"] == "Detectron"
    np.testing.assert_array_equal(out["blobs"]["conv1_w"], weights)


def test_refusal_names_the_conversion_command_that_works(tmp_path):
    """The message's advice (convert once with --unsafe-load, then use the result) works."""
    from convmae_det.modeling import ConvViT
    from tests.conftest import tiny_convvit_kwargs

    state = {k: v.numpy() for k, v in ConvViT(**tiny_convvit_kwargs()).state_dict().items()}
    src = str(tmp_path / "legacy.pkl")
    with open(src, "wb") as f:  # trusted, but holds a global outside the allow-list
        pickle.dump({"model": state, "meta": fractions.Fraction(1, 3)}, f)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(src)
    message = str(info.value)
    assert "import 'fractions.Fraction'" in message
    command = f"python tools/convert_checkpoint.py {src} legacy-converted.pth --unsafe-load"
    assert command in message and "use legacy-converted.pth" in message
    proc = subprocess.run(
        [sys.executable, CONVERT_TOOL, src, "legacy-converted.pth", "--unsafe-load"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    converted = load_checkpoint_file(str(tmp_path / "legacy-converted.pth"))
    assert torch.equal(converted["model"]["pos_embed"], torch.from_numpy(state["pos_embed"]))


# ------------------------------------------------------------------------------------------------
# Property: random opcode streams over allowed and forbidden globals
# ------------------------------------------------------------------------------------------------

ALLOWED_PAIRS = [
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "frozenset"),
] + [
    ("numpy.dtypes", name)
    for name in dir(np.dtypes)
    if isinstance(getattr(np.dtypes, name), type) and issubclass(getattr(np.dtypes, name), np.dtype)
]
FORBIDDEN_PAIRS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("subprocess", "Popen"),
    ("copyreg", "_reconstructor"),
    ("functools", "partial"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("numpy", "load"),
    ("numpy", "dtypes"),
    ("numpy.dtypes", "_convert_to_stringdtype_kwargs"),
    ("sys", "modules"),
    ("numpy", "core"),
]
_ATTRS = ["dtypes", "__builtins__", "get", "__globals__", "__class__", "__base__", "sys"]
_ATTRS += ["modules", "_core", "multiarray", "os", "system", "eval", "Float32DType", "__init__"]
DOTTED = st.tuples(
    st.sampled_from(["numpy", "numpy.dtypes", "collections", "numpy._core.numeric", "builtins"]),
    st.lists(st.sampled_from(_ATTRS), min_size=2, max_size=4).map(".".join),
)
STRINGS = ["b", "latin1", "f4", "f8", "O", "V8", "S4", "U2", "<", ">", "|", "C", "F", "K"]
STRINGS += ["numpy", "dtypes.__builtins__.get", "eval", "os", "system", "__setstate__", "x"]
_RAW_OPS = [
    pickle.MARK,
    pickle.TUPLE,
    pickle.TUPLE1,
    pickle.TUPLE2,
    pickle.TUPLE3,
    pickle.EMPTY_TUPLE,
    pickle.EMPTY_DICT,
    pickle.EMPTY_LIST,
    pickle.EMPTY_SET,
    pickle.DICT,
    pickle.LIST,
    pickle.SETITEM,
    pickle.SETITEMS,
    pickle.APPEND,
    pickle.APPENDS,
    pickle.ADDITEMS,
    pickle.FROZENSET,
    pickle.REDUCE,
    pickle.BUILD,
    pickle.NEWOBJ,
    pickle.NEWOBJ_EX,
    pickle.OBJ,
    pickle.STACK_GLOBAL,
    pickle.MEMOIZE,
    pickle.POP,
    pickle.POP_MARK,
    pickle.DUP,
    pickle.NONE,
    pickle.NEWTRUE,
    pickle.NEWFALSE,
    pickle.BINPERSID,
    pickle.EXT1 + b"\x01",
    pickle.NEXT_BUFFER,
]


def _fragments() -> List[bytes]:
    """Pieces of real pickles (protocol 2, PROTO and STOP cut off) to splice into random
    streams, so that random streams also reach numpy's BUILD paths."""
    values = [
        np.arange(3, dtype=np.float32),
        np.array([[1, 2]], dtype=">i2"),
        np.array(["ab"]),
        np.array([1, None], dtype=object),
        np.float64(2.5),
        np.dtype("M8[s]"),
        collections.OrderedDict(a=np.zeros(2)),
    ]
    out = []
    for value in values:
        data = pickletools.optimize(pickle.dumps(value, protocol=2))
        ops = list(pickletools.genops(data))
        ends = [pos for _, _, pos in ops[1:]] + [len(data)]
        out.append(
            b"".join(
                data[pos:end]
                for (op, _, pos), end in zip(ops, ends)
                if op.name not in ("PROTO", "STOP")
            )
        )
    return out


FRAGMENTS = _fragments()


def _op_bytes_for(op: Tuple[str, Any], proto: int) -> bytes:
    kind, value = op
    if kind == "global":
        return glob(value[0], value[1], proto)
    if kind == "int":
        return integer(value)
    if kind == "str":
        return text(value, proto)
    if kind == "bytes":
        return pickle.SHORT_BINBYTES + bytes([len(value)]) + value
    if kind == "get":
        return get(value, proto)
    if kind == "array":  # an array BUILD with a random dtype state, shape and data
        spec, flags, endian, shape, size, as_list = value
        data = lst(*[pickle.NONE] * size) if as_list else py2str(b"A" * size, proto)
        dtype = dtype_of(spec, proto, flags=flags, endian=endian)
        state = tup(integer(1), tup(*(integer(n) for n in shape)), dtype, pickle.NEWFALSE, data)
        return empty_array(proto) + state + pickle.BUILD
    if kind == "fragment":
        index, flip = value
        data = bytearray(FRAGMENTS[index % len(FRAGMENTS)])
        if flip is not None:
            data[flip[0] % len(data)] = flip[1]
        return bytes(data)
    return value  # raw opcode


OPS = st.one_of(
    st.tuples(
        st.just("global"),
        st.one_of(st.sampled_from(ALLOWED_PAIRS), st.sampled_from(FORBIDDEN_PAIRS), DOTTED),
    ),
    st.tuples(st.just("int"), st.integers(-(2**40), 2**40)),
    st.tuples(st.just("str"), st.sampled_from(STRINGS)),
    st.tuples(st.just("bytes"), st.binary(max_size=24)),
    st.tuples(st.just("get"), st.integers(0, 4)),
    st.tuples(
        st.just("fragment"),
        st.tuples(
            st.integers(0, 100),
            st.one_of(st.none(), st.tuples(st.integers(0, 10**4), st.integers(0, 255))),
        ),
    ),
    st.tuples(st.just("raw"), st.sampled_from(_RAW_OPS)),
    st.tuples(
        st.just("array"),
        st.tuples(
            st.sampled_from(["f8", "O8", "S4", "U2", "V8", "b1", "M8"]),
            st.sampled_from([0, 1, 8, 63]),
            st.sampled_from(["<", ">", "|"]),
            st.lists(st.sampled_from([0, 1, 2, 3, 2**61]), max_size=3),
            st.integers(0, 24),
            st.booleans(),
        ),
    ),
)

_ALLOWED_OBJECT_IDS = {id(v) for v in safe_pickle._PKL_GLOBALS.values()}


def _allowed_result(obj: Any, seen: set) -> None:
    """Everything reachable is a plain value, a container, a sane numpy value, or one of the
    allow-listed globals themselves."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    kind = type(obj)
    if kind in (str, bytes, bytearray, int, float, bool, type(None)):
        return
    if isinstance(obj, (np.generic, np.dtype)) and kind.__module__.startswith("numpy"):
        return
    if kind in (list, tuple, set, frozenset):
        for item in obj:
            _allowed_result(item, seen)
        return
    if kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _allowed_result(key, seen)
            _allowed_result(value, seen)
        return
    if kind is np.ndarray:
        if obj.dtype.hasobject:
            for item in obj.ravel(order="K").tolist():
                _allowed_result(item, seen)
        else:
            assert obj.dtype.flags == np.dtype(obj.dtype.str).flags, obj.dtype
            obj.tobytes()  # touches every byte
        return
    assert id(obj) in _ALLOWED_OBJECT_IDS, f"unexpected {kind!r} in the result"


@contextmanager
def _recording_lookups() -> Iterator[List[Tuple[Any, Any, Any]]]:
    """Record every name look-up of the .pkl reader and every import during the load."""
    lookups: List[Tuple[Any, Any, Any]] = []
    original_find_class = safe_pickle._ArrayOnlyUnpickler.find_class
    original_import = builtins.__import__
    original_import_module = importlib.import_module

    def find_class(self, module, name):
        try:
            obj = original_find_class(self, module, name)
        except BaseException as exc:
            lookups.append((module, name, exc))
            raise
        lookups.append((module, name, obj))
        return obj

    def recording_import(name, *args, **kwargs):
        lookups.append(("import", name, None))
        return original_import(name, *args, **kwargs)

    def recording_import_module(name, *args, **kwargs):
        lookups.append(("import_module", name, None))
        return original_import_module(name, *args, **kwargs)

    with (
        mock.patch.object(safe_pickle._ArrayOnlyUnpickler, "find_class", find_class),
        mock.patch("builtins.__import__", recording_import),
        mock.patch("importlib.import_module", recording_import_module),
    ):
        yield lookups


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(proto=st.sampled_from(PROTOCOLS), ops=st.lists(OPS, max_size=40))
def test_random_opcode_streams_import_nothing_and_fail_only_with_checkpoint_error(
    tmp_path_factory, proto, ops
):
    header = pickle.PROTO + bytes([proto]) if proto >= 2 else b""
    data = header + b"".join(_op_bytes_for(op, proto) for op in ops) + pickle.STOP
    path = str(tmp_path_factory.mktemp("fuzz") / "random.pkl")
    with open(path, "wb") as f:
        f.write(data)
    modules_before = set(sys.modules)
    with _recording_lookups() as lookups:
        try:
            result = ckpt_io._load_pkl(path, allow_unsafe=False)
        except CheckpointError:
            result = None
    assert set(sys.modules) <= modules_before
    allowed = set(ALLOWED_PAIRS)
    for module, name, obj in lookups:
        if module in ("import", "import_module"):
            assert name.startswith("numpy"), f"imported {name!r}"
        elif not isinstance(obj, BaseException):
            assert (module, name) in allowed and id(obj) in _ALLOWED_OBJECT_IDS, (module, name)
    _allowed_result(result, set())
    with pytest.raises(CheckpointError) if not isinstance(result, dict) else _no_error():
        load_checkpoint_file(path)


@contextmanager
def _no_error() -> Iterator[None]:
    yield


# ------------------------------------------------------------------------------------------------
# torch.load(weights_only=True) and the project's allow-list (argparse.Namespace)
# ------------------------------------------------------------------------------------------------


def torch_file(path: str, data_pkl: bytes) -> str:
    """A torch.save()-format zip whose pickle is ``data_pkl`` (no tensor storages)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def _namespace() -> bytes:
    """``argparse.Namespace`` as torch.save writes it: ``cls.__new__(cls)`` (NEWOBJ)."""
    return glob("argparse", "Namespace", 2) + pickle.EMPTY_TUPLE + pickle.NEWOBJ


def tint(value: int) -> bytes:
    """An int in an opcode torch's weights-only unpickler reads."""
    return pickle.BININT + struct.pack("<i", value)


def tdict(*pairs: Tuple[bytes, bytes]) -> bytes:
    """A dict the way torch's weights-only unpickler reads it (EMPTY_DICT + SETITEMS)."""
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(k + v for k, v in pairs) + pickle.SETITEMS


def named(**items: bytes) -> bytes:
    return tdict(*((text(k, 2), v) for k, v in items.items()))


def torch_stream(args: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + named(model=pickle.EMPTY_DICT, args=args) + pickle.STOP


NAMESPACE_ABUSES = {
    # a key in __dict__ that torch's BUILD then calls as the object's __setstate__
    "__setstate__ smuggled, then a second BUILD": _namespace()
    + named(__setstate__=glob("builtins", "set", 2))
    + pickle.BUILD
    + named(x=tint(7))
    + pickle.BUILD,
    # (state, slotstate): setattr(ns, "__class__", TypedStorage) -> a fake storage object
    "slotstate __class__ -> TypedStorage": _namespace()
    + tup(pickle.NONE, named(__class__=glob("torch.storage", "TypedStorage", 2)))
    + pickle.BUILD,
    "slotstate with plain names": _namespace() + tup(pickle.NONE, named(lr=tint(1))) + pickle.BUILD,
    "__dict__ replaced": _namespace() + named(__dict__=named(a=tint(1))) + pickle.BUILD,
    "__class__ in the state dict": _namespace()
    + named(__class__=glob("collections", "OrderedDict", 2))
    + pickle.BUILD,
    "__reduce_ex__ in the state dict": _namespace()
    + named(__reduce_ex__=glob("torch._utils", "_rebuild_tensor_v2", 2))
    + pickle.BUILD,
    "non-str key": _namespace() + tdict((tint(1), tint(2))) + pickle.BUILD,
    "Namespace under another module's name": call(glob("convmae_det.compat", "SafeNamespace", 2)),
    "argparse._AttributeHolder": call(glob("argparse", "_AttributeHolder", 2)),
}


def test_a_hand_written_namespace_state_loads(tmp_path):
    """The encoding used below is right: a plain state loads."""
    data = torch_stream(_namespace() + named(lr=tint(3)) + pickle.BUILD)
    path = torch_file(str(tmp_path / "ok.pth"), data)
    assert load_checkpoint_file(path)["args"].lr == 3


@pytest.mark.parametrize("name", sorted(NAMESPACE_ABUSES))
def test_namespace_abuse_in_a_torch_file_is_refused(tmp_path, name):
    path = torch_file(str(tmp_path / "ckpt.pth"), torch_stream(NAMESPACE_ABUSES[name]))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused to load: unpickling it would ")
    assert "\n" not in message
    with pytest.raises(pickle.UnpicklingError):  # plain torch.load(weights_only=True) refuses too
        torch.load(path, weights_only=True)


def test_namespace_called_with_positional_arguments_is_unreadable(tmp_path):
    args = call(glob("argparse", "Namespace", 2), text("x", 2))
    path = torch_file(str(tmp_path / "ckpt.pth"), torch_stream(args))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint_file(path)


def test_namespace_abuses_were_accepted_by_allow_listing_the_plain_class(tmp_path):
    """Why the plain class is not allow-listed: torch's unpickler accepts these with it."""
    results = {}
    smuggled = "__setstate__ smuggled, then a second BUILD"
    retyped = "slotstate __class__ -> TypedStorage"
    for name in (smuggled, retyped):
        path = torch_file(str(tmp_path / "ns.pth"), torch_stream(NAMESPACE_ABUSES[name]))
        with mock.patch.object(torch._weights_only_unpickler, "_marked_safe_globals_set", set()):
            with torch.serialization.safe_globals([argparse.Namespace]):
                results[name] = torch.load(path, weights_only=True)
    assert "__setstate__" in vars(results[smuggled]["args"])
    assert type(results[retyped]["args"]) is torch.storage.TypedStorage


def test_official_args_namespace_still_loads_and_resaves_as_argparse(tmp_path):
    args = argparse.Namespace(lr=1.5e-4, model="convmae_base", inner=argparse.Namespace(x=[1, 2]))
    path = str(tmp_path / "checkpoint-1599.pth")
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1599, "args": args}, path)
    loaded = load_checkpoint_file(path)["args"]
    assert isinstance(loaded, argparse.Namespace) and loaded.lr == 1.5e-4
    assert loaded.inner.x == [1, 2] and vars(loaded).keys() == vars(args).keys()
    again = str(tmp_path / "again.pth")
    torch.save({"args": loaded}, again)
    with zipfile.ZipFile(again) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"convmae_det" not in pkl and b"argparse" in pkl
    assert type(pickle.loads(pickle.dumps(loaded))) is argparse.Namespace
    assert load_checkpoint_file(again)["args"].model == "convmae_base"


def test_the_project_allow_list_is_exactly_the_safe_namespace():
    assert compat.SAFE_GLOBALS == [(compat.SafeNamespace, "argparse.Namespace")]
    safe = torch.serialization.get_safe_globals()
    assert argparse.Namespace not in safe
    assert (compat.SafeNamespace, "argparse.Namespace") in safe


# ------------------------------------------------------------------------------------------------
# MoR teacher files go through the same reader
# ------------------------------------------------------------------------------------------------


def test_mor_teacher_file_that_would_run_code_is_refused(tmp_path):
    from convmae_det.modeling.mor import load_teacher_state_dict

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = str(tmp_path / "teacher.pth")
    torch.save({"model": {"w": torch.ones(2)}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="teacher.pth: refused to load"):
        load_teacher_state_dict(path)
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_teacher_state_dict(path)["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------------
# Disk full during a save
# ------------------------------------------------------------------------------------------------


def _failing_save(exc: BaseException) -> Callable:
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise exc

    return save


def _assert_write_failed(exc_info, path: str, folder, code: int, intact: str) -> None:
    exc = exc_info.value
    assert isinstance(exc, OSError) and isinstance(exc, CheckpointWriteError)
    assert exc.errno == code
    reason = "no space left on device" if code == errno.ENOSPC else os.strerror(code).lower()
    assert str(exc) == f"{reason} while writing {path}; {intact}"
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp")]


def test_disk_full_during_save_names_the_intact_previous_checkpoint(tmp_path, monkeypatch):
    previous = str(tmp_path / "model_0000009.pth")
    save_checkpoint_atomic({"w": torch.ones(2)}, previous)
    write_text_atomic("model_0000009.pth", str(tmp_path / "last_checkpoint"))
    path = str(tmp_path / "model_0000019.pth")
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as info:
        save_checkpoint_atomic({"w": torch.zeros(2)}, path)
    _assert_write_failed(
        info, path, tmp_path, errno.ENOSPC, f"the previous checkpoint {previous} is intact"
    )
    assert not os.path.exists(path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(previous)["w"], torch.ones(2))


def test_disk_full_inside_torch_zip_writer(tmp_path, monkeypatch):
    """The real torch.save, with the file's write failing: torch raises a RuntimeError from
    inline_container.cc whose context is the OSError; the errno is found there."""
    path = str(tmp_path / "model_final.pth")
    save_checkpoint_atomic({"w": torch.ones(2)}, path)
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)
            self.written = 0

        def writable(self):
            return True

        def write(self, data):
            if self.written + len(data) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(fd, mode))
    with pytest.raises(OSError) as info:
        save_checkpoint_atomic({"w": torch.zeros(10000)}, path)
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_write_failed(info, path, tmp_path, errno.ENOSPC, f"the previous file {path} is intact")
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["w"], torch.ones(2))


@pytest.mark.parametrize("free, code", [(0, errno.ENOSPC), (10**12, errno.EIO)])
def test_torch_stream_writer_failure_without_errno(tmp_path, monkeypatch, free, code):
    message = (
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
        "data/0: file write failed"
    )
    monkeypatch.setattr(torch, "save", _failing_save(RuntimeError(message)))
    monkeypatch.setattr(ckpt_io, "_free_bytes", lambda folder: free)
    path = str(tmp_path / "sub" / "model_0000004.pth")
    with pytest.raises(OSError) as info:
        save_checkpoint_atomic({"w": torch.zeros(2)}, path)
    _assert_write_failed(info, path, tmp_path / "sub", code, "no earlier checkpoint was touched")


def test_failing_last_checkpoint_write_and_non_io_errors(tmp_path, monkeypatch):
    previous = str(tmp_path / "model_0000009.pth")
    save_checkpoint_atomic({"w": torch.ones(2)}, previous)
    tag = str(tmp_path / "last_checkpoint")
    write_text_atomic("model_0000009.pth", tag)

    class Full(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: (os.close(fd), Full())[1])
    with pytest.raises(OSError) as info:
        write_text_atomic("model_0000019.pth", tag)
    _assert_write_failed(
        info, tag, tmp_path, errno.ENOSPC, f"the previous checkpoint {previous} is intact"
    )
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert open(tag).read() == "model_0000009.pth"
    with pytest.raises(Exception) as other:  # not an I/O failure: not disguised as one
        save_checkpoint_atomic({"f": lambda: 0}, str(tmp_path / "x.pth"))
    assert not isinstance(other.value, OSError)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]


def test_convert_tool_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from convmae_det.modeling import ConvViT
    from tests.conftest import tiny_convvit_kwargs

    src = str(tmp_path / "encoder.pth")
    torch.save({"model": ConvViT(**tiny_convvit_kwargs()).state_dict()}, src)
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", CONVERT_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left")))
    dst = str(tmp_path / "out.pth")
    assert tool.main([src, dst]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: no space left on device while writing {dst}; no earlier checkpoint was touched"
    ]
    assert sorted(os.listdir(tmp_path)) == ["encoder.pth"]
