"""A stand-in for CuPy on machines without a GPU: NumPy underneath, CuPy's rules on top.

netengine's layers run on NumPy or CuPy through the same code (``xp = bottom[0].xp``). Without
a GPU the CuPy path would never run, so NumPy-only habits would slip in unnoticed. This module
is an array module that behaves like CuPy where CuPy differs from NumPy in ways that break
code, so the CPU test suite catches them:

- its arrays are not NumPy arrays: ``np.asarray(a)``/``np.array(a)`` raise TypeError
  (CuPy forbids implicit device-to-host conversion; use ``.get()`` / ``backend.to_host``);
- a NumPy array (any shape, even 0-d) mixed into a device operation raises TypeError, as in
  CuPy (Python and NumPy scalars are fine); ``copyto`` refuses a NumPy source of size > 1;
- only names CuPy provides exist on the module, the ufuncs and the arrays
  (``CUPY_NAMES``, ``NDARRAY_ATTRS``); ``ufunc.at`` only for add/subtract/maximum/minimum,
  ``ufunc.reduce``/``accumulate`` only for add and multiply; sorting only ``kind=None|'stable'``;
- indexing that gives one element returns a 0-d device array (not a NumPy scalar), reductions
  return 0-d arrays, as CuPy does;
- ``np.<func>(device_array)`` dispatches like CuPy's ``__array_function__``: fine for names
  CuPy has, TypeError for the others.

Setting ``a[...] = numpy_array`` is allowed (CuPy copies host values in), as are NumPy index
arrays. Every name looked up is recorded in ``USED`` (tests can print it).

The lists are what CuPy 13/14 document; a name missing here that CuPy does have can be added
after checking https://docs.cupy.dev/en/stable/reference/comparison.html.
"""
from __future__ import annotations

import types

import numpy as np

USED: set[str] = set()

_UFUNCS = """
add subtract multiply divide true_divide floor_divide power float_power remainder mod fmod
negative positive absolute abs fabs sign reciprocal exp exp2 expm1 log log2 log10 log1p sqrt
cbrt square sin cos tan arcsin arccos arctan arctan2 hypot sinh cosh tanh arcsinh arccosh
arctanh degrees radians deg2rad rad2deg maximum minimum fmax fmin greater greater_equal less
less_equal equal not_equal logical_and logical_or logical_xor logical_not isfinite isinf isnan
signbit copysign nextafter ldexp frexp modf floor ceil trunc rint bitwise_and bitwise_or
bitwise_xor bitwise_not invert left_shift right_shift gcd lcm logaddexp logaddexp2 sinc
heaviside divmod conj conjugate matmul clip
""".split()

_FUNCTIONS = """
empty empty_like zeros zeros_like ones ones_like full full_like eye identity array asarray
asanyarray ascontiguousarray asfortranarray copy arange linspace logspace meshgrid tri tril triu
diag diagflat copyto reshape ravel moveaxis rollaxis swapaxes transpose atleast_1d atleast_2d
atleast_3d broadcast_to broadcast_arrays expand_dims squeeze concatenate stack vstack hstack
dstack column_stack split array_split hsplit vsplit dsplit tile repeat unique flip fliplr flipud
roll rot90 pad append resize trim_zeros where nonzero flatnonzero argwhere take take_along_axis
put put_along_axis place putmask choose compress diagonal select extract indices ix_
ravel_multi_index unravel_index fill_diagonal sum prod mean average var std nansum nanprod
nanmean nanvar nanstd nanmax nanmin nanargmax nanargmin max min amax amin argmax argmin ptp
cumsum cumprod nancumsum nancumprod diff ediff1d gradient cross trapz any all count_nonzero
sort argsort lexsort msort partition argpartition searchsorted median nanmedian percentile
quantile histogram bincount digitize corrcoef cov correlate convolve dot vdot inner outer
tensordot einsum kron trace isclose allclose array_equal array_equiv isscalar isreal iscomplex
around round round_ fix real imag angle interp nan_to_num real_if_close i0 packbits unpackbits
result_type can_cast promote_types common_type min_scalar_type dtype finfo iinfo issubdtype
ndim shape size asnumpy get_array_module fromfunction frombuffer fromstring
""".split()

_TYPES_AND_CONSTANTS = """
bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 complex64
complex128 intp uintp byte ubyte short ushort intc uintc int_ uint longlong ulonglong half single
double csingle cdouble generic number integer signedinteger unsignedinteger inexact floating
complexfloating e pi inf nan newaxis euler_gamma ndarray ufunc
""".split()

