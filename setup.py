"""Packaging for steerfast, and the CMake build of its CUDA extension steerfast._C.

Environment:
  STEERFAST_CUDA_ARCHS  GPU architectures for _C (default "80;86;89;90a"): SASS for each, PTX for the newest
  STEERFAST_NO_CUDA=1   install without _C on purpose
  MAX_JOBS              parallel build jobs (default: all cores)
  NVCC_THREADS          nvcc --threads, architectures compiled in parallel (default: min(4, cores))
  CUDA_HOME, CUDA_PATH  where nvcc is looked for first; then /usr/local/cuda/bin, then PATH

Without nvcc, steerfast installs as pure Python: the Triton and torch backends still work.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;86;89;90a"


def find_nvcc():
    candidates = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("nvcc")


def cuda_plan():
    """(nvcc path, None) to build _C, or (None, why not)."""
    if os.environ.get("STEERFAST_NO_CUDA", "0") not in ("", "0"):
        return None, "STEERFAST_NO_CUDA is set"
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin, PATH)"
    import importlib.util
    if importlib.util.find_spec("pybind11") is None:  # seen on a GPU image: a system pip building with
        # a system Python while pybind11 lives in the venv's; `python -m pip` builds with the venv's
        return None, (f"pybind11 is not importable by the Python building steerfast ({sys.executable}); with "
                      "--no-build-isolation install it there, or run `python -m pip` from the environment that has it")
    return nvcc, None


NVCC, NO_CUDA_REASON = cuda_plan()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # CMakeLists.txt names the sources


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, putting the module where build_ext expects it
    (for an editable install setuptools then copies it into steerfast/)."""

    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(f"steerfast: nvcc was found ({NVCC}) but cmake (>= 3.18) is not on PATH: "
                               "install cmake (e.g. `pip install cmake`), or set STEERFAST_NO_CUDA=1 "
                               "to install without steerfast._C")
        import pybind11  # a build requirement (pyproject.toml)

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        jobs = os.environ.get("MAX_JOBS") or str(cores)
        nvcc_threads = os.environ.get("NVCC_THREADS") or str(min(4, cores))
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSTEERFAST_CUDA_ARCHS={os.environ.get('STEERFAST_CUDA_ARCHS') or DEFAULT_CUDA_ARCHS}",
            f"-DSTEERFAST_NVCC_THREADS={nvcc_threads}",
            f"-DSTEERFAST_VERSION={VERSION}",
        ]
        # Ninja if there is one, unless this build folder was already configured with another generator.
        if shutil.which("ninja") and not (build_temp / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), "-j", jobs], check=True)


def remove_stale_extension():
    """An editable install imports steerfast/_C*.so from the source tree, where an earlier CUDA
    install left it: reinstalling without _C must remove it, or it still imports. Only those files."""
    for stale in sorted((ROOT / "steerfast").glob("_C*.so")):
        stale.unlink()
        print(f"steerfast: removed {stale.relative_to(ROOT)}, left by an earlier install with _C", file=sys.stderr)


class BuildPy(build_py):
    def run(self):
        if NVCC is None:  # said here, once per build, rather than on every run of setup.py
            print(f"steerfast: {NO_CUDA_REASON}; installing without steerfast._C "
                  "(CUDA kernels disabled, Triton/torch backends still work)", file=sys.stderr)
            if getattr(self, "editable_mode", False):  # a wheel never carries the source tree's .so
                remove_stale_extension()
        super().run()
        # kernels/ has no __init__.py (see below); an installed steerfast.kernels is a regular package
        init = Path(self.build_lib) / "steerfast" / "kernels" / "__init__.py"
        if init.parent.is_dir() and not init.exists():
            init.write_text(KERNELS_INIT)


# The Triton kernels live in the top-level kernels/ folder and install as steerfast.kernels;
# a top-level `kernels` module must never be installed (that name is Hugging Face's package, which
# transformers imports). kernels/ has no __init__.py, so from the repo root (where `python -m pytest`
# puts it on sys.path) it is at most a namespace portion and an installed `kernels` still wins;
# the wheel gets the __init__.py below, an editable install is pointed at the folder by steerfast/__init__.py.
KERNELS_INIT = '"""Triton kernels. Each module holds `_<op>_kernel` and its launcher."""\n'
packages = ["steerfast", *(f"steerfast.{p}" for p in find_packages("steerfast"))]
packages += ["steerfast.kernels", *(f"steerfast.kernels.{p}" for p in find_packages("kernels"))]

setup(
    name="steerfast",
    version=VERSION,
    description="Fast steered decoding: steering vectors, SAE-driven control and the hybrid "
                "base/thinking model loop",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"steerfast": "steerfast", "steerfast.kernels": "kernels"},
    ext_modules=[CMakeExtension("steerfast._C")] if NVCC else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    # Only asked for (by pip's isolated build) when _C is to be built and no cmake is on PATH.
    setup_requires=["cmake>=3.18"] if NVCC and shutil.which("cmake") is None else [],
    install_requires=[
        "torch>=2.5",
        'triton; platform_system == "Linux"',
        "transformers>=4.45",
        "safetensors",
        "numpy",
        "tqdm",
        "sympy",  # answer grading (steerfast.evaluate)
    ],
    # the build tests make a wheel without build isolation: they need the build requirements at hand
    extras_require={"test": ["pytest", "pytest-benchmark", "setuptools>=64", "wheel", "pybind11>=2.12", "pyarrow",
                             "matplotlib", "pytest-xdist",
                             "kernels"],  # Hugging Face's: proves kernels/ cannot shadow it from the repo root
                    "flash": ["flash-attn"],
                    "eval": ["pyarrow"],  # parquet problem files
                    "research": ["matplotlib"]},  # the emission-sweep plot
    entry_points={"console_scripts": ["steerfast = steerfast.cli:main"]},
    zip_safe=False,
)
