"""`python tests/cache_every_process.py <module> <args>`: `python -m <module> <args>`, with every JAX process of a
multi-process job writing the programs it compiles to the session's compilation cache (conftest.py).

JAX writes cache entries from process 0 only, so that the hosts of a pod do not all write the same entry; on a pod
they share it, because the key holds the topology of the whole slice. On the CPU the key holds the topology of the
process's own devices, which differs between processes, so process 1 never finds an entry and compiles every
program again in every run of tests/test_multihost.py. Letting each process write its own entries makes its
later runs load them as process 0's do: each entry is the executable that process's XLA built, so results are
unchanged. Only the tests launch through this file.
"""

from __future__ import annotations

import os
import runpy
import sys

from jax._src import compilation_cache, compiler, distributed

_write_from_process_0 = compiler._cache_write


def _write_from_every_process(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if distributed.global_state.process_id == 0 or host_callbacks:
        return _write_from_process_0(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
    compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend, int(compile_time_secs))


if __name__ == "__main__":
    compiler._cache_write = _write_from_every_process
    sys.path[0] = os.getcwd()  # as `python -m` sees it: the working directory, not tests/
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
