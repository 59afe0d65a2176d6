"""lrk's release number. A built wheel adds a local tag naming the torch and CUDA
it was built for (``0.1.0+cu130torch2.14``): see ``lrk.build_info()["version"]``."""
__version__ = "0.1.0"
