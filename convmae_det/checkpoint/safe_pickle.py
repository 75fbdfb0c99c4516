"""The restricted unpickler for detectron2 / Detectron1 ``.pkl`` checkpoints: numpy arrays,
scalars and dtypes, dicts, lists, tuples, sets, strings and numbers, and nothing else.

Its only way to a Python object by name is an exact table of ``(module, name)`` pairs built from
the objects themselves when this module is imported (:data:`_PKL_GLOBALS`): no name with a dot,
nothing imported, no attribute looked up from a string in the file. The operations that call or
mutate objects (``REDUCE``, ``BUILD``, item assignment) are checked too, so the allowed numpy
callables cannot be turned against the process: a pickled dtype state may claim that float data
holds object pointers, and numpy's own ``__setstate__`` believes it (or crashes on some states),
so dtypes are rebuilt with numpy's constructor instead, and arrays get data of exactly their size.
Everything refused raises :class:`_Refused` naming what the file would have done;
:func:`convmae_det.checkpoint.io.load_checkpoint_file` turns it into a ``CheckpointError``.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from typing import IO, Any, Callable, Dict

import numpy as np

__all__ = ["load_restricted_pickle"]

# ----------------------------------------------------------------------------------------------
# Restricted unpickling of detectron2 .pkl files
# ----------------------------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """The restricted unpickler met something it must not rebuild; ``what`` completes the
    sentence "unpickling it would ..."."""

    def __init__(self, what: str):
        super().__init__(f"refused: {what}")
        self.what = what


def _shown(text: Any, limit: int = 80) -> str:
    """A file-controlled string made safe for a one-line message (escaped, shortened)."""
    text = text if isinstance(text, str) else repr(text)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The functions numpy's own pickles call, taken from the objects (not imported by name).
_NP_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy(._core).multiarray._reconstruct
_NP_SCALAR = np.float32(0).__reduce__()[0]  # numpy(._core).multiarray.scalar
_STRING_DTYPE = getattr(np.dtypes, "StringDType", None)  # numpy >= 2: not a legacy dtype


def _check_dtype(dtype: Any, what: str) -> None:
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"call {what} with a {_shown(type(dtype).__name__)} as dtype")
    if dtype.hasobject:
        raise _Refused(f"call {what} with an object dtype")


def _reconstruct_array(subtype: Any, shape: Any, dummy: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` as numpy's pickles call it (an empty array whose
    contents come from the following ``BUILD``), and only so."""
    if (
        subtype is not np.ndarray
        or type(shape) is not tuple
        or len(shape) != 1
        or type(shape[0]) is not int
        or shape[0] != 0
        or type(dummy) not in (bytes, str)
        or dummy not in (b"b", "b")
    ):
        raise _Refused("call numpy's _reconstruct with other arguments than numpy's pickles use")
    return _NP_RECONSTRUCT(np.ndarray, (0,), dummy)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar(dtype, raw bytes)`` for non-object dtypes."""
    _check_dtype(dtype, "numpy's scalar")
    if type(data) not in (bytes, str):  # str: Python 2 pickles read with encoding latin1
        raise _Refused("call numpy's scalar without raw bytes")
    return _NP_SCALAR(dtype, data)


def _array_from_buffer(
    buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
) -> np.ndarray:
    """``numpy.core.numeric._frombuffer`` (pickle protocol 5, in-band buffers only)."""
    _check_dtype(dtype, "numpy's _frombuffer")
    if type(buf) not in (bytes, bytearray):
        raise _Refused("call numpy's _frombuffer without an in-band byte buffer")
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise _Refused("call numpy's _frombuffer with a malformed shape")
    if type(order) is not str:
        raise _Refused("call numpy's _frombuffer with a malformed memory order")
    array = np.frombuffer(buf, dtype=dtype)
    if order == "K" and axis_order is not None:
        if type(axis_order) is not tuple or not all(type(i) is int for i in axis_order):
            raise _Refused("call numpy's _frombuffer with a malformed axis order")
        if sorted(axis_order) != list(range(len(shape))):
            raise _Refused("call numpy's _frombuffer with a malformed axis order")
        return array.reshape(shape, order="C").transpose(axis_order)
    if order not in ("C", "F") or axis_order is not None:
        raise _Refused("call numpy's _frombuffer with a malformed memory order")
    return array.reshape(shape, order=order)


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it for ``bytes`` (latin-1 text -> bytes)."""
    if type(text) is not str or type(encoding) is not str or encoding not in ("latin1", "latin-1"):
        raise _Refused("call _codecs.encode other than for latin-1 bytes")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how pickle protocols 0-2 write an empty ``bytes``."""
    if args:
        raise _Refused("call bytes() with arguments")
    return b""


# The exact (module, qualified name) pairs a .pkl may name, and what each gives. Nothing else is
# ever looked up; the numpy DType classes are the real members of ``numpy.dtypes``.
_PKL_GLOBALS: Dict[tuple, Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "set"): set,  # protocols 0-3 write sets as set(list)
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
}
_PKL_GLOBALS.update(
    {
        ("numpy.dtypes", name): cls
        for name, cls in vars(np.dtypes).items()
        if isinstance(cls, type) and issubclass(cls, np.dtype) and cls is not np.dtype
    }
)

# What REDUCE may call (np.ndarray is only an argument of _reconstruct: calling it would make
# arrays over arbitrary buffers).
_PKL_CALLABLE_IDS = frozenset(id(obj) for obj in _PKL_GLOBALS.values() if obj is not np.ndarray)


# NPY_ITEM_REFCOUNT | NPY_LIST_PICKLE | NPY_ITEM_IS_POINTER: "the items are PyObject pointers"
_OBJECT_FLAGS = 0x01 | 0x02 | 0x04
_DATETIME_UNITS = {"Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as"}


def _datetime_unit(kind: str, info: Any) -> str:
    """``M8[3ms]``-style spec from a datetime state's ``(meta, (unit, count, den, events))``."""
    if type(info) is not tuple or len(info) != 2 or type(info[1]) is not tuple:
        raise _Refused("set a numpy datetime dtype from a malformed state")
    if len(info[1]) != 4 or not all(type(n) is int for n in info[1][1:]):
        raise _Refused("set a numpy datetime dtype from a malformed state")
    unit, count = info[1][0], info[1][1]
    unit = unit.decode("latin1") if type(unit) is bytes else unit
    if unit == "generic":
        return f"{kind}8"
    if unit not in _DATETIME_UNITS or not 1 <= count < 2**31:
        raise _Refused("set a numpy datetime dtype with an invalid unit")
    return f"{kind}8[{count}{unit}]"


