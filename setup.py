"""Packaging shim: the metadata lives in pyproject.toml.

setup.py must never import torch for an ordinary install (pip would otherwise need torch
inside an isolated build environment and download one). Only an explicitly requested
ahead-of-time extension build may import it:

    FASTFUSION_BUILD_EXT=1 pip install --no-build-isolation .

compiles fastfusion/csrc/cpu into fastfusion/_fastfusion_cpu*.so, next to a file recording the torch
version it was built against; fastfusion/_extension.py loads it instead of building just in
time when that version is the running one.
"""

import os

from setuptools import setup

if os.environ.get("FASTFUSION_BUILD_EXT", "0") == "1":
    import glob
    import importlib.util
    import pathlib

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The loader's flags and file names, read from the module itself (not the package, whose
    # __init__ would import the whole library at build time).
    spec = importlib.util.spec_from_file_location("_fastfusion_extension", "fastfusion/_extension.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)

    class BuildRecordingTorchVersion(BuildExtension):
        def run(self):
            super().run()
            # After run(), which copies the library into the source tree for --inplace and
            # editable installs, get_ext_fullpath names where the library ended up.
            for ext in self.extensions:
                library = pathlib.Path(self.get_ext_fullpath(ext.name))
                library.with_name(loader.AOT_TORCH_VERSION_FILE).write_text(torch.__version__ + "\n")

    setup(
        ext_modules=[
            CppExtension(
                "fastfusion." + loader.AOT_MODULE,
                sorted(glob.glob("fastfusion/csrc/cpu/*.cpp")),
                extra_compile_args=list(loader.CFLAGS),
                extra_link_args=list(loader.LDFLAGS),
            )
        ],
        cmdclass={"build_ext": BuildRecordingTorchVersion},
    )
else:
    setup()