CUPY_NAMES = frozenset(_UFUNCS + _FUNCTIONS + _TYPES_AND_CONSTANTS)
UFUNC_AT = frozenset({"add", "subtract", "maximum", "minimum"})
UFUNC_REDUCE = frozenset({"add", "multiply"})
HOST_INPUT_OK = frozenset({"array", "asarray", "asanyarray", "ascontiguousarray",
                           "asfortranarray", "copy"})

NDARRAY_ATTRS = frozenset("""
shape strides dtype ndim size itemsize nbytes flags T base real imag flat device data
astype reshape ravel flatten transpose swapaxes squeeze repeat copy view fill sum prod mean var
std max min argmax argmin ptp cumsum cumprod any all clip dot take put nonzero diagonal trace
sort argsort partition argpartition round conj conjugate item tolist tobytes choose compress
get set toDlpack reduced_view
""".split())

_SORTING = {"sort", "argsort"}


def _host_error(where: str) -> TypeError:
    return TypeError(f"{where}: a NumPy array was mixed with device (CuPy) arrays; move it to "
                     "the device first (xp.asarray) or compute with Python/NumPy scalars")


def _unwrap(value, where: str, host_ok: bool = False):
    """The NumPy array under a fake device array; NumPy arrays raise unless ``host_ok``."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        if not host_ok:
            raise _host_error(where)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where, host_ok) for v in value)
    return value


def _unwrap_kwargs(kwargs: dict, where: str) -> dict:
    return {k: _unwrap(v, where) for k, v in kwargs.items()}


def _wrap(value):
    """Device arrays for NumPy results (0-d arrays for NumPy scalars, as CuPy returns)."""
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _check_kind(name: str, kwargs: dict) -> None:
    if name in _SORTING and kwargs.get("kind") not in (None, "stable"):
        raise ValueError(f"cupy.{name}: kind can only be None or 'stable', got "
                         f"{kwargs['kind']!r}")


class ufunc:
    """A NumPy ufunc behind CuPy's rules (host arrays refused; limited at/reduce)."""

    def __init__(self, np_ufunc: np.ufunc) -> None:
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout = np_ufunc.nin, np_ufunc.nout

    def __call__(self, *args, **kwargs):
        where = f"cupy.{self.__name__}"
        return _wrap(self._u(*_unwrap(args, where), **_unwrap_kwargs(kwargs, where)))

    def at(self, a, indices, b=None):
        USED.add(f"{self.__name__}.at")
        if self.__name__ not in UFUNC_AT:
            raise NotImplementedError(f"`{self.__name__}.at` is not supported in CuPy")
        where = f"cupy.{self.__name__}.at"
        if not isinstance(a, ndarray):
            raise TypeError(f"{where}: the target must be a device array")
        self._u.at(a._a, _unwrap(indices, where), _unwrap(b, where))

    def reduce(self, array, *args, **kwargs):
        USED.add(f"{self.__name__}.reduce")
        if self.__name__ not in UFUNC_REDUCE:
            raise NotImplementedError(f"`{self.__name__}.reduce` is not supported in CuPy")
        where = f"cupy.{self.__name__}.reduce"
        return _wrap(self._u.reduce(_unwrap(array, where), *args, **_unwrap_kwargs(kwargs, where)))

    def accumulate(self, array, *args, **kwargs):
        USED.add(f"{self.__name__}.accumulate")
        if self.__name__ not in UFUNC_REDUCE:
            raise NotImplementedError(f"`{self.__name__}.accumulate` is not supported in CuPy")
        where = f"cupy.{self.__name__}.accumulate"
        return _wrap(self._u.accumulate(_unwrap(array, where), *args,
                                        **_unwrap_kwargs(kwargs, where)))

    def outer(self, a, b, **kwargs):
        where = f"cupy.{self.__name__}.outer"
        return _wrap(self._u.outer(_unwrap(a, where), _unwrap(b, where),
                                   **_unwrap_kwargs(kwargs, where)))

    def reduceat(self, *args, **kwargs):
        raise NotImplementedError(f"`{self.__name__}.reduceat` is not supported in CuPy")


