"""Build lorakern._C with CMake + Ninja (pip install -e . builds everything)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / "python"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("LORAKERN_BUILD_TYPE", "Release")
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DLORAKERN_BUILD_PYTHON=ON",
        ]
        subprocess.run(args, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C"], check=True)


setup(ext_modules=[CMakeExtension("lorakern._C")], cmdclass={"build_ext": CMakeBuild})