def _built_dtype(dtype: np.dtype, state: Any) -> np.dtype:
    """The dtype numpy's ``BUILD`` of ``dtype`` with ``state`` would give, made without calling
    ``numpy.dtype.__setstate__``: that trusts the pickled state (flags that make float data
    "object pointers", item sizes larger than the data) and crashes on some states (a datetime
    state without its unit). Only plain (non-structured) dtypes are accepted; the result comes
    from numpy's constructor and ``newbyteorder``, so its flags are numpy's."""
    if type(dtype) not in _LEGACY_DTYPE_CLASSES:
        raise _Refused(f"set the state of a {_shown(type(dtype).__name__)}")
    if type(state) is not tuple or len(state) not in (8, 9):
        raise _Refused("set a numpy dtype from an unsupported state")
    _version, endian, subarray, names, fields, elsize, _alignment, flags = state[:8]
    if subarray is not None or names is not None or fields is not None:
        raise _Refused("build a structured or sub-array numpy dtype")
    if type(flags) is not int or (flags ^ dtype.flags) & _OBJECT_FLAGS:
        raise _Refused("give a numpy dtype pickled flags that disagree on holding Python objects")
    if type(elsize) is not int or elsize not in (-1, dtype.itemsize):
        raise _Refused("change the item size of a numpy dtype through its pickled state")
    if type(endian) is not str or endian not in ("<", ">", "=", "|"):
        raise _Refused("set an invalid byte order on a numpy dtype")
    if (endian == "|") != (dtype.byteorder == "|"):
        raise _Refused("set an invalid byte order on a numpy dtype")
    built = dtype
    if dtype.kind in "Mm":
        built = np.dtype(_datetime_unit(dtype.kind, state[8] if len(state) == 9 else None))
    elif len(state) == 9 and state[8] is not None and type(state[8]) is not dict:
        raise _Refused("set numpy dtype metadata that is not a dict")  # (the metadata is dropped)
    if endian in "<>=" and built.byteorder != "|":
        built = built.newbyteorder(endian)
    return built