def _function(name: str):
    np_func = getattr(np, name)
    host_ok = name in HOST_INPUT_OK

    def call(*args, **kwargs):
        where = f"cupy.{name}"
        _check_kind(name, kwargs)
        if name == "copyto":
            src = args[1] if len(args) > 1 else kwargs.get("src")
            if isinstance(src, np.ndarray) and src.size != 1:
                raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
            if isinstance(src, np.ndarray):
                args = (args[0], src.item()) + tuple(args[2:])
        out = np_func(*_unwrap(args, where, host_ok), **_unwrap_kwargs(kwargs, where))
        if name == "copyto":
            return None
        if name in HOST_INPUT_OK and isinstance(out, np.ndarray) and out.dtype == object:
            raise TypeError(f"{where}: object arrays are not supported")
        return _wrap(out)

    call.__name__ = name
    return call


class ndarray:  # noqa: N801 - mirrors cupy.ndarray
    """A device array: a NumPy array inside, refusing implicit host conversion."""

    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, array) -> None:
        if isinstance(array, ndarray):
            array = array._a
        if not isinstance(array, np.ndarray):
            raise TypeError("fake_cupy.ndarray wraps a NumPy array; use fake_cupy.asarray")
        self._a = array

    # -- conversions CuPy refuses or does explicitly -------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, np_ufunc, method, *inputs, **kwargs):
        name = np_ufunc.__name__
        if name not in CUPY_NAMES:
            return NotImplemented
        wrapped = ufunc(np_ufunc)
        if method == "__call__":
            return wrapped(*inputs, **kwargs)
        return getattr(wrapped, method)(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        module = getattr(func, "__module__", "") or ""
        if module.startswith("numpy.linalg"):
            target = getattr(linalg, name, None)
        elif module.startswith("numpy") and name in CUPY_NAMES:
            target = getattr(_module, name)
        else:
            target = None
        if target is None:
            return NotImplemented  # NumPy then raises TypeError, as with CuPy
        return target(*args, **kwargs)

    def get(self, stream=None, order="C", out=None) -> np.ndarray:
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError(f"Shape mismatch: {self._a.shape} != {arr.shape}")
        if arr.dtype != self._a.dtype:
            raise TypeError(f"{self._a.dtype} array cannot be set to {arr.dtype} array")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        self._a[...] = arr

    def __float__(self) -> float:
        return float(self._a)

    def __int__(self) -> int:
        return int(self._a)

    def __complex__(self) -> complex:
        return complex(self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __index__(self) -> int:
        if self._a.ndim != 0 or self._a.dtype.kind not in "iu":
            raise TypeError("only integer 0-d arrays can be used as an index")
        return int(self._a)

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __repr__(self) -> str:
        return "fake_cupy." + repr(self._a)

    def __str__(self) -> str:
        return str(self._a)

    def __format__(self, spec: str) -> str:
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # -- attributes ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self._a.shape

    @shape.setter
    def shape(self, value) -> None:
        self._a.shape = value

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def strides(self) -> tuple:
        return self._a.strides

    @property
    def T(self):  # noqa: N802
        return ndarray(self._a.T)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._a.ctypes.data, device=_Device(0))

    @property
    def device(self):
        return _Device(0)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        USED.add(f"ndarray.{name}")
        if name not in NDARRAY_ATTRS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        value = getattr(self._a, name)
        if not callable(value):
            return _wrap(value) if name in ("base", "real", "imag") else value

        def method(*args, **kwargs):
            where = f"cupy.ndarray.{name}"
            _check_kind(name, kwargs)
            return _wrap(value(*_unwrap(args, where), **_unwrap_kwargs(kwargs, where)))

        return method

    # -- indexing --------------------------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "indexing", host_ok=True)])

    def __setitem__(self, key, value) -> None:
        self._a[_unwrap(key, "indexing", host_ok=True)] = _unwrap(value, "assignment",
                                                                 host_ok=True)


def _binary(np_ufunc, reflected: bool = False, inplace: bool = False):
    name = np_ufunc.__name__

    def op(self, other):
        if isinstance(other, np.ndarray):
            raise _host_error(f"cupy operator ({name})")
        if isinstance(other, (list, tuple)):
            raise TypeError(f"Unsupported type {type(other)}")
        if not isinstance(other, (ndarray, int, float, complex, bool, np.generic)):
            return NotImplemented
        b = other._a if isinstance(other, ndarray) else other
        if inplace:
            np_ufunc(self._a, b, out=self._a)
            return self
        return _wrap(np_ufunc(b, self._a) if reflected else np_ufunc(self._a, b))

    return op


for _name, _uf in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                   ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                   ("mod", np.remainder), ("pow", np.power), ("matmul", np.matmul),
                   ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor),
                   ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                   ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
for _name, _uf in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute),
                   ("invert", np.invert)]:
    setattr(ndarray, f"__{_name}__", (lambda u: lambda self: _wrap(u(self._a)))(_uf))


