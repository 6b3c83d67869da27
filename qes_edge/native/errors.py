"""The errors of loading libqes and choosing its backend, in a module of their own so that the
command line can name them when `_native` itself fails to import."""


class NativeLibraryMissing(ImportError):
    """libqes or its header is not installed beside the package."""


class BackendUnavailable(RuntimeError):
    """The backend asked for (QES_EDGE_BACKEND or set_backend) is not compiled in or not usable here."""