# the dtype classes numpy's pickles BUILD (not numpy 2's StringDType)
_LEGACY_DTYPE_CLASSES = frozenset(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUVOMm")


class _Memo(dict):
    """The unpickler's memo, knowing where each dtype is kept (so that a rebuilt dtype replaces
    it there too, like numpy's in-place ``BUILD`` would)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype_keys: Dict[int, set] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.dtype):
            self.dtype_keys.setdefault(id(value), set()).add(key)
        super().__setitem__(key, value)

    def replace(self, old: Any, new: Any) -> None:
        for key in self.dtype_keys.pop(id(old), ()):
            if self.get(key) is old:
                self[key] = new


def _refuse_opcode(what: str) -> Callable[[Any], None]:
    def load(self: Any) -> None:
        raise _Refused(what)

    return load


class _ArrayOnlyUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's own unpickler with every way to a Python object restricted: ``find_class`` (the
    only name look-up left: ``GLOBAL``, ``STACK_GLOBAL``) uses the exact table ``_PKL_GLOBALS``;
    ``REDUCE`` calls only those globals; ``BUILD`` only sets the state of arrays (checked) and
    rebuilds dtypes with numpy's constructor; item assignment only targets dicts, lists and
    sets; extension codes, ``NEWOBJ``/``OBJ``/``INST``, persistent ids and out-of-band buffers
    are refused."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: IO[bytes], *, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self.memo = _Memo()

    def find_class(self, module: str, name: str) -> Any:
        # Exact pair look-up; names with a dot would be resolved attribute by attribute by
        # pickle.Unpickler.find_class (protocol >= 4), so they never reach it (nor anything).
        if type(module) is str and type(name) is str and "." not in name:
            obj = _PKL_GLOBALS.get((module, name))
            if obj is not None:
                return obj
        raise _Refused(f"import '{_shown(module)}.{_shown(name)}'")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("resolve a persistent id (an object stored outside the pickle)")

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if id(func) not in _PKL_CALLABLE_IDS:
            raise _Refused(f"call a {_shown(type(func).__name__)} object")
        if type(args) is not tuple:
            raise pickle.UnpicklingError("REDUCE arguments are not a tuple")
        stack[-1] = func(*args)

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if type(inst) is np.ndarray:
            _check_array_state(state)
            np.ndarray.__setstate__(inst, state)
            _check_built_array(inst)
        elif isinstance(inst, np.dtype):
            built = _built_dtype(inst, state)
            if built is not inst:
                stack[-1] = built
                self.memo.replace(inst, built)
        else:
            kind = _shown(type(inst).__name__)
            raise _Refused(f"set the state (__setstate__ / BUILD) of a {kind}")

    def load_setitem(self) -> None:
        _check_target(self.stack[-3], (dict, collections.OrderedDict), "assign items of")
        super().load_setitem()

    def load_setitems(self) -> None:
        _check_target(self._mark_owner(), (dict, collections.OrderedDict), "assign items of")
        super().load_setitems()

    def load_append(self) -> None:
        _check_target(self.stack[-2], (list,), "append to")
        super().load_append()

    def load_appends(self) -> None:
        _check_target(self._mark_owner(), (list,), "append to")
        super().load_appends()

    def load_additems(self) -> None:
        _check_target(self._mark_owner(), (set,), "add items to")
        super().load_additems()

    def _mark_owner(self) -> Any:
        """The object below the topmost MARK (what SETITEMS / APPENDS / ADDITEMS modify)."""
        if not self.metastack or not self.metastack[-1]:
            raise pickle.UnpicklingError("no object below the MARK")
        return self.metastack[-1][-1]

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    for _opcode, _what in (
        (pickle.INST, "create an instance with INST"),
        (pickle.OBJ, "create an instance with OBJ"),
        (pickle.NEWOBJ, "create an instance with NEWOBJ (cls.__new__)"),
        (pickle.NEWOBJ_EX, "create an instance with NEWOBJ_EX (cls.__new__)"),
        (pickle.EXT1, "look up a registered extension code"),
        (pickle.EXT2, "look up a registered extension code"),
        (pickle.EXT4, "look up a registered extension code"),
        (pickle.NEXT_BUFFER, "use an out-of-band buffer"),
        (pickle.READONLY_BUFFER, "use an out-of-band buffer"),
    ):
        dispatch[_opcode[0]] = _refuse_opcode(_what)
    del _opcode, _what


def _check_target(obj: Any, types: tuple, action: str) -> None:
    if type(obj) not in types:
        raise _Refused(f"{action} a {_shown(type(obj).__name__)}")


def _check_array_state(state: Any) -> None:
    """The state numpy writes for an array, ``(1, shape, dtype, is_fortran, data)``, with data of
    exactly the right size: numpy does not check the length of the list it gets for an object
    array (a short list makes it read past the list) and computes sizes in fixed width."""
    if type(state) is not tuple or len(state) != 5:
        raise _Refused("set the attributes of a numpy array (or use an unsupported array state)")
    _version, shape, dtype, _fortran, data = state
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise _Refused("give a numpy array a malformed shape")
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"give a numpy array a {_shown(type(dtype).__name__)} as dtype")
    count = math.prod(shape)
    if dtype.hasobject:  # object (and StringDType) arrays are pickled as a list of items
        ok = type(data) is list and len(data) == count
    else:  # str: Python 2 pickles read with encoding latin1
        ok = type(data) in (bytes, str) and len(data) == count * dtype.itemsize
    if not ok:
        raise _Refused("give a numpy array data that does not match its shape and dtype")


def _check_built_array(array: np.ndarray) -> None:
    if array.dtype.hasobject:
        return  # an object array holds the objects of the pickle (all from the allow-list)
    if _STRING_DTYPE is not None and isinstance(array.dtype, _STRING_DTYPE):
        return  # numpy requires a list of str for these
    if array.dtype.flags != np.dtype(array.dtype.str).flags:
        raise _Refused("build a numpy array whose dtype flags do not match its type")


def load_restricted_pickle(data: bytes) -> Any:
    """Unpickle ``data`` (a ``.pkl`` file's bytes, Python 2 strings read as latin-1) with
    :class:`_ArrayOnlyUnpickler`.

    Raises:
        _Refused: the stream needs something outside the allow-list (nothing of it ran).
        Exception: whatever a malformed stream makes pickle or numpy raise.
    """
    return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