# -- the module ------------------------------------------------------------------------------------
class _Device:
    def __init__(self, device_id: int = 0) -> None:
        self.id = int(device_id)

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Pool:
    def __init__(self) -> None:
        self.mallocs = 0

    def malloc(self, size):
        self.mallocs += 1
        return types.SimpleNamespace(ptr=0, size=size)

    def used_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


_pool = _Pool()
_stream = types.SimpleNamespace(synchronize=lambda: None)
cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 13000,
                                  getDeviceProperties=lambda i: {"name": b"fake_cupy",
                                                                 "totalGlobalMem": 0}),
    Device=_Device, get_current_stream=lambda: _stream, set_allocator=lambda f: None)


def get_default_memory_pool() -> _Pool:
    return _pool


def asnumpy(a, stream=None, order="C", out=None) -> np.ndarray:
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def get_array_module(*args):
    return _module if any(isinstance(a, ndarray) for a in args) else np


class _Random:
    """cupy.random: the legacy functions netengine may use, drawn from a seeded NumPy state."""

    def __init__(self) -> None:
        self._state = np.random.RandomState(0)

    def seed(self, seed=None) -> None:
        self._state = np.random.RandomState(seed)

    def random_sample(self, size=None, dtype=float):
        return ndarray(np.asarray(self._state.random_sample(size)).astype(dtype))

    random = random_sample

    def rand(self, *size, dtype=float):
        return self.random_sample(size, dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        return ndarray(np.asarray(self._state.uniform(low, high, size)).astype(dtype))

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        return ndarray(np.asarray(self._state.normal(loc, scale, size)).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        return self.normal(0.0, 1.0, size, dtype)

    def randn(self, *size, dtype=float):
        return self.normal(0.0, 1.0, size, dtype)

    def randint(self, low, high=None, size=None, dtype=int):
        return ndarray(np.asarray(self._state.randint(low, high, size)).astype(dtype))

    def permutation(self, n):
        return ndarray(self._state.permutation(n))


random = _Random()


def _as_strided(x, shape=None, strides=None):
    USED.add("lib.stride_tricks.as_strided")
    return ndarray(np.lib.stride_tricks.as_strided(_unwrap(x, "as_strided"), shape, strides))


def _sliding_window_view(x, window_shape, axis=None, *, subok=False, writeable=False):
    USED.add("lib.stride_tricks.sliding_window_view")
    return ndarray(np.lib.stride_tricks.sliding_window_view(
        _unwrap(x, "sliding_window_view"), window_shape, axis, writeable=writeable))


lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
    as_strided=_as_strided, sliding_window_view=_sliding_window_view))

_LINALG = {"norm", "det", "inv", "pinv", "solve", "svd", "qr", "cholesky", "eigh", "eigvalsh",
           "slogdet", "matrix_power", "matrix_rank", "lstsq", "tensorinv", "tensorsolve"}


class _Linalg:
    def __getattr__(self, name: str):
        USED.add(f"linalg.{name}")
        if name not in _LINALG:
            raise AttributeError(f"module 'cupy.linalg' has no attribute '{name}'")
        np_func = getattr(np.linalg, name)

        def call(*args, **kwargs):
            where = f"cupy.linalg.{name}"
            return _wrap(np_func(*_unwrap(args, where), **_unwrap_kwargs(kwargs, where)))

        return call


linalg = _Linalg()


class _FakeCupyModule(types.ModuleType):
    """``cupy`` itself: attribute lookups limited to what CuPy provides."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        USED.add(name)
        if name not in CUPY_NAMES:
            raise AttributeError(f"module 'cupy' has no attribute '{name}' (NumPy has it, "
                                 "CuPy does not)")
        value = getattr(np, name)
        if isinstance(value, np.ufunc):
            wrapped = ufunc(value)
        elif callable(value) and not isinstance(value, type):
            wrapped = _function(name)
        else:
            wrapped = value
        setattr(self, name, wrapped)  # cache: later lookups skip __getattr__
        return wrapped


_module = _FakeCupyModule("fake_cupy", __doc__)
for _attr in ("ndarray", "ufunc", "cuda", "get_default_memory_pool", "asnumpy",
              "get_array_module", "random", "lib", "linalg"):
    setattr(_module, _attr, globals()[_attr])
_module.__version__ = "0.0-fake"
_module.is_fake = True

#: the fake module to hand to netengine as ``cupy`` (monkeypatch ``backend._import_cupy``).
cupy = _module
