"""Import first, in a fresh process, to run the Triton kernels on the CPU through Triton's interpreter
(TRITON_INTERPRET must be set before any triton.jit runs)."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import triton.runtime.interpreter as _ti  # noqa: E402

_patch = _ti._patch_lang_tensor


def _index_fix(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array (triton 3.6)
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda s: int(np.asarray(s.handle.data).reshape(-1)[0]))


_ti._patch_lang_tensor = _index_fix
