"""The ``offload-train`` command line."""
