# SPDX-License-Identifier: MIT
"""Makes cpuadam's thread pool visible to threadpoolctl, whose limits then apply to it."""

from __future__ import annotations


def register() -> bool:
    """Registers cpuadam's controller with threadpoolctl if threadpoolctl >= 3.5 is installed.

    The controller's user_api is "openmp": cpuadam's pool takes the place of the OpenMP
    runtime an OpenMP build would bring, so ``threadpool_limits(1, user_api="openmp")``
    limits it as it limits torch's and NumPy's OpenMP threads. Importing threadpoolctl
    costs a few milliseconds at ``import cpuadam`` where it is installed, nothing elsewhere.
    Returns whether the controller was registered.
    """
    try:
        import threadpoolctl
    except ImportError:
        return False
    if not hasattr(threadpoolctl, "register"):  # before 3.5
        return False

    from cpuadam import _core

    class CpuadamController(threadpoolctl.LibController):
        """Reads and sets cpuadam's thread count through two C functions _core exports."""

        user_api = "openmp"
        internal_api = "cpuadam"
        # threadpoolctl matches loaded libraries by file name, then keeps only those
        # that export one of check_symbols: other packages' _core modules are skipped.
        filename_prefixes = ("_core",)
        check_symbols = ("cpuadam_get_num_threads", "cpuadam_set_num_threads")

        def get_num_threads(self):
            get = getattr(self.dynlib, "cpuadam_get_num_threads", None)
            return None if get is None else get()

        def set_num_threads(self, num_threads):
            set_ = getattr(self.dynlib, "cpuadam_set_num_threads", None)
            return None if set_ is None else set_(int(num_threads))

        def get_version(self):
            # Called for every file whose name matches, before check_symbols is.
            return _core.__version__ if hasattr(self.dynlib, "cpuadam_get_num_threads") else None

    threadpoolctl.register(CpuadamController)
    return True
