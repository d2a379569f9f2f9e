"""The ctypes declarations of hyzo._lib against the C header ffi/hyzo.h (parsed with
pycparser): every function's return and argument types, every field of hyzo_config and
every enum value, so that the hand-written binding and the header cannot drift apart.

Without pycparser or gcc the file is skipped, unless ``HYZO_REQUIRE_PYCPARSER`` or ``CI`` is
set (``scripts/test-python`` sets it, so ``make test`` does): then it fails, so that it
cannot pass without having run (as ``HYZO_REQUIRE_LIBCLANG`` in tests/abi.rs)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from typing import Dict, List, Tuple, Union

import pytest

from conftest import REPO



def _required() -> bool:
    """Whether a missing tool must fail these tests rather than skip them."""
    return any(os.environ.get(v, "") not in ("", "0", "false")
               for v in ("CI", "HYZO_REQUIRE_PYCPARSER"))


def _missing(what: str) -> None:
    """Skips, or fails where the tests are required to run."""
    if _required():
        pytest.fail(f"{what}; HYZO_REQUIRE_PYCPARSER or CI is set, so this is an error",
                    pytrace=False)
    pytest.skip(what, allow_module_level=True)


try:
    import pycparser
    from pycparser import c_ast
except ImportError:
    _missing("pycparser is not installed (pip install pycparser; `make setup` pins it)")

from hyzo import _lib  # noqa: E402

HEADER = REPO / "ffi" / "hyzo.h"

# Header functions the binding leaves out on purpose, and why.
UNBOUND = {
    "hyzo_status_string": "the binding maps each status to an exception class itself",
}

# What <stdint.h> provides, as plain typedefs: the system header's compiler extensions are
# not C that pycparser reads.
STDINT = """
typedef signed char int8_t; typedef unsigned char uint8_t;
typedef short int16_t; typedef unsigned short uint16_t;
typedef int int32_t; typedef unsigned int uint32_t;
typedef long long int64_t; typedef unsigned long long uint64_t;
typedef unsigned long uintptr_t; typedef unsigned long size_t;
"""

SCALARS = {
    "uint8_t": ctypes.c_uint8, "uint16_t": ctypes.c_uint16, "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64, "int8_t": ctypes.c_int8, "int16_t": ctypes.c_int16,
    "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "int": ctypes.c_int,
    "float": ctypes.c_float, "double": ctypes.c_double, "char": ctypes.c_char,
    "size_t": ctypes.c_size_t,
}
# C enums are int-sized (the header forbids -fshort-enums); their values are small and
# non-negative, so a 32-bit int of either signedness carries them.
ENUM_CTYPES = (ctypes.c_uint32, ctypes.c_int32, ctypes.c_int)

# C type, in a form to compare: a name, or ("ptr", pointee).
CType = Union[str, Tuple[str, "CType"]]


class Header:
    """The declarations of ffi/hyzo.h."""

    def __init__(self) -> None:
        if shutil.which("gcc") is None:
            _missing("gcc (the C preprocessor) is not installed")
        src = HEADER.read_text().replace("#include <stdint.h>", STDINT)
        # -E -P: drop comments and the C++ guards; -nostdinc: nothing else is included.
        text = subprocess.run(["gcc", "-E", "-P", "-nostdinc", "-x", "c", "-"], input=src,
                              capture_output=True, text=True, check=True).stdout
        ast = pycparser.CParser().parse(text, str(HEADER))
        self.enums: Dict[str, Dict[str, int]] = {}
        self.structs: Dict[str, List[Tuple[str, CType]]] = {}
        self.opaque: List[str] = []
        self.functions: Dict[str, Tuple[CType, List[CType]]] = {}
        for node in ast.ext:
            if isinstance(node, c_ast.Typedef):
                self._typedef(node)
            elif isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.FuncDecl):
                fn = node.type
                params = [] if fn.args is None else [
                    _ctype(p.type) for p in fn.args.params
                    if not (isinstance(p, c_ast.Typename) and _ctype(p.type) == "void")]
                self.functions[node.name] = (_ctype(fn.type), params)

    def _typedef(self, node: c_ast.Typedef) -> None:
        inner = node.type.type if isinstance(node.type, c_ast.TypeDecl) else None
        if isinstance(inner, c_ast.Enum):
            values, nxt = {}, 0
            for e in inner.values.enumerators:
                nxt = int(e.value.value, 0) if e.value is not None else nxt
                values[e.name] = nxt
                nxt += 1
            self.enums[node.name] = values
        elif isinstance(inner, c_ast.Struct):
            if inner.decls is None:
                self.opaque.append(node.name)
            else:
                self.structs[node.name] = [(d.name, _ctype(d.type)) for d in inner.decls]


def _ctype(t: c_ast.Node) -> CType:
    if isinstance(t, c_ast.PtrDecl):
        return ("ptr", _ctype(t.type))
    if isinstance(t, c_ast.TypeDecl):
        inner = t.type
        if isinstance(inner, c_ast.IdentifierType):
            return " ".join(inner.names)
        if isinstance(inner, c_ast.Struct):
            return inner.name
    raise AssertionError(f"unexpected C type in the header: {t}")


@pytest.fixture(scope="module")
def header() -> Header:
    return Header()


def _matches(header: Header, c: CType, py: object, *, is_return: bool = False) -> bool:
    """Whether ctypes type ``py`` passes/receives the C type ``c`` with the same ABI."""
    if c == "void":
        return is_return and py is None
    if isinstance(c, tuple):
        pointee = c[1]
        if pointee == "char":
            return py is ctypes.c_char_p
        if py is ctypes.c_void_p:  # an untyped address: fine for any pointer
            return True
        if pointee in header.opaque or pointee == "void":
            return False  # only c_void_p stands for those
        return (isinstance(py, type) and issubclass(py, ctypes._Pointer)
                and _matches(header, pointee, py._type_))
    if c in header.enums:
        return py in ENUM_CTYPES
    if c in header.structs:
        return py is getattr(_lib, c, None)
    return py is SCALARS.get(c)


def _bound_functions() -> Dict[str, object]:
    """The library functions _lib declared (ctypes caches each one on the CDLL)."""
    return {name: fn for name, fn in vars(_lib.lib).items()
            if isinstance(fn, _lib.lib._FuncPtr)}


def test_every_header_function_is_bound_with_its_c_types(header):
    bound = _bound_functions()
    assert header.functions, "no function parsed from the header"
    for name, (ret, params) in header.functions.items():
        if name in UNBOUND:
            assert name not in bound, f"{name} is bound: remove it from UNBOUND"
            continue
        assert name in bound, f"{name} is in ffi/hyzo.h but not declared in hyzo/_lib.py"
        fn = bound[name]
        assert fn.argtypes is not None, f"{name}: no argtypes declared"
        assert len(fn.argtypes) == len(params), (
            f"{name}: {len(fn.argtypes)} argtypes, the header has {len(params)} parameters")
        assert _matches(header, ret, fn.restype, is_return=True), (
            f"{name}: restype {fn.restype} does not match the header's {ret}")
        for i, (c, py) in enumerate(zip(params, fn.argtypes)):
            assert _matches(header, c, py), (
                f"{name}: argument {i} is {py} in _lib.py, {c} in the header")


def test_every_bound_function_is_in_the_header(header):
    extra = sorted(set(_bound_functions()) - set(header.functions))
    assert not extra, f"declared in hyzo/_lib.py but not in ffi/hyzo.h: {extra}"
    gone = sorted(set(UNBOUND) - set(header.functions))
    assert not gone, f"no longer in ffi/hyzo.h, remove from UNBOUND: {gone}"


def test_structs_have_the_headers_fields_in_order(header):
    assert set(header.structs) == {"hyzo_config"}, (
        f"structs of the header: {sorted(header.structs)}; bind new ones in _lib.py and "
        "compare them here")
    for name, fields in header.structs.items():
        ours = getattr(_lib, name)._fields_
        assert [f for f, _ in ours] == [f for f, _ in fields], name
        for (field, c), (_, py) in zip(fields, ours):
            assert _matches(header, c, py), f"{name}.{field}: {py} in _lib.py, {c} in the header"


def test_enum_values_match_the_header(header):
    dtype_names = {"float32": "HYZO_F32", "float16": "HYZO_F16", "bfloat16": "HYZO_BF16"}
    ours = {
        "hyzo_status": {"HYZO_OK": 0, **{name: code for code, (name, _) in _lib._STATUS.items()}},
        "hyzo_dtype": {dtype_names[k]: v for k, v in _lib.DTYPE_CODES.items()},
        "hyzo_device": {"HYZO_DEVICE_CPU": _lib.DEVICE_CPU, "HYZO_DEVICE_CUDA": _lib.DEVICE_CUDA},
        "hyzo_rule": {f"HYZO_RULE_{k.upper()}": v for k, v in _lib.RULES.items()},
        "hyzo_direction": {f"HYZO_DIRECTION_{k.upper()}": v for k, v in _lib.DIRECTIONS.items()},
        "hyzo_estimator": {f"HYZO_ESTIMATOR_{k.upper()}": v for k, v in _lib.ESTIMATORS.items()},
        "hyzo_precision": {f"HYZO_PRECISION_{k.upper()}": v for k, v in _lib.PRECISIONS.items()},
        "hyzo_phase": {f"HYZO_PHASE_{v.upper()}": k for k, v in _lib.PHASES.items()},
    }
    assert set(header.enums) == set(ours), (
        f"enums of the header: {sorted(header.enums)}; those compared here: {sorted(ours)}")
    for name, values in header.enums.items():
        assert ours[name] == values, f"{name}: _lib.py has {ours[name]}, the header {values}"


def test_the_checks_catch_a_mismatch(header):
    """The comparison itself can fail: a wrong width, a wrong pointee, a wrong struct."""
    assert not _matches(header, "uint64_t", ctypes.c_uint32)
    assert not _matches(header, ("ptr", "float"), ctypes.POINTER(ctypes.c_double))
    assert not _matches(header, ("ptr", "hyzo_optimizer"), ctypes.POINTER(ctypes.c_int))
    assert not _matches(header, "void", ctypes.c_int, is_return=True)
    assert not _matches(header, "hyzo_config", ctypes.c_void_p)
    assert _matches(header, ("ptr", ("ptr", "hyzo_optimizer")), ctypes.POINTER(ctypes.c_void_p))
