"""Builds tadrop's optional native kernels (tadrop/_native.c, loaded through ctypes).

Everything else is in pyproject.toml.  A machine without a C compiler still installs: the build
failure is reported and tadrop runs its torch path, which gives the same bits, slower.
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 (no compiler, no headers: fall back, loudly)
            print(f"warning: tadrop's native kernels were not built ({e}); the torch path runs "
                  "instead (same results, slower)", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} was not built ({e}); the torch path runs instead",
                  file=sys.stderr)


native = Extension("tadrop._native", ["tadrop/_native.c"],
                   extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
                   if sys.platform != "win32" else ["/O2"])

setup(ext_modules=[native], cmdclass={"build_ext": OptionalBuildExt})
